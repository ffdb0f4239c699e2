"""Intake, the books' side of reading: what to take from the queue system each tick (what
waits unclaimed, new deliveries, due retries from the retry set) as far as there is room,
each id claimed (one replica processes it), and, on a transport that must be drained
(pub/sub), overflow staged so memory stays bounded; the leases of what is held kept alive.
The books accept what is ours (books.py).

The clock is passed in. The supervisor owns the connection: it hands in how to flush and
whom to tell a TransportError (it reconnects).
"""
from __future__ import annotations

import heapq
import logging
import math
from typing import Callable, Dict, List, Optional, Set

from asyncproc import cancelwatch, messages, metrics
from asyncproc.books import Books
from asyncproc.messages import DeadLetter, Request
from asyncproc.timers import Backoff, Timer
from asyncproc.transports import Delivery, Transport, TransportError

log = logging.getLogger("asyncproc.supervisor")

RECEIVE_BATCH = 2000         # messages read from the transport per tick, at most
RETRY_POLL_SECONDS = 0.1     # how often the queues and the retry set are asked while that finds work,
IDLE_POLL_SECONDS = 1.0      # and at most this long apart (doubling) while it finds nothing
OWN_DUE_MAX = 10_000         # due times of our own retries remembered, at most (one per RETRY_POLL_SECONDS)


