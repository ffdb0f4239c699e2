"""Requests as entries of a Redis stream (one field `message`), read with a consumer group.

A result is XADDed to the result stream and its entry acknowledged in one MULTI. Entries
pending on a dead consumer are taken over with XAUTOCLAIM once idle for the lease time;
live ones are kept from being stolen by touching them (XCLAIM JUSTID resets idle time
without counting a delivery). An entry delivered more than --max-deliveries times goes to
the dead-letter stream. A retry acknowledges the entry and keeps its state in the queue's
lease set until due, so retries survive any crash too.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import orjson
import redis

from asyncproc.transports.base import Delivery, Transport, Writes
from asyncproc.transports.leases import LeaseSet
from asyncproc.transports.markers import Markers
from asyncproc.transports.redis_sortedset import shares
from asyncproc.transports.redisbase import (
    RETRIES_IDLE_SECONDS,
    Replication,
    Resharding,
    ResultWriter,
    by_queue,
    execute,
    group_by_destination,
    guarded,
    is_cluster,
    make_client,
    owner_name,
    read_cancellations,
    refresh,
)

if TYPE_CHECKING:
    from asyncproc.config import RedisConfig

log = logging.getLogger("asyncproc.redis")

ENTRY, LEASE = b"e", b"l"  # token kinds: a stream entry id, or a member of the lease set
FIELD = b"message"
DEPTH_COUNT_CAP = 1000


class RedisStreams(Transport):
    must_drain = False

    def __init__(self, config: RedisConfig, queues: Sequence[str]) -> None:
        self._client = make_client(config.url, config.auth, cluster=config.cluster)
        self._prefix = config.key_prefix
        self.group = config.consumer_group
        self.consumer = owner_name()
        self.lease_seconds = config.lease_seconds
        self.keep_alive_interval = config.lease_seconds / 3
        self.max_deliveries = config.max_deliveries
        self.sets: Dict[str, LeaseSet] = {
            q: LeaseSet(self._client, config.key_prefix, q, ready_key=None) for q in queues
        }
        self.results = ResultWriter(self._client, config.key_prefix, config.result_queue, "stream",
                                    config.result_dedupe_window, config.result_maxlen)
        self.markers = Markers(self._client)
        self.dead_letter_key = config.dead_letter_queue
        self._turn = 0
        self._autoclaim_at = 0.0
        self._leases_idle_until = 0.0   # the lease sets found nothing due: left alone until then
        self._resharding = Resharding()
        self._replication = Replication(self._client, config.wait_replicas, config.wait_timeout)
        # One MULTI for results and acknowledgements needs them in one slot; on a cluster
        # they are written in two steps, results first (a repeat is deduplicated).
        self._atomic = not is_cluster(self._client)

    def connect(self) -> None:
        def run() -> None:
            refresh(self._client)
            self.results.preload(self._client)
            self.markers.preload(self._client)
            for queue in self.sets:
                try:
                    # from the start: entries added before the group existed are work too
                    self._client.xgroup_create(queue, self.group, id="0", mkstream=True)
                    log.info("created consumer group %s on stream %s", self.group, queue)
                except redis.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

        guarded(run)

    # -- intake --------------------------------------------------------------------------
    def receive(self, limit: int) -> List[Delivery]:
        out: List[Delivery] = []
        self._turn += 1
        for queue, share in shares(list(self.sets), limit, self._turn):
            if share <= 0:
                continue
            reply = guarded(lambda q=queue, n=share: self._client.xreadgroup(
                self.group, self.consumer, {q: ">"}, count=n))
            for _stream, entries in reply or []:
                out.extend(self._delivery(queue, entry_id, fields) for entry_id, fields in entries)
        if out:  # a claim a failover loses only hands its work out twice: not strict
            guarded(lambda: self._replication.confirm({d.queue for d in out}, strict=False))
        return out

    @staticmethod
    def _delivery(queue: str, entry_id: bytes, fields: Optional[dict]) -> Delivery:
        raw = (fields or {}).get(FIELD)
        if raw is None:  # not asyncproc's shape: keep what there is for the dead letter
            raw = orjson.dumps({k.decode(errors="replace"): v.decode(errors="replace")
                                for k, v in (fields or {}).items()})
        return Delivery(raw, queue, token=(ENTRY, entry_id))

    def claim_due(self, now: float, limit: int) -> List[Delivery]:
        """Due retries and expired leases, then entries a dead consumer left. Lease sets that
        had nothing due are left alone for RETRIES_IDLE_SECONDS (while a backlog keeps the
        intake asking every tick), unless this process wrote a retry since."""
        out: List[Delivery] = []
        if now >= self._leases_idle_until:
            for queue, lease_set in self.sets.items():
                pairs = self._resharding.claim(queue, lambda ls=lease_set, n=limit - len(out): ls.claim(
                    self._client, now, now + self.lease_seconds, n, take_new=False))
                out.extend(Delivery(b"", queue, token=(LEASE, m), state=state) for m, state in pairs)
            self._leases_idle_until = 0.0 if out else now + RETRIES_IDLE_SECONDS
        if now >= self._autoclaim_at and len(out) < limit:
            self._autoclaim_at = now + self.lease_seconds / 2
            for queue in self.sets:
                out.extend(guarded(lambda q=queue, n=limit - len(out): self._take_over(q, n)))
        return out

    def _take_over(self, queue: str, limit: int) -> List[Delivery]:
        """Entries idle past the lease time on any consumer (a dead one): ours now."""
        if limit <= 0:
            return []
        reply = self._client.xautoclaim(queue, self.group, self.consumer,
                                        int(self.lease_seconds * 1000), "0-0", count=limit)
        entries = [(i, f) for i, f in reply[1] if f is not None] if reply else []
        if not entries:
            return []
        pipe = self._client.pipeline(transaction=False)
        for entry_id, _ in entries:
            pipe.xpending_range(queue, self.group, entry_id, entry_id, 1)
        counts = [p[0]["times_delivered"] if p else 0 for p in pipe.execute()]
        out, dead = [], []
        for (entry_id, fields), count in zip(entries, counts):
            delivery = self._delivery(queue, entry_id, fields)
            if count > self.max_deliveries:
                dead.append((delivery, count))
            else:
                out.append(delivery)
        if dead:
            pipe = self._client.pipeline(transaction=self._atomic)
            for delivery, count in dead:
                log.warning("stream %s entry %s delivered %d times; dead-lettering it", queue,
                            delivery.token[1].decode(), count)
                pipe.xadd(self.dead_letter_key, {
                    FIELD: delivery.raw, b"reason": f"delivered {count} times (max {self.max_deliveries})",
                    b"queue": queue, b"entry": delivery.token[1]})
            if not self._atomic:  # the dead letters first, then what they replace
                execute(pipe, self._replication, [self.dead_letter_key])
                pipe = self._client.pipeline(transaction=False)
            pipe.xack(queue, self.group, *(delivery.token[1] for delivery, _ in dead))
            execute(pipe, self._replication, [queue, self.dead_letter_key])
        log.info("took over %d entries of %s from consumers that went silent", len(out), queue)
        return out

    # -- settling ------------------------------------------------------------------------
    def write(self, writes: Writes) -> None:
        # results and acks: one atomic step (on a cluster two, results first)
        pipe = self._client.pipeline(transaction=self._atomic)
        self.results.add(pipe, writes.results, writes.routes)
        for entry, delivery in writes.dead_letters:
            pipe.xadd(self.dead_letter_key, {FIELD: entry, b"queue": delivery.queue if delivery else ""})
        written = (list(group_by_destination(writes.results, writes.routes, self.results.key))
                   + [self.dead_letter_key] * bool(writes.dead_letters))
        if not self._atomic and written:
            guarded(lambda p=pipe: execute(p, self._replication, written))
            pipe = self._client.pipeline(transaction=False)
        touched = set(written)
        if writes.retries:
            self._leases_idle_until = 0.0   # ours may be due at once (put back)
        for queue, items in by_queue(writes.retries, lambda item: item[2]).items():
            lease_set = self.sets[queue]
            for state, due, delivery in items:
                kind, ident = delivery.token
                lease_set.retry(pipe, ident, state, due)  # the retry (same slot) before the ack
                if kind == ENTRY:
                    pipe.xack(queue, self.group, ident)
                touched.add(queue)
        done = writes.drops + [d for _, _, d in writes.results] + [d for _, d in writes.dead_letters]
        for queue, deliveries in by_queue(done, lambda d: d).items():
            entries = [d.token[1] for d in deliveries if d.token[0] == ENTRY]
            if entries:
                pipe.xack(queue, self.group, *entries)
            self.sets[queue].settle(pipe, (d.token[1] for d in deliveries if d.token[0] == LEASE))
            touched.add(queue)
        guarded(lambda: execute(pipe, self._replication, touched))
        if writes.routes:  # apart: llm-d-async's markers live in slots of their own
            after = self._client.pipeline(transaction=False)
            self.markers.release(after, (writes.routes.get(k) for k, _, _ in writes.results))
            guarded(after.execute)

    def cancelled_tokens(self, pairs):
        return guarded(lambda: self.markers.cancelled(pairs))

    def keep_alive(self, deliveries: List[Delivery]) -> None:
        until = time.time() + self.lease_seconds
        pipe = self._client.pipeline(transaction=False)
        for queue, held in by_queue(deliveries, lambda d: d).items():
            entries = [d.token[1] for d in held if d.token[0] == ENTRY]
            if entries:  # resets idle time, not the delivery count: not taken over while alive
                pipe.xclaim(queue, self.group, self.consumer, 0, entries, justid=True)
            self.sets[queue].extend(pipe, (d.token[1] for d in held if d.token[0] == LEASE), until)
        guarded(pipe.execute)

    def cancellations(self, now: float):
        return guarded(lambda: read_cancellations(self._client, self._prefix, now))

    def stats(self):
        def run():
            depth, leased, oldest = {}, {}, {}
            now_ms = time.time() * 1000
            for queue, lease_set in self.sets.items():
                group = next((g for g in self._client.xinfo_groups(queue)
                              if g["name"] in (self.group, self.group.encode())), None)
                if group is None:
                    continue
                leased[queue] = group.get("pending", 0) + self._client.zcard(lease_set.leases)
                after = group["last-delivered-id"]
                after = after.decode() if isinstance(after, bytes) else after
                lag = group.get("lag")
                if lag is None:  # Redis without XINFO lag: count what is left, up to a cap
                    lag = len(self._client.xrange(queue, min=f"({after}", count=DEPTH_COUNT_CAP))
                first = self._client.xrange(queue, min=f"({after}", count=1)
                # nothing after the group's last id: none waiting, whatever `lag` says (Redis 7.0
                # may overstate it on a replica promoted by a failover)
                depth[queue] = lag if first else 0
                oldest[queue] = max(now_ms - int(first[0][0].split(b"-")[0]), 0) / 1000 if first else 0
            return {"depth": depth, "leased": leased, "oldest_age_seconds": oldest}

        return guarded(run)

    def ping(self) -> None:
        guarded(self._client.ping)

    def close(self) -> None:
        self._client.close()
