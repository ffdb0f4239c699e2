"""The mechanism behind gates: read a Redis key, scrape a Prometheus text endpoint, run a
PromQL instant query; cache each reading for its interval; turn every failure into a
`Failed` reading (the gate's `fail_open` decides what it means).

Readings are taken in the supervisor loop, synchronously, but each source at most once per
its interval and with a short timeout (`--gate-timeout`, 0.25 s by default): a healthy
endpoint costs a few milliseconds a second, a dead one at most the timeout per interval.
That keeps the loop one loop with one wait point, no thread behind it. `GateFeed` takes
the readings when due, counts failures and hands them to the Dispatcher (dispatch.py).
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import orjson
import redis
import urllib3
from prometheus_client.parser import text_string_to_metric_families

from asyncproc import redact
from asyncproc.credentials import basic_auth
from asyncproc.gates import Failed, PromQuery, Reading, RedisKey, Sample, Scrape, Source
from asyncproc.transports.base import TransportError
from asyncproc.transports.redisbase import ERRORS as REDIS_ERRORS
from asyncproc.transports.redisbase import make_client

log = logging.getLogger("asyncproc.gates")

#: A scraped page larger than this is refused (a misconfigured URL, not a metrics page).
MAX_PAGE_BYTES = 16 * 1024 * 1024


class Sources:
    """The latest reading of every source some gate reads, refreshed when due."""

    def __init__(self, intervals: Mapping[Source, float], clock: Callable[[], float],
                 redis_url: str = "", redis_auth=None) -> None:
        self.intervals = dict(intervals)
        self.redis_url, self.redis_auth = redis_url, redis_auth
        self.clock = clock
        self.readings: Dict[Source, Reading] = {}
        self.taken: Dict[Source, float] = {}     # when each reading was taken (gates bound its age)
        self.due: Dict[Source, float] = {s: 0.0 for s in intervals}
        self.http = urllib3.PoolManager(num_pools=max(len(intervals), 1), maxsize=1, retries=False)
        self.clients: Dict[Tuple[str, float], redis.Redis] = {}
        self.errors: Dict[Source, int] = {}   # failed readings per source, for the metric

    def next_due(self) -> Optional[float]:
        return min(self.due.values()) if self.due else None

    def refresh(self, now: float) -> List[Source]:
        """Read what is due; the sources read (so gates that use them are decided again)."""
        read = []
        for source, due in self.due.items():
            if now < due:
                continue
            reading = self.read(source)
            self.taken[source] = self.clock()
            self.due[source] = self.taken[source] + self.intervals[source]
            before = self.readings.get(source)
            if isinstance(reading, Failed):
                self.errors[source] = self.errors.get(source, 0) + 1
                if not isinstance(before, Failed) or before.reason != reading.reason:
                    log.warning("gate source %s: %s", describe(source), reading.reason)
            elif isinstance(before, Failed):
                log.info("gate source %s answers again", describe(source))
            self.readings[source] = reading
            read.append(source)
        return read

    def read(self, source: Source) -> Reading:
        try:
            if isinstance(source, RedisKey):
                return self._redis(source)
            if isinstance(source, Scrape):
                return self._scrape(source)
            return self._query(source)
        except (*REDIS_ERRORS, TransportError, urllib3.exceptions.HTTPError) as exc:
            return Failed(_clean(f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # a surprise costs a reading (logged, counted), not the loop
            log.exception("gate source %s: unexpected error", describe(source))
            return Failed(_clean(f"unexpected {type(exc).__name__}: {exc}"))

    def _redis(self, source: RedisKey) -> Reading:
        client = self.clients.get((source.url, source.timeout))
        if client is None:
            client = self.clients[(source.url, source.timeout)] = make_client(
                source.url, self._auth_for(source.url), timeout=source.timeout, keepalive=False)
        raw = client.get(source.key)
        if raw is None:
            return Failed(f"key {source.key} is not set")
        try:
            return float(raw)
        except ValueError:
            return Failed(f"key {source.key} holds {raw[:40]!r}, not a number")

    def _auth_for(self, url: str):
        """--redis-url's credentials and TLS files serve a gate on the same server; another
        server's gate carries its own in its URL."""
        from urllib.parse import urlsplit

        if self.redis_auth is None or not self.redis_url:
            return None
        same = urlsplit(url).netloc.rpartition("@")[2] == urlsplit(self.redis_url).netloc.rpartition("@")[2]
        return self.redis_auth if same else None

    def _get(self, url: str, timeout: float, fields: Optional[Dict[str, str]] = None) -> bytes:
        basic = basic_auth(url)  # urllib3 does not send a URL's credentials by itself
        response = self.http.request("GET", url, fields=fields, timeout=urllib3.Timeout(connect=timeout, read=timeout),
                                     preload_content=False, redirect=False,
                                     headers={"Authorization": basic} if basic else None)
        try:
            body = response.read(MAX_PAGE_BYTES + 1)
        finally:
            response.release_conn()
        if response.status != 200:
            raise OSError(f"HTTP {response.status}")
        if len(body) > MAX_PAGE_BYTES:
            raise OSError("page too large")
        return body

    def _scrape(self, source: Scrape) -> Reading:
        text = self._get(source.url, source.timeout).decode("utf-8", "replace")
        try:
            return tuple(Sample(s.name, tuple(sorted(s.labels.items())), float(s.value))
                         for family in text_string_to_metric_families(text) for s in family.samples)
        except (ValueError, TypeError, IndexError) as exc:
            return Failed(f"not Prometheus text: {exc}"[:300])

    def _query(self, source: PromQuery) -> Reading:
        body = self._get(source.url + "/api/v1/query", source.timeout, {"query": source.query})
        try:
            doc = orjson.loads(body)
            data = doc["data"]
            if data["resultType"] == "scalar":
                return float(data["result"][1])
            result = data["result"]
            if data["resultType"] != "vector" or len(result) != 1:
                return Failed(f"query gave {len(result)} samples, expected exactly one")
            return float(result[0]["value"][1])
        except (orjson.JSONDecodeError, KeyError, TypeError, IndexError, ValueError) as exc:
            return Failed(f"unexpected Prometheus answer: {type(exc).__name__} {exc}"[:300])

    def close(self) -> None:
        self.http.clear()
        for client in self.clients.values():
            client.close()


