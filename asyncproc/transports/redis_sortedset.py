"""Requests as members of a Redis sorted set scored by deadline (earliest first); results
RPUSHed to a list (LPUSHed with --result-format llm-d-async, as llm-d-async does, so its
BRPOP consumers read them in order). Claims move members atomically into a lease set; a finished member is
removed only after its result is written; an expired lease (its holder died) puts the
member back in play. Retries wait in the lease set until their due time.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Dict, List, Sequence

from asyncproc.transports.base import Delivery, Transport, Writes
from asyncproc.transports.leases import LeaseSet
from asyncproc.transports.markers import Markers
from asyncproc.transports.redisbase import (
    Replication,
    Resharding,
    ResultWriter,
    by_queue,
    execute,
    group_by_destination,
    guarded,
    make_client,
    read_cancellations,
    refresh,
)

if TYPE_CHECKING:
    from asyncproc.config import RedisConfig


def shares(names: List[str], limit: int, start: int) -> List[tuple]:
    """Spread `limit` over the queues, starting from a rotating one so none starves."""
    if not names:
        return []
    order = names[start % len(names):] + names[:start % len(names)]
    base, extra = divmod(limit, len(order))
    return [(name, base + (1 if i < extra else 0)) for i, name in enumerate(order)]


class RedisSortedSet(Transport):
    must_drain = False
    settles_later = True

    def __init__(self, config: RedisConfig, queues: Sequence[str], result_format: str = "seed") -> None:
        self._client = make_client(config.url, config.auth, cluster=config.cluster)
        self._prefix = config.key_prefix
        self.lease_seconds = config.lease_seconds
        self.keep_alive_interval = config.lease_seconds / 3
        self.sets: Dict[str, LeaseSet] = {
            q: LeaseSet(self._client, config.key_prefix, q, ready_key=q) for q in queues
        }
        mode = "lpush" if result_format == "llm-d-async" else "list"
        self.results = ResultWriter(self._client, config.key_prefix, config.result_queue, mode,
                                    config.result_dedupe_window)
        self.markers = Markers(self._client)
        self.dead_letter_key = config.dead_letter_queue
        self._turn = 0
        self._resharding = Resharding()
        self._replication = Replication(self._client, config.wait_replicas, config.wait_timeout)

    def connect(self) -> None:
        def run() -> None:
            refresh(self._client)
            self.results.preload(self._client)
            self.markers.preload(self._client)

        guarded(run)

    def _claim(self, now: float, limit: int, take_new: bool) -> List[Delivery]:
        out: List[Delivery] = []
        self._turn += 1
        for queue, share in shares(list(self.sets), limit, self._turn):
            if share <= 0:
                continue
            pairs = self._resharding.claim(queue, lambda q=queue, n=share: self.sets[q].claim(
                self._client, now, now + self.lease_seconds, n, take_new))
            out.extend(Delivery(member, queue, token=member, state=state) for member, state in pairs)
        if out:  # a claim a failover loses only hands its work out twice: not strict
            guarded(lambda: self._replication.confirm({d.queue for d in out}, strict=False))
        return out

    def receive(self, limit: int) -> List[Delivery]:
        """Due leases (retries, abandoned work) first, then new members: one script call."""
        return self._claim(time.time(), limit, take_new=True)

    def claim_due(self, now: float, limit: int) -> List[Delivery]:
        return []  # receive() takes what is due, in the same script

    def write(self, writes: Writes) -> None:
        """One pipeline: results, dead letters, retries and the drops. The deliveries of the
        results and dead letters are settled by the next write (`settles_later`): settled in
        this pipeline, a results write Redis refuses (NOSCRIPT, a full memory) would still
        let its requests go."""
        def run() -> None:
            pipe = self._client.pipeline(transaction=False)
            self.results.add(pipe, writes.results, writes.routes)
            if writes.dead_letters:
                pipe.rpush(self.dead_letter_key, *(entry for entry, _ in writes.dead_letters))
            self.markers.release(pipe, (writes.routes.get(k) for k, _, _ in writes.results))
            for queue, items in by_queue(writes.retries, lambda item: item[2]).items():
                for state, due, delivery in items:
                    self.sets[queue].retry(pipe, delivery.token, state, due)
            for queue, deliveries in by_queue(writes.drops, lambda d: d).items():
                self.sets[queue].settle(pipe, (d.token for d in deliveries))
            touched = {d.queue for d in writes.drops if d is not None} | {d.queue for _, _, d in writes.retries if d}
            # what replaces a request is written (and replicated, if asked) before a later write settles it
            execute(pipe, self._replication, list(group_by_destination(writes.results, writes.routes, self.results.key))
                    + [self.dead_letter_key] * bool(writes.dead_letters) + sorted(touched & set(self.sets)))

        guarded(run)

    def keep_alive(self, deliveries: List[Delivery]) -> None:
        until = time.time() + self.lease_seconds
        pipe = self._client.pipeline(transaction=False)
        for queue, held in by_queue(deliveries, lambda d: d).items():
            self.sets[queue].extend(pipe, (d.token for d in held), until)
        guarded(pipe.execute)

    def cancellations(self, now: float):
        return guarded(lambda: read_cancellations(self._client, self._prefix, now))

    def cancelled_tokens(self, pairs):
        return guarded(lambda: self.markers.cancelled(pairs))

    def stats(self):
        def run():
            pipe = self._client.pipeline(transaction=False)
            for queue, lease_set in self.sets.items():
                pipe.zcard(queue)
                pipe.zcard(lease_set.leases)
            counts = pipe.execute()
            names = list(self.sets)
            return {
                "depth": {q: counts[2 * i] for i, q in enumerate(names)},
                "leased": {q: counts[2 * i + 1] for i, q in enumerate(names)},
            }

        return guarded(run)

    def ping(self) -> None:
        guarded(self._client.ping)

    def close(self) -> None:
        self._client.close()
