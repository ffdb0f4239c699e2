"""The producer side of asyncproc's queues: submit requests, read results, cancel, look.

asyncproc is never called directly; this module only writes and reads the queues the
processor uses, in the formats of README "Messages". The batch commands are built on it;
your own code can use it too::

    client = Client(config.load_settings(["--message-queue-impl", "redis-streams"]))
    with client.results() as results:        # pub/sub: subscribe before submitting
        client.submit([{"id": "a1", "deadline": time.time() + 600, "payload": {...}}], batch="b1")
        for result in results.wait(timeout=60):
            ...
"""
from __future__ import annotations

import time
from typing import Dict, Iterable, Iterator, List, Optional

import orjson

from asyncproc import messages, redact
from asyncproc.config import Settings
from asyncproc.transports import TransportError, open_transport
from asyncproc.transports.keys import aux_key, cancel_key, pubsub_marker
from asyncproc.transports.redisbase import ERRORS, make_client

CHUNK = 500                          # messages per pipeline round trip
CANCEL_RETENTION = 7 * 24 * 3600.0   # seconds a cancellation stays in force
SOCKET_TIMEOUT = 10.0
REPLY_COMPLETION = 1.0               # seconds the rest of a partly arrived reply may take


class ClientError(Exception):
    """Something the user asked cannot be done (one line, no traceback)."""


def batch_key(prefix: str, batch: str) -> str:
    return f"{prefix}:batch:{batch}"


def batches_key(prefix: str) -> str:
    return f"{prefix}:batches"


