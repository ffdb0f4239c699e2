"""The producer's side of the Redis transports (README: batch commands): what they share —
the batch records, cancellations, forgetting per-id markers, queue statistics. Each
transport module adds how a request is enqueued and how results are read."""
from __future__ import annotations

import abc
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import orjson

from asyncproc import messages, redact
from asyncproc.transports.base import Producer, ProducerError, ResultReader, Transport, TransportError
from asyncproc.transports.keys import aux_key, cancel_key, pubsub_marker
from asyncproc.transports.redisbase import ERRORS, arriving, make_client

if TYPE_CHECKING:
    from asyncproc.config import RedisConfig

CHUNK = 500                          # messages per pipeline round trip
SOCKET_TIMEOUT = 10.0
REPLY_COMPLETION = SOCKET_TIMEOUT    # seconds the rest of a partly arrived reply may take (a busy host)


def batch_key(prefix: str, batch: str) -> str:
    return f"{prefix}:batch:{batch}"


def batches_key(prefix: str) -> str:
    return f"{prefix}:batches"


class RedisProducer(Producer):
    errors = (*ERRORS, TransportError)  # TransportError: a cluster client that cannot be made

    transport_name = ""   # the --message-queue-impl it produces for, recorded with each batch

    def __init__(self, config: RedisConfig, queue: str, open_transport: Callable[[], Transport],
                 result_format: str = "seed") -> None:
        """`open_transport`: the processor's side of every request queue, for queue_stats."""
        self.config = config
        self.queue = queue
        self.open_transport = open_transport
        self.result_format = result_format
        self.prefix = config.key_prefix
        self.where = f"redis at {redact.url(config.url)}"
        self.redis = make_client(config.url, config.auth, timeout=SOCKET_TIMEOUT, keepalive=False,
                                 cluster=config.cluster)

    # -- what each transport adds ----------------------------------------------------------
    @abc.abstractmethod
    def enqueue(self, pipe, raw: bytes, request: dict) -> None:
        """Add one request message to the pipeline."""

    @abc.abstractmethod
    def markers(self, key: str) -> List[str]:
        """The per-id keys that make a later request with this id be skipped (claims, "done")."""

    # -- submit ----------------------------------------------------------------------------
    def submit(self, requests: List[dict], forget: bool = False) -> int:
        for start in range(0, len(requests), CHUNK):
            chunk = requests[start:start + CHUNK]
            pipe = self.redis.pipeline(transaction=False)
            if forget:  # one key per DEL: a cluster pipeline takes no other
                for key in (key for r in chunk for key in self.markers(messages.id_key(r["id"]))):
                    pipe.delete(key)
            for request in chunk:
                self.enqueue(pipe, orjson.dumps(request), request)
            self.run(pipe.execute)
        return len(requests)

    def record_batch(self, batch: str, count: int, total: Optional[int]) -> None:
        key = batch_key(self.prefix, batch)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hsetnx(key, "created", time.time())
        pipe.hset(key, mapping={"queue": self.queue, "transport": self.transport_name})
        if total is None:
            pipe.hincrby(key, "total", count)
        else:
            pipe.hset(key, "total", total)
        pipe.zadd(batches_key(self.prefix), {batch: time.time()}, nx=True)
        self.run(pipe.execute)

    # -- cancel and look ---------------------------------------------------------------------
    def cancel(self, members: Dict[str, float], batch: Optional[str], now: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(cancel_key(self.prefix), members)
        pipe.zremrangebyscore(cancel_key(self.prefix), "-inf", now)
        if batch is not None:
            pipe.hset(batch_key(self.prefix, batch), "cancelled", now)
        self.run(pipe.execute)

    def batch(self, batch: str) -> Dict[str, str]:
        record = self.run(lambda: self.redis.hgetall(batch_key(self.prefix, batch)))
        return {k.decode(): v.decode() for k, v in record.items()}

    def batch_ids(self) -> List[str]:
        return [b.decode() for b in self.run(lambda: self.redis.zrange(batches_key(self.prefix), 0, -1))]

    def queue_stats(self) -> Dict[str, Dict[str, float]]:
        """The processor's own queue gauges (depth, leased, retry set) plus dead letters."""
        transport = self.open_transport()
        try:
            stats = transport.stats()
        except TransportError as exc:
            raise ProducerError(str(exc)) from None
        finally:
            transport.close()
        dead = self.config.dead_letter_queue
        kind = self.run(lambda: self.redis.type(dead)).decode()
        size = {"list": self.redis.llen, "stream": self.redis.xlen}.get(kind)
        stats["dead_letters"] = {dead: self.run(lambda: size(dead)) if size else 0}
        return stats

    def close(self) -> None:
        self.redis.close()


class RedisReader(ResultReader):
    def __init__(self, producer: RedisProducer) -> None:
        self.producer = producer
        self.redis = producer.redis
        self.key = producer.config.result_queue


# -- redis-pubsub ---------------------------------------------------------------------------
class PubSubProducer(RedisProducer):
    transport_name = "redis-pubsub"
    persisted = False

    def enqueue(self, pipe, raw: bytes, request: dict) -> None:
        pipe.publish(self.queue, raw)

    def markers(self, key: str) -> List[str]:
        return [pubsub_marker(self.prefix, self.config.result_queue, kind, key) for kind in ("claim", "done")]

    def results(self, from_start: bool = True, batch: Optional[str] = None, total: int = 0) -> ResultReader:
        """Subscribed on return: submit after this (a result is published once)."""
        return PubSubResults(self)


class PubSubResults(RedisReader):
    def __init__(self, producer: RedisProducer) -> None:
        super().__init__(producer)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        producer.run(lambda: self.pubsub.subscribe(self.key))
        # the subscription is live once Redis confirms it: only then is submitting safe
        reply = producer.run(lambda: self.pubsub.parse_response(block=True, timeout=SOCKET_TIMEOUT))
        if not reply:
            raise ProducerError(f"{producer.where}: no reply to SUBSCRIBE")

    def poll(self, timeout: float) -> List[dict]:
        return self.producer.run(lambda: self._read(timeout))

    def _read(self, timeout: float) -> List[dict]:
        out: List[dict] = []
        if not self.pubsub.connection.can_read(timeout=timeout):
            return out
        for message in arriving(self.pubsub, CHUNK, REPLY_COMPLETION):
            result = self.decode(message["data"])
            if result is not None:
                out.append(result)
        return out

    def close(self) -> None:
        self.pubsub.close()


# -- redis-sortedset ------------------------------------------------------------------------
class SortedSetProducer(RedisProducer):
    transport_name = "redis-sortedset"
    counts_results = True

    def enqueue(self, pipe, raw: bytes, request: dict) -> None:
        pipe.zadd(self.queue, {raw: float(request["deadline"])})

    def markers(self, key: str) -> List[str]:
        return [aux_key(self.prefix, self.config.result_queue, f"done:{key}")]

    def results(self, from_start: bool = True, batch: Optional[str] = None, total: int = 0) -> ResultReader:
        """The result list, from its start (or from now), nothing removed."""
        return ListResults(self, from_start)


class ListResults(RedisReader):
    """The redis-sortedset result list, read by index (LRANGE), nothing removed. With
    --result-format llm-d-async results are LPUSHed (the oldest is last): read from the end."""

    def __init__(self, producer: RedisProducer, from_start: bool) -> None:
        super().__init__(producer)
        self.from_tail = producer.result_format == "llm-d-async"
        self.cursor = 0 if from_start else producer.run(lambda: self.redis.llen(self.key))

    def _range(self) -> list:
        if self.from_tail:
            return list(reversed(self.redis.lrange(self.key, -(self.cursor + CHUNK), -(self.cursor + 1))))
        return self.redis.lrange(self.key, self.cursor, self.cursor + CHUNK - 1)

    def poll(self, timeout: float) -> List[dict]:
        deadline = time.monotonic() + timeout
        while True:
            raws = self.producer.run(self._range)
            self.cursor += len(raws)
            out = [r for r in map(self.decode, raws) if r is not None]
            if raws or time.monotonic() >= deadline:
                return out
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))


