"""An in-memory transport, like dramatiq's StubBroker: queues, a retry set, results and
dead letters in dicts and lists of this process. For in-process tests of the supervisor's
parts (with a fake clock and a fake pool); not a `--message-queue-impl`.

It keeps what is not taken (like the sorted-set transport), records every result written
(so a test sees a duplicate) and in which write each delivery was answered and settled
(set `settles_later` to settle in a later write, as the sorted set does), and fails every call while `down` is set (an outage), or
only claims while `refuse_claims` is.
"""
from __future__ import annotations

from collections import deque
from typing import Deque, Dict, FrozenSet, List, Optional, Tuple

import orjson

from asyncproc import messages
from asyncproc.transports.base import Delivery, Transport, TransportError, Writes


class Memory(Transport):
    must_drain = False

    def __init__(self, queues: Tuple[str, ...] = ("q",)) -> None:
        self.queues: Dict[str, Deque[bytes]] = {q: deque() for q in queues}
        self.retry_set: List[Tuple[float, bytes, str]] = []   # (due, request state, queue)
        self.results: List[Tuple[str, bytes]] = []             # (id key, encoded result), as written
        self.dead_letters: List[bytes] = []
        self.settled: List[Delivery] = []
        self.writes = 0                                         # write() calls that succeeded
        self.written_at: Dict[object, int] = {}                 # delivery token -> write of its result
        self.settled_at: Dict[object, int] = {}                 # delivery token -> write that settled it
        self.cancelled_batches: FrozenSet[str] = frozenset()
        self.cancelled_ids: FrozenSet[str] = frozenset()
        self.down = False
        self.refuse_claims = False   # claims fail, everything else works (a claim too large, ...)
        self.connects = 0
        self._serial = 0

    # -- the producer's side ---------------------------------------------------------------
    def enqueue(self, queue: str, message) -> None:
        """Add a request message (a dict, or raw bytes as a producer wrote them)."""
        self.queues.setdefault(queue, deque()).append(message if isinstance(message, bytes) else orjson.dumps(message))

    def result_of(self, id_value) -> Optional[dict]:
        """The last result written for an id (None: none yet)."""
        key = messages.id_key(id_value)
        found = [raw for k, raw in self.results if k == key]
        return orjson.loads(found[-1]) if found else None

    def result_ids(self) -> List:
        return [orjson.loads(key) for key, _ in self.results]

    def cancel(self, ids=(), batches=()) -> None:
        self.cancelled_ids |= frozenset(messages.id_key(i) for i in ids)
        self.cancelled_batches |= frozenset(batches)

    # -- the consumer's side -----------------------------------------------------------------
    def _check(self) -> None:
        if self.down:
            raise TransportError("memory: down")

    def connect(self) -> None:
        self._check()
        self.connects += 1

    def receive(self, limit: int) -> List[Delivery]:
        self._check()
        out: List[Delivery] = []
        for name, lined in self.queues.items():
            while lined and len(out) < limit:
                self._serial += 1
                out.append(Delivery(lined.popleft(), name, token=self._serial))
        return out

    def claim_due(self, now: float, limit: int) -> List[Delivery]:
        self._check()
        self.retry_set.sort(key=lambda item: item[0])
        due = [item for item in self.retry_set if item[0] <= now][:limit]
        del self.retry_set[:len(due)]
        return [Delivery(b"", queue, token=None, state=state) for _, state, queue in due]

    def claim(self, keys: List[str], deliveries: Optional[List[Delivery]] = None) -> List[bool]:
        self._check()
        if self.refuse_claims:
            raise TransportError("memory: claim refused")
        answered = {k for k, _ in self.results}
        return [key not in answered for key in keys]

    def write(self, writes: Writes) -> None:
        self._check()
        self.writes += 1
        for key, raw, delivery in writes.results:
            self.results.append((key, raw))
            if delivery is not None:
                self.written_at.setdefault(delivery.token, self.writes)
                if not self.settles_later:
                    self._settle(delivery)
        for state, due, delivery in writes.retries:
            queue = delivery.queue if delivery is not None else orjson.loads(state).get("queue", "")
            self.retry_set.append((due, state, queue))
            if delivery is not None:
                self._settle(delivery)
        for entry, delivery in writes.dead_letters:
            self.dead_letters.append(entry)
            if delivery is not None and not self.settles_later:
                self._settle(delivery)
        for delivery in writes.drops:
            self._settle(delivery)

    def _settle(self, delivery: Delivery) -> None:
        self.settled.append(delivery)
        self.settled_at.setdefault(delivery.token, self.writes)

    def cancellations(self, now: float) -> Tuple[FrozenSet[str], FrozenSet[str]]:
        self._check()
        return self.cancelled_batches, self.cancelled_ids

    def stats(self) -> Dict[str, Dict[str, float]]:
        return {"depth": {q: float(len(lined)) for q, lined in self.queues.items()},
                "retry_set": {q: float(sum(1 for _, _, rq in self.retry_set if rq == q)) for q in self.queues}}

    def ping(self) -> None:
        self._check()