class Intake:
    def __init__(self, transport: Transport, books: Books, metrics_: metrics.Metrics, capacity: int) -> None:
        self.transport = transport
        self.books = books
        self.metrics = metrics_
        self.capacity = capacity             # held at most: --concurrency + --intake-buffer
        self.retry_poll = Timer()            # when to ask next (poll_now on (re)connect)
        self.poll_wait = Backoff(RETRY_POLL_SECONDS, IDLE_POLL_SECONDS)
        self.own_due: List[float] = []       # heap: when retries this process wrote fall due
        self._own_slots: Set[float] = set()
        self.more_to_read = False            # the last read was a full batch: do not sleep
        self.unclaimed: List[tuple] = []     # (parsed, delivery) read while the claim failed
        self.subscriber_drops = 0            # the transport's count, last seen
        self.lease_renewal = Timer(transport.keep_alive_interval)

    def step(self, now: float, flush: Callable[[], bool], down: Callable[[Exception], None]) -> None:
        """New messages and due retries, as far as there is room (pub/sub: drain it all).
        `flush` writes the outbox and says whether the queue system still answers; `down`
        is told a TransportError."""
        books, transport = self.books, self.transport
        if self.unclaimed:
            if not flush():  # results first: a claim that keeps failing must not hold them back
                return
        try:
            if self.unclaimed:
                self.claim_and_accept([])
            if transport.must_drain:
                deliveries = transport.receive(RECEIVE_BATCH)
                self.more_to_read = len(deliveries) == RECEIVE_BATCH
                room = self.capacity - len(books.ledger) if transport.restages else None
                self.accept_new(deliveries, now, room)
            room = self.capacity - len(books.ledger)
            if room > 0 and self.retry_poll.due(now):
                claimed = transport.claim_due(now, room)
                for delivery in claimed:
                    books.isolation.run("retry", None, delivery, books.accept_retry, delivery, now)
                room -= len(claimed)
                found = bool(claimed)
                if room > 0 and not transport.must_drain:
                    deliveries = transport.receive(room)
                    self.accept_new(deliveries, now)
                    room -= len(deliveries)
                    found = found or bool(deliveries)
                self.retry_poll.set(now if room <= 0 else self.next_poll(now, found))
        except TransportError as exc:
            down(exc)
        drops = transport.subscriber_drops
        if drops != self.subscriber_drops:
            self.metrics.subscriber_dropped.inc(drops - self.subscriber_drops)
            self.subscriber_drops = drops
        if transport.must_drain:
            self.stage_overflow(now)
        self.expect_own(now)

    # -- claiming what is read ---------------------------------------------------------------
    def accept_new(self, deliveries: List[Delivery], now: float, room: Optional[int] = None) -> None:
        """Parse a batch, claim its ids (one replica processes each), accept what is ours.
        With `room` (a transport that restages: pub/sub), a plain message beyond it is
        claimed by its id alone and staged as it came, to be parsed when taken back
        (messages.Unparsed). Raises TransportError when the claim fails (what was read waits
        unclaimed)."""
        books = self.books
        fresh = []
        for delivery in deliveries:
            if delivery.state is not None:  # a due retry handed over with new work
                books.isolation.run("retry", None, delivery, books.accept_retry, delivery, now)
            else:
                fresh.append(delivery)
        if not fresh:
            return
        received: Dict[str, int] = {}
        pairs = []
        for delivery in fresh:
            received[delivery.queue] = received.get(delivery.queue, 0) + 1
            if room is not None and len(pairs) >= room:
                id_value = messages.plain_id(delivery.raw, books.limits.max_bytes)
                if id_value is not None:
                    pairs.append((messages.Unparsed(id_value, delivery.queue, now), delivery))
                    continue
            item = books.isolation.parse(delivery, now, books.limits)
            if isinstance(item, DeadLetter):
                books.isolation.run("accept", item, delivery, books.accept, item, delivery)
            else:
                pairs.append((item, delivery))
        for queue, count in received.items():
            self.metrics.of(self.metrics.received, queue).inc(count)
        self.check_markers([item for item, _ in pairs if isinstance(item, Request)])
        try:
            self.claim_and_accept(pairs)
        finally:
            books.marked.clear()  # what was not accepted now (claimed elsewhere, claim failed) is checked later

    def check_markers(self, requests: List[Request]) -> None:
        """llm-d-async's cancel markers of arriving requests, one read (best effort: the
        check just before dispatch is the one that counts)."""
        books = self.books
        tokened = cancelwatch.with_tokens(requests)
        if not tokened:
            return
        try:
            hits = self.transport.cancelled_tokens([cancelwatch.marker_query(r) for r in tokened])
        except TransportError:
            return
        books.marked.update(r.key for r, hit in zip(tokened, hits) if hit)

    def claim_and_accept(self, pairs: List[tuple]) -> None:
        """Claim the ids (one replica processes each; pub/sub also records each message in
        Redis), then accept what is ours. If the claim fails, they wait unclaimed for the
        reconnect and TransportError is raised: nothing read is processed before the queue
        system has it."""
        books = self.books
        pairs = self.unclaimed + pairs
        self.unclaimed = []
        if not pairs:
            return
        try:
            ours = books.isolation.claim(self.transport, pairs)
        except TransportError:
            self.unclaimed = pairs
            raise
        for (item, delivery), mine in zip(pairs, ours):
            if mine and isinstance(item, messages.Unparsed):
                books.isolation.run("accept", None, delivery, self.stage_unparsed, item, delivery)
            elif mine:
                books.isolation.run("accept", item, delivery, books.accept, item, delivery)
            else:
                self.metrics.of(self.metrics.skipped, item.queue, "claimed-or-done").inc()
                log.debug("id=%s is claimed by another replica or already answered", item.key,
                          extra={"id": item.id})

    def stage_unparsed(self, item: messages.Unparsed, delivery: Delivery) -> None:
        """Ours, with no room to hold it: staged as it came (Writes.staged), parsed when
        taken back. A duplicate of an id held here, or one a cancellation in force may
        cover, is parsed and accepted now instead (staging moves the id's record)."""
        books = self.books
        if books.ledger.holds(item.key) or books.cancelled.batches or books.cancelled.ids:
            books.accept(books.isolation.parse(delivery, item.received_at, books.limits), delivery)
            return
        books.outbox.staged.append((delivery, item.received_at))
        self.metrics.of(self.metrics.staged, item.queue).inc()

    def release_unclaimed(self) -> None:
        """Draining: what was read but never claimed is accepted, to be put back with the rest."""
        books = self.books
        for item, delivery in self.unclaimed:
            if isinstance(item, messages.Unparsed):
                item = books.isolation.parse(delivery, item.received_at, books.limits)
            books.isolation.run("accept", item, delivery, books.accept, item, delivery)
        self.unclaimed = []

    def poll_now(self) -> None:
        """Ask at once, and every RETRY_POLL_SECONDS while that finds work ((re)connected)."""
        self.retry_poll.set(0.0)
        self.poll_wait.reset()

    def next_poll(self, now: float, found: bool) -> float:
        """When to ask next: RETRY_POLL_SECONDS from now while asking finds work, backing off
        while it does not, but never after a retry this process wrote falls due."""
        at = now + self.poll_wait.after(found)
        own = self.own_due
        while own and own[0] <= now:
            self._own_slots.discard(heapq.heappop(own))
        return min(at, own[0]) if own else at

    def expect_own(self, now: float) -> None:
        """Retries this process is about to write are asked for when due, and staged overflow
        at once, however far polling has backed off. Due times are kept to the next
        RETRY_POLL_SECONDS step, OWN_DUE_MAX at most: past that, a retry of ours is found
        like another replica's, IDLE_POLL_SECONDS late at most."""
        outbox = self.books.outbox
        if outbox.staged:
            self.retry_poll.set(min(self.retry_poll.at, now))
        for _, due, _ in outbox.retries:
            slot = math.ceil(due / RETRY_POLL_SECONDS) * RETRY_POLL_SECONDS
            if slot not in self._own_slots and len(self.own_due) < OWN_DUE_MAX:
                self._own_slots.add(slot)
                heapq.heappush(self.own_due, slot)
        if self.own_due and self.own_due[0] < self.retry_poll.at:
            self.retry_poll.set(max(self.own_due[0], now))

    def stage_overflow(self, now: float) -> None:
        """Keep memory bounded: what exceeds capacity waits in Redis, due now. A message
        never dispatched goes back as it came when the transport kept it (`restages`:
        nothing to encode, and its record stays); anything else goes to the retry set."""
        ledger, outbox = self.books.ledger, self.books.outbox
        excess = len(ledger) - self.capacity
        waiting = ledger.waiting_by_queue
        restages = self.transport.restages
        while excess > 0 and waiting:
            queue = max(waiting, key=lambda q: len(waiting[q]))
            if not waiting[queue]:
                return
            entry = ledger.take_last(queue)
            delivery = entry.delivery
            if restages and not entry.dispatched_at and delivery is not None and delivery.state is None:
                outbox.staged.append((delivery, entry.request.received_at))
            else:
                outbox.retries.append((messages.encode_state(entry.request), now, delivery))
            self.metrics.of(self.metrics.staged, queue).inc()
            excess -= 1

    def keep_alive(self, now: float) -> None:
        """Extend the leases of everything held, so no other replica takes it over. Raises
        TransportError."""
        if self.transport.keep_alive_interval is None or not self.lease_renewal.every(now):
            return
        held = self.books.ledger.deliveries()
        if held:
            self.transport.keep_alive(held)