# -- redis-streams --------------------------------------------------------------------------
class StreamsProducer(SortedSetProducer):
    transport_name = "redis-streams"

    def enqueue(self, pipe, raw: bytes, request: dict) -> None:
        pipe.xadd(self.queue, {b"message": raw})

    def results(self, from_start: bool = True, batch: Optional[str] = None, total: int = 0) -> ResultReader:
        """The result stream, from its start (or from now), nothing removed."""
        return StreamResults(self, from_start)


class StreamResults(RedisReader):
    """The redis-streams result stream, read by entry id (XREAD), nothing removed."""

    def __init__(self, producer: RedisProducer, from_start: bool) -> None:
        super().__init__(producer)
        self.cursor = "0-0"
        if not from_start:  # the newest entry now ("$" would skip what arrives between reads)
            newest = producer.run(lambda: self.redis.xrevrange(self.key, count=1))
            self.cursor = newest[0][0] if newest else "0-0"

    def poll(self, timeout: float) -> List[dict]:
        block = max(int(timeout * 1000), 1)
        reply = self.producer.run(lambda: self.redis.xread({self.key: self.cursor}, count=CHUNK, block=block))
        out: List[dict] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self.cursor = entry_id
                result = self.decode(fields.get(b"message", b""))
                if result is not None:
                    out.append(result)
        return out


PRODUCERS = {"redis-pubsub": PubSubProducer, "redis-sortedset": SortedSetProducer, "redis-streams": StreamsProducer}