class Client:
    def __init__(self, settings: Settings, queue: Optional[str] = None) -> None:
        self.settings = settings
        self.impl = settings.message_queue_impl
        self.queue = queue or settings.queue_names[0]
        self.prefix = settings.key_prefix
        self.errors: tuple = (*ERRORS, TransportError)
        self.gcp = None
        if self.impl == "gcp-pubsub":
            from asyncproc import client_gcp

            self.errors += client_gcp.ERRORS
            self.gcp = self._run(lambda: client_gcp.GcpQueues(settings, self.queue))
        self.redis = make_client(settings.redis_url, settings.redis_auth, timeout=SOCKET_TIMEOUT,
                                 keepalive=False, cluster=settings.redis_cluster)

    @property
    def persisted(self) -> bool:
        """Results wait (a Redis list or stream; on Pub/Sub the batch's own subscription)
        instead of being published once to whoever listens."""
        return self.impl != "redis-pubsub"

    # -- submit --------------------------------------------------------------------------
    def submit(self, requests: Iterable[dict], batch: Optional[str] = None, forget: bool = False,
               batch_total: Optional[int] = None) -> int:
        """Put request messages on the request queue; returns how many.

        `batch` tags each request (metadata "asyncproc.batch") and records the batch for
        `status`: its total grows by what is submitted, or is `batch_total` (a resumed run
        submits only part of its batch again). `forget` clears the per-id markers of earlier runs (claims, "result
        published") so ids asked again are answered again: for a resumed run whose results
        never arrived."""
        if self.gcp is not None:
            return self._submit_gcp(requests, batch)
        count = 0
        chunk: List[dict] = []
        for request in requests:
            chunk.append(self._tag(request, batch))
            if len(chunk) >= CHUNK:
                count += self._send(chunk, forget)
                chunk = []
        if chunk:
            count += self._send(chunk, forget)
        if batch is not None:
            self._record_batch(batch, count, batch_total)
        return count

    def _submit_gcp(self, requests: Iterable[dict], batch: Optional[str]) -> int:
        tagged = [self._tag(r, batch) for r in requests]
        if batch is not None:  # its results subscription first: no result can be missed
            self._run(lambda: self.gcp.open_batch(batch, len(tagged)))
        self._run(lambda: self.gcp.publish([orjson.dumps(r) for r in tagged]))
        return len(tagged)

    @staticmethod
    def _tag(request: dict, batch: Optional[str]) -> dict:
        if batch is None:
            return request
        return dict(request, metadata={**(request.get("metadata") or {}), messages.BATCH_KEY: batch})

    def _send(self, chunk: List[dict], forget: bool) -> int:
        pipe = self.redis.pipeline(transaction=False)
        if forget:  # one key per DEL: a cluster pipeline takes no other
            for key in (key for r in chunk for key in self._markers(messages.id_key(r["id"]))):
                pipe.delete(key)
        for request in chunk:
            raw = orjson.dumps(request)
            if self.impl == "redis-pubsub":
                pipe.publish(self.queue, raw)
            elif self.impl == "redis-sortedset":
                pipe.zadd(self.queue, {raw: float(request["deadline"])})
            else:
                pipe.xadd(self.queue, {b"message": raw})
        self._run(pipe.execute)
        return len(chunk)

    def _markers(self, key: str) -> List[str]:
        result_queue = self.settings.result_queue
        if self.impl == "redis-pubsub":
            return [pubsub_marker(self.prefix, result_queue, kind, key) for kind in ("claim", "done")]
        return [aux_key(self.prefix, result_queue, f"done:{key}")]

    def _record_batch(self, batch: str, count: int, total: Optional[int]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hsetnx(batch_key(self.prefix, batch), "created", time.time())
        pipe.hset(batch_key(self.prefix, batch), mapping={"queue": self.queue, "transport": self.impl})
        if total is None:
            pipe.hincrby(batch_key(self.prefix, batch), "total", count)
        else:
            pipe.hset(batch_key(self.prefix, batch), "total", total)
        pipe.zadd(batches_key(self.prefix), {batch: time.time()}, nx=True)
        self._run(pipe.execute)

    # -- results -------------------------------------------------------------------------
    def results(self, from_start: bool = True, batch: Optional[str] = None, total: int = 0) -> "Results":
        """A reader of results. Pub/sub: subscribed on return, so submit after this.
        Persisted transports: reads the result list or stream without removing anything,
        from its start (or from now with from_start=False). gcp-pubsub: the results of
        `batch` (required), from its own subscription, acknowledged once read."""
        if self.gcp is not None:
            if batch is None:
                raise ClientError("gcp-pubsub keeps results per batch: give a batch")
            self._run(lambda: self.gcp.open_batch(batch, total))
            return GcpResults(self, batch)
        if self.impl == "redis-pubsub":
            return PubSubResults(self)
        if self.impl == "redis-sortedset":
            return ListResults(self, from_start)
        return StreamResults(self, from_start)

    # -- cancel and look -----------------------------------------------------------------
    def cancel(self, batch: Optional[str] = None, ids: Iterable = ()) -> int:
        """Queued requests of `batch` or with these ids get the error result "cancelled"
        instead of being dispatched; requests already in flight finish."""
        now = time.time()
        until = now + CANCEL_RETENTION
        members = {f"id:{messages.id_key(i)}": until for i in ids}
        if batch is not None:
            members[f"batch:{batch}"] = until
        if not members:
            raise ClientError("nothing to cancel: give --batch or --id")
        if self.gcp is not None:
            raise ClientError("cancel needs a Redis transport: with gcp-pubsub asyncproc has no shared store to"
                              " read cancellations from")
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(cancel_key(self.prefix), members)
        pipe.zremrangebyscore(cancel_key(self.prefix), "-inf", now)
        if batch is not None:
            pipe.hset(batch_key(self.prefix, batch), "cancelled", now)
        self._run(pipe.execute)
        return len(members)

    @property
    def counts_results(self) -> bool:
        """Results can be read without taking them (for status)."""
        return self.impl in ("redis-sortedset", "redis-streams")

    def finish_batch(self, batch: str) -> None:
        """Every result of `batch` is out of the queues: drop what only served to read them."""
        if self.gcp is not None:
            self._run(lambda: self.gcp.close_batch(batch))

    def batch(self, batch: str) -> Dict[str, str]:
        if self.gcp is not None:
            return self._run(lambda: self.gcp.batch(batch))
        record = self._run(lambda: self.redis.hgetall(batch_key(self.prefix, batch)))
        return {k.decode(): v.decode() for k, v in record.items()}

    def batch_ids(self) -> List[str]:
        if self.gcp is not None:
            return self._run(self.gcp.batch_ids)
        return [b.decode() for b in self._run(lambda: self.redis.zrange(batches_key(self.prefix), 0, -1))]

    def queue_stats(self) -> Dict[str, Dict[str, float]]:
        """The processor's own queue gauges (depth, leased, retry set) plus dead letters."""
        if self.gcp is not None:
            return {}  # held by the service: see Cloud Monitoring (README, gcp-pubsub)
        transport = open_transport(self.settings)
        try:
            stats = transport.stats()
        except TransportError as exc:
            raise ClientError(str(exc)) from None
        finally:
            transport.close()
        dead = self.settings.dead_letter_queue
        kind = self._run(lambda: self.redis.type(dead)).decode()
        size = {"list": self.redis.llen, "stream": self.redis.xlen}.get(kind)
        stats["dead_letters"] = {dead: self._run(lambda: size(dead)) if size else 0}
        return stats

    def _run(self, call):
        try:
            return call()
        except self.errors as exc:
            where = "pubsub" if self.gcp is not None else f"redis at {redact.url(self.settings.redis_url)}"
            text = redact.scrub(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise ClientError(f"{where}: {redact.cause(text)}: {text}") from None

    def close(self) -> None:
        self.redis.close()


class Results:
    """Decoded result objects as they arrive; poll() never blocks longer than asked."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def poll(self, timeout: float) -> List[dict]:
        raise NotImplementedError

    def wait(self, timeout: Optional[float] = None, idle: float = 0.5) -> Iterator[dict]:
        """Results until `timeout` seconds pass (None: forever)."""
        end = None if timeout is None else time.monotonic() + timeout
        while end is None or time.monotonic() < end:
            yield from self.poll(idle)

    def __enter__(self) -> "Results":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    @staticmethod
    def decode(raw: bytes) -> Optional[dict]:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        return value if isinstance(value, dict) and "id" in value else None


class PubSubResults(Results):
    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.pubsub = client.redis.pubsub(ignore_subscribe_messages=True)
        client._run(lambda: self.pubsub.subscribe(client.settings.result_queue))
        # the subscription is live once Redis confirms it: only then is submitting safe
        reply = client._run(lambda: self.pubsub.parse_response(block=True, timeout=SOCKET_TIMEOUT))
        if not reply:
            raise ClientError(f"redis at {redact.url(client.settings.redis_url)}: no reply to SUBSCRIBE")

    def poll(self, timeout: float) -> List[dict]:
        return self.client._run(lambda: self._read(timeout))

    def _read(self, timeout: float) -> List[dict]:
        # Read only what is arriving, and give a started reply time to finish: redis-py
        # answers a partial reply under get_message(timeout=0) by reconnecting, which
        # drops what Redis buffered for us (see transports/redis_pubsub.py).
        out: List[dict] = []
        connection = self.pubsub.connection
        if not connection.can_read(timeout=timeout):
            return out
        while len(out) < CHUNK and connection.can_read(timeout=0):
            message = self.pubsub.get_message(timeout=REPLY_COMPLETION)
            if message is not None and message.get("type") == "message":
                result = self.decode(message["data"])
                if result is not None:
                    out.append(result)
        return out

    def close(self) -> None:
        self.pubsub.close()


class ListResults(Results):
    """The redis-sortedset result list, read by index (LRANGE), nothing removed."""

    def __init__(self, client: Client, from_start: bool) -> None:
        super().__init__(client)
        self.key = client.settings.result_queue
        self.cursor = 0 if from_start else client._run(lambda: client.redis.llen(self.key))

    def poll(self, timeout: float) -> List[dict]:
        deadline = time.monotonic() + timeout
        while True:
            raws = self.client._run(lambda: self.client.redis.lrange(self.key, self.cursor, self.cursor + CHUNK - 1))
            self.cursor += len(raws)
            out = [r for r in map(self.decode, raws) if r is not None]
            if raws or time.monotonic() >= deadline:
                return out
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))


class StreamResults(Results):
    """The redis-streams result stream, read by entry id (XREAD), nothing removed."""

    def __init__(self, client: Client, from_start: bool) -> None:
        super().__init__(client)
        self.key = client.settings.result_queue
        self.cursor = "0-0"
        if not from_start:  # the newest entry now ("$" would skip what arrives between reads)
            newest = client._run(lambda: client.redis.xrevrange(self.key, count=1))
            self.cursor = newest[0][0] if newest else "0-0"

    def poll(self, timeout: float) -> List[dict]:
        block = max(int(timeout * 1000), 1)
        reply = self.client._run(lambda: self.client.redis.xread({self.key: self.cursor}, count=CHUNK, block=block))
        out: List[dict] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self.cursor = entry_id
                result = self.decode(fields.get(b"message", b""))
                if result is not None:
                    out.append(result)
        return out


class GcpResults(Results):
    def __init__(self, client: Client, batch: str) -> None:
        from asyncproc.client_gcp import GcpResults as Pulls

        super().__init__(client)
        self.pulls = Pulls(client.gcp, batch)

    def poll(self, timeout: float) -> List[dict]:
        raws = self.client._run(lambda: self.pulls.poll(timeout))
        return [r for r in map(self.decode, raws) if r is not None]

    def close(self) -> None:
        self.client._run(self.pulls.close)


def result_batch(result: dict) -> Optional[str]:
    metadata = result.get("metadata")
    return metadata.get(messages.BATCH_KEY) if isinstance(metadata, dict) else None