class GateFeed:
    """The Dispatcher's gate readings: the sources its gates read (none: nothing to do),
    taken when due, failures counted; after each reading the Dispatcher decides again."""

    def __init__(self, dispatcher, metrics_, clock: Callable[[], float], redis_url: str = "",
                 redis_auth=None) -> None:
        self.dispatcher = dispatcher
        self.metrics = metrics_
        intervals = dispatcher.source_intervals()
        self.sources = Sources(intervals, clock, redis_url, redis_auth) if intervals else None

    def next_due(self) -> Optional[float]:
        return self.sources.next_due() if self.sources is not None else None

    def refresh(self, now: float, ledger) -> bool:
        """Take the readings that are due (short timeouts, see above) and decide again, with
        the ledger's requests in flight per queue; whether it did."""
        if self.sources is None or now < self.sources.next_due():
            return False
        errors_before = dict(self.sources.errors)
        self.sources.refresh(now)
        for source, count in self.sources.errors.items():
            if count != errors_before.get(source, 0):
                self.metrics.of(self.metrics.gate_errors, describe(source)).inc(
                    count - errors_before.get(source, 0))
        self.dispatcher.decide_gates(self.sources.readings, now, self.sources.taken,
                                     {q: ledger.assigned_in(q) for q in self.dispatcher.gates})
        return True

    def preempt(self, now: float, ledger, preempting: set, pool) -> None:
        """Online requests wait at a pool whose vllm gate preempts: the workers holding the
        attempts the Dispatcher names (`preemptions`) abort them (their sockets shut: vLLM
        frees the slots), and `preempting` records them; each request then waits again in
        the supervisor (`Books.preempted`)."""
        if self.sources is None:
            return
        plan = self.dispatcher.preemptions(ledger, self.sources.readings, self.sources.taken, preempting, now)
        handles = {h.index: h for h in pool.handles}
        for index, keys in plan.items():
            handle = handles.get(index)
            if handle is not None and pool.send_preempt(handle, keys):
                preempting.update(keys)
                log.debug("preempting %d attempts on worker %d: %s", len(keys), index, " ".join(keys[:20]))

    def close(self) -> None:
        if self.sources is not None:
            self.sources.close()

def describe(source: Source) -> str:
    """How logs and the gate-errors metric name a source: never with its credentials."""
    if isinstance(source, RedisKey):
        return f"redis key {source.key}"
    if isinstance(source, Scrape):
        return redact.url(source.url)
    return f"{redact.url(source.url)} query {source.query}"


def _clean(reason: str) -> str:
    """A failure reason from a library: no secrets (urllib3 quotes the URL), one line, bounded."""
    return redact.escape(redact.scrub(reason))[:300]
