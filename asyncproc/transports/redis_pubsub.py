"""The seed's transport: requests on Redis channels, retries in a sorted set, results PUBLISHed.

Pub/sub keeps nothing for an absent subscriber, so this transport drains its subscription
every tick (Redis drops a subscriber whose output buffer grows too large) and the
supervisor stages what it cannot dispatch soon in the retry set.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import List, Optional

import redis

from asyncproc.transports.base import Delivery, Transport, TransportError, Writes
from asyncproc.transports.keys import pubsub_marker
from asyncproc.transports.redisbase import SOCKET_TIMEOUT, describe, guarded, make_client, read_cancellations
from asyncproc.transports.retryset import RetrySet, in_pipeline, load_script, preload

log = logging.getLogger("asyncproc.redis")

REPLY_COMPLETION = 1.0  # seconds the rest of a partly arrived reply may take


class RedisPubSub(Transport):
    must_drain = True

    def __init__(self, settings) -> None:
        self.channels = settings.queue_names
        self.result_channel = settings.result_queue
        self.dead_letter_key = settings.dead_letter_queue
        self._client = make_client(settings.redis_url, settings.redis_auth)
        self._retries = RetrySet(self._client, settings.retry_queue)
        self._pubsub: Optional[redis.client.PubSub] = None
        self._prefix = settings.key_prefix
        self._result_queue = settings.result_queue
        self._claims = settings.claim
        self._claim_ttl = int(settings.claim_ttl)
        self._window = int(settings.result_dedupe_window)
        self._owner = f"{socket.gethostname()}:{os.getpid()}"
        self._claim_script = self._client.register_script(load_script("claim_ids.lua"))
        self._publish_script = self._client.register_script(load_script("publish_results.lua"))

    def connect(self) -> None:
        self._close_pubsub()
        try:
            self._client.ping()
            preload(self._client, self._publish_script)
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
        except redis.RedisError as exc:
            raise TransportError(describe(exc)) from None

    def receive(self, limit: int) -> List[Delivery]:
        """Every message already arriving on the socket, up to `limit`, without waiting for
        new ones. A reply that has started to arrive gets up to REPLY_COMPLETION seconds to
        finish: get_message(timeout=0) would give it none, and redis-py answers that
        timeout by reconnecting, which drops everything Redis had buffered for us (seen
        in a burst on a busy machine)."""
        if self._pubsub is None:
            raise TransportError("not subscribed")
        out: List[Delivery] = []
        try:
            while len(out) < limit and self._pubsub.connection.can_read(timeout=0):
                message = self._pubsub.get_message(timeout=REPLY_COMPLETION)
                if message is None or message.get("type") != "message":
                    continue
                channel = message["channel"]
                out.append(Delivery(message["data"], channel.decode() if isinstance(channel, bytes) else channel))
        except (redis.RedisError, OSError) as exc:
            log.warning("subscription read failed: %s: %s", type(exc).__name__, exc)
            self._close_pubsub()
            if out:
                return out
            raise TransportError(f"subscription lost: {describe(exc)}") from None
        return out

    def claim_due(self, now: float, limit: int) -> List[Delivery]:
        try:
            members = self._retries.claim_due(now, limit)
        except redis.RedisError as exc:
            raise TransportError(describe(exc)) from None
        return [Delivery(m, "", state=m) for m in members]

    def claim(self, keys: List[str]) -> List[bool]:
        if not self._claims or not keys:
            return [True] * len(keys)
        redis_keys = []
        for key in keys:
            redis_keys += [self._marker("claim", key), self._marker("done", key)]
        try:
            flags = self._claim_script(keys=redis_keys, args=[self._owner, self._claim_ttl])
        except redis.RedisError as exc:
            raise TransportError(describe(exc)) from None
        return [bool(flag) for flag in flags]

    def write(self, writes: Writes) -> None:
        if not (writes.results or writes.retries or writes.dead_letters):
            return  # pub/sub deliveries need no ack
        try:
            # Not MULTI: the keys live in different slots on a cluster, and every part is
            # safe to repeat (results are deduplicated, ZADD is idempotent).
            pipe = self._client.pipeline(transaction=False)
            if writes.results:
                in_pipeline(self._publish_script, pipe,
                            [self._marker("done", key) for key, _, _ in writes.results],
                            [self._window, self.result_channel, *(raw for _, raw, _ in writes.results)])
            self._retries.add(pipe, [(state, due) for state, due, _ in writes.retries])
            if writes.dead_letters:
                pipe.rpush(self.dead_letter_key, *(entry for entry, _ in writes.dead_letters))
            pipe.execute()
        except redis.RedisError as exc:
            raise TransportError(describe(exc)) from None

    def _marker(self, kind: str, key: str) -> str:
        # claim and done markers of one result queue share a hash tag (one Redis Cluster slot)
        return pubsub_marker(self._prefix, self._result_queue, kind, key)

    def cancellations(self, now: float):
        return guarded(lambda: read_cancellations(self._client, self._prefix, now))

    def stats(self):
        try:
            return {"retry_set": {self._retries.key: self._retries.size()}}
        except redis.RedisError as exc:
            raise TransportError(describe(exc)) from None

    def ping(self) -> None:
        try:
            self._client.ping()
        except redis.RedisError as exc:
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
