"""The seed's transport: requests on Redis channels, retries in a sorted set, results PUBLISHed.

Pub/sub keeps nothing for an absent subscriber, so this transport drains its subscription
every tick (Redis drops a subscriber whose output buffer grows too large) and the
supervisor stages what it cannot dispatch soon: its record (below) moves from `held` to
`staged`, scored by when it was received, and claim_due hands it out again as it came.

Once a message has reached us, Redis has it again before we depend on our memory: the
claim of its id at intake also records it under a lease (`held`, in the result queue's
slot), kept alive while we hold it, dropped when its result is published or its retry
written. Retries are taken from the retry set by lease too. A holder that dies (kill -9),
or a reply lost with the connection, leaves records whose leases run out; the next
claim_due (this process restarted, or another replica) takes them up and finishes them.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING, List, Optional, Sequence

import redis

from asyncproc.transports.base import Delivery, Transport, TransportError, Writes
from asyncproc.transports.keys import pubsub_key, pubsub_marker
from asyncproc.transports.markers import Markers
from asyncproc.transports.redisbase import (
    RETRIES_IDLE_SECONDS,
    SOCKET_TIMEOUT,
    arriving,
    describe,
    group_by_destination,
    guarded,
    make_client,
    read_cancellations,
)
from asyncproc.transports.retryset import RetrySet, in_pipeline, load_script, preload

if TYPE_CHECKING:
    from asyncproc.config import RedisConfig

log = logging.getLogger("asyncproc.redis")

REPLY_COMPLETION = 1.0  # seconds the rest of a partly arrived reply may take
CLAIM_CALL_BYTES = 8 * 1024 * 1024  # messages recorded per claim call, at most (Redis's query buffer)


class Held:
    """The token of a message taken from a channel: its id key once claim() recorded it
    (None: not ours, nothing to settle)."""

    __slots__ = ("key",)

    def __init__(self, key: Optional[str] = None) -> None:
        self.key = key


def encode_record(queue: str, raw: bytes) -> bytes:
    """The held message as Redis keeps it: `<len(queue)>:<queue><message>`."""
    name = queue.encode()
    return b"%d:%s%s" % (len(name), name, raw)


def decode_record(record: bytes) -> tuple:
    """(queue, message) of a held record; ("", record) if it is not one of ours."""
    size, sep, rest = record.partition(b":")
    if not sep or not size.isdigit() or int(size) > len(rest):
        return "", record
    return rest[:int(size)].decode("utf-8", "replace"), rest[int(size):]


class RedisPubSub(Transport):
    must_drain = True
    restages = True  # overflow stays in its intake record, moved to `staged`

    def __init__(self, config: RedisConfig, queues: Sequence[str], max_message_bytes: int) -> None:
        self.channels = list(queues)
        self.result_channel = config.result_queue
        self.dead_letter_key = config.dead_letter_queue
        self._client = make_client(config.url, config.auth, cluster=config.cluster)
        self._retries = RetrySet(self._client, config.retry_queue, config.key_prefix)
        self.lease_seconds = config.lease_seconds
        self.keep_alive_interval = config.lease_seconds / 3
        self._max_record = max_message_bytes
        self._held = pubsub_key(config.key_prefix, config.result_queue, "held")
        self._held_messages = pubsub_key(config.key_prefix, config.result_queue, "held-messages")
        self._staged = pubsub_key(config.key_prefix, config.result_queue, "staged")
        self._pubsub: Optional[redis.client.PubSub] = None
        self._prefix = config.key_prefix
        self._result_queue = config.result_queue
        self._claims = config.claim
        self._claim_ttl = int(config.claim_ttl)
        self._window = int(config.result_dedupe_window)
        self._owner = f"{socket.gethostname()}:{os.getpid()}"
        self._claim_script = self._client.register_script(load_script("claim_ids.lua"))
        self._publish_script = self._client.register_script(load_script("publish_results.lua"))
        self._take_back_script = self._client.register_script(load_script("held_take_back.lua"))
        self.markers = Markers(self._client)
        # The retry set had nothing due when last asked: `claim_due` asks it again from this
        # time (or once this process writes a retry), not every tick of a staged backlog.
        self._retries_idle_until = 0.0

    def connect(self) -> None:
        self._close_pubsub()
        try:
            self._client.ping()
            preload(self._client, self._publish_script, self._claim_script)
            self.markers.preload(self._client)
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(*self.channels)
            # Read the subscribe confirmations so the subscription is live when we return.
            confirmed = 0
            while confirmed < len(self.channels):
                reply = pubsub.parse_response(block=True, timeout=SOCKET_TIMEOUT)
                if reply is None:
                    raise TransportError("no reply to SUBSCRIBE")
                if reply[0] in (b"subscribe", "subscribe"):
                    confirmed += 1
            self._pubsub = pubsub
        except (redis.RedisError, OSError) as exc:
            raise TransportError(describe(exc)) from None

    def receive(self, limit: int) -> List[Delivery]:
        """Every message already arriving on the socket, up to `limit`, without waiting for
        new ones (a reply partly here gets up to REPLY_COMPLETION seconds: redisbase.arriving)."""
        if self._pubsub is None:
            raise TransportError("not subscribed")
        out: List[Delivery] = []
        try:
            for message in arriving(self._pubsub, limit, REPLY_COMPLETION):
                channel = message["channel"]
                out.append(Delivery(message["data"], channel.decode() if isinstance(channel, bytes) else channel,
                                    token=Held()))
        except (redis.RedisError, OSError) as exc:
            self._close_pubsub()
            if not self._dropped_by_redis(exc):
                log.warning("subscription read failed: %s: %s", type(exc).__name__, exc)
                if out:
                    return out
                raise TransportError(f"subscription lost: {describe(exc)}") from None
            try:
                self.connect()  # at once: every moment unsubscribed loses what is published
            except TransportError:
                if not out:
                    raise
        return out

    def _dropped_by_redis(self, exc: Exception) -> bool:
        """The subscription broke but Redis answers: Redis closed it, almost always for its
        pub/sub output buffer limit (a huge message, or a backlog we did not read fast
        enough). What Redis held for us is gone; say so once, at ERROR, and count it."""
        try:
            self._client.ping()
        except (redis.RedisError, OSError):
            return False
        self.subscriber_drops += 1
        try:
            limit = self._client.config_get("client-output-buffer-limit").get("client-output-buffer-limit", "")
            pubsub_limit = " ".join(limit.split("pubsub", 1)[1].split()[:3]) if "pubsub" in limit else "?"
        except (redis.RedisError, OSError):
            pubsub_limit = "?"  # CONFIG may be disabled (managed Redis)
        log.error("Redis closed the subscription to %s (%s: %s) while it still answers commands: most"
                  " likely its pub/sub output buffer limit (client-output-buffer-limit pubsub %s) was"
                  " passed by a message too large or a backlog; what Redis held for us is lost;"
                  " subscribing again", ",".join(self.channels), type(exc).__name__, str(exc)[:200],
                  pubsub_limit)
        return True

    def claim_due(self, now: float, limit: int) -> List[Delivery]:
        """Due retries, then held messages taken back: those whose holder let the lease run
        out (it died), then those staged, oldest first; each under a new lease. Retries
        first: a backlog of staged messages must not hold back a retry that is due (one
        that comes due while the retry set is left alone waits RETRIES_IDLE_SECONDS at most)."""
        until = now + self.lease_seconds
        if limit <= 0:
            return []
        try:
            members: List[bytes] = []
            if now >= self._retries_idle_until:
                members = self._retries.claim_due(now, until, limit)
                self._retries_idle_until = 0.0 if members else now + RETRIES_IDLE_SECONDS
            out = [Delivery(m, "", token=("retry", m), state=m) for m in members]
            flat = self._take_back_script(keys=[self._held, self._staged, self._held_messages],
                                          args=[repr(now), repr(until), limit - len(out)]) if limit > len(out) else [0]
        except (redis.RedisError, OSError) as exc:
            raise TransportError(describe(exc)) from None
        if flat[0]:
            log.warning("taking up %d messages whose holder let their lease run out", flat[0])
        for i in range(1, len(flat), 3):
            queue, raw = decode_record(flat[i + 1] or b"")
            out.append(Delivery(raw, queue, token=Held(flat[i].decode()), received=float(flat[i + 2]) if flat[i + 2] else None))
        return out

    def claim(self, keys: List[str], deliveries: List[Delivery]) -> List[bool]:
        """Claim each id (one replica processes it) and record its message under a lease,
        in calls of at most CLAIM_CALL_BYTES. A message over --max-message-bytes is answered
        at once without being parsed; its record holds no copy (taken up after a crash, it
        is dead-lettered)."""
        if not keys:
            return []
        until = repr(time.time() + self.lease_seconds)
        flags: List[int] = []
        start = 0
        while start < len(keys):
            redis_keys = [self._held, self._held_messages]
            args = [self._owner, self._claim_ttl, until, "1" if self._claims else "0"]
            size, end = 0, start
            while end < len(keys) and (end == start or size < CLAIM_CALL_BYTES):
                key, delivery = keys[end], deliveries[end]
                raw = delivery.raw if len(delivery.raw) <= self._max_record else b""
                redis_keys += [self._marker("claim", key), self._marker("done", key)]
                args += [key, encode_record(delivery.queue, raw)]
                size += len(raw)
                end += 1
            try:
                flags += self._claim_script(keys=redis_keys, args=args)
            except (redis.RedisError, OSError) as exc:
                raise TransportError(describe(exc)) from None
            start = end
        for flag, key, delivery in zip(flags, keys, deliveries):
            if flag and isinstance(delivery.token, Held):
                delivery.token.key = key
        return [bool(flag) for flag in flags]

    def write(self, writes: Writes) -> None:
        held: List[str] = []      # intake records to drop: what replaces them is written
        taken: List[bytes] = []   # retry-set leases to drop
        for delivery in [d for _, _, d in writes.retries] + [d for _, d in writes.dead_letters] + writes.drops:
            token = delivery.token if delivery is not None else None
            if isinstance(token, tuple):
                taken.append(token[1])
            elif isinstance(token, Held) and token.key is not None:
                held.append(token.key)
        for _, _, delivery in writes.results:   # a result's record: the publish script drops it
            if delivery is not None and isinstance(delivery.token, tuple):
                taken.append(delivery.token[1])
        for delivery in writes.drops:  # a duplicate of an id held here: its record stays
            if delivery is not None and isinstance(delivery.token, Held) and delivery.token.key in held:
                held.remove(delivery.token.key)
        if not (writes.results or writes.retries or writes.dead_letters or held or taken or writes.staged):
            return
        try:
            # Not MULTI: the keys live in different slots on a cluster, and every part is
            # safe to repeat (results are deduplicated, ZADD and ZREM are idempotent). The
            # records go last, after what replaces them, on the same connection.
            pipe = self._client.pipeline(transaction=False)
            for channel, items in group_by_destination(writes.results, writes.routes, self.result_channel).items():
                args = [self._window, channel]
                for key, raw, _ in items:
                    args += [key, raw]
                in_pipeline(self._publish_script, pipe,
                            [self._held, self._held_messages,
                             *(self._marker("done", key) for key, _, _ in items)], args)
            self.markers.release(pipe, (writes.routes.get(k) for k, _, _ in writes.results))
            self._retries.add(pipe, [(state, due) for state, due, _ in writes.retries])
            if writes.retries:
                self._retries_idle_until = 0.0   # ours may be due at once (put back, overflow)
            if writes.dead_letters:
                pipe.rpush(self.dead_letter_key, *(entry for entry, _ in writes.dead_letters))
            if held:
                pipe.zrem(self._held, *held)
                pipe.hdel(self._held_messages, *held)
            staged = {d.token.key: received for d, received in writes.staged
                      if isinstance(d.token, Held) and d.token.key is not None}
            if staged:  # staged before it stops being held: a crash between leaves it in both, not neither
                pipe.zadd(self._staged, staged)
                pipe.zrem(self._held, *staged)
            self._retries.settle(pipe, taken)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            raise TransportError(describe(exc)) from None

    def keep_alive(self, deliveries: List[Delivery]) -> None:
        until = time.time() + self.lease_seconds
        held = [d.token.key for d in deliveries if isinstance(d.token, Held) and d.token.key is not None]
        taken = [d.token[1] for d in deliveries if isinstance(d.token, tuple)]
        pipe = self._client.pipeline(transaction=False)
        if held:
            pipe.zadd(self._held, {key: until for key in held}, xx=True, gt=True)
        self._retries.extend(pipe, taken, until)
        if held or taken:
            guarded(pipe.execute)

    def _marker(self, kind: str, key: str) -> str:
        # claim and done markers of one result queue share a hash tag (one Redis Cluster slot)
        return pubsub_marker(self._prefix, self._result_queue, kind, key)

    def cancellations(self, now: float):
        return guarded(lambda: read_cancellations(self._client, self._prefix, now))

    def cancelled_tokens(self, pairs):
        return guarded(lambda: self.markers.cancelled(pairs))

    def stats(self):
        try:
            waiting, taken = self._retries.sizes()
            held, staged = self._client.zcard(self._held), self._client.zcard(self._staged)
        except (redis.RedisError, OSError) as exc:
            raise TransportError(describe(exc)) from None
        return {"retry_set": {self._retries.key: waiting, self._staged: staged},
                "leased": {self.result_channel: held + taken}}

    def ping(self) -> None:
        try:
            self._client.ping()
        except (redis.RedisError, OSError) as exc:
            raise TransportError(describe(exc)) from None

    def fileno(self) -> Optional[int]:
        conn = self._pubsub.connection if self._pubsub is not None else None
        sock = getattr(conn, "_sock", None)
        return sock.fileno() if sock is not None else None

    def _close_pubsub(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except (redis.RedisError, OSError):
                pass
            self._pubsub = None

    def close(self) -> None:
        self._close_pubsub()
        self._client.close()
