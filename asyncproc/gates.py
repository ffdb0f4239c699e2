"""Dispatch budget policy: gate values, how readings become a budget, how a budget and the
adaptive limit bound in-flight work. Pure: the readings come from `gate_sources`; the adaptive limit is in `aimd`.

A gate gives each queue a budget in [0, 1]; the queue may have ceil(budget x its in-flight
limit) requests in flight, so 0 stops new dispatch (waiting requests stay queued) and any
open budget lets at least one through. The vllm gate gives an absolute number of slots
instead: how many requests asyncproc may have in flight to that pool, whatever its limit. Gates are parsed from JSON objects (the queues
file's `gate`, or `--gate`); a misspelled type or parameter is an error, never "no gate".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from asyncproc import redact

GATE_TYPES = ("constant", "vllm", "redis", "endpoint-scrape", "prometheus-query", "min")
AGGREGATES = ("sum", "max", "mean")
COMMON = {"type", "interval", "timeout", "fail_open"}
PARAMS = {
    "constant": {"type", "budget"},
    "redis": COMMON | {"key", "url"},
    "endpoint-scrape": COMMON | {"url", "metric", "labels", "capacity", "pods", "reserved", "aggregate"},
    "prometheus-query": COMMON | {"url", "query"},
    "min": {"type", "gates"},
    "vllm": COMMON | {"url", "capacity", "beta", "window", "kv_cache_limit", "max_age", "preempt"},
}
POD_PARAMS = {"url", "metric", "labels"}


class GateError(ValueError):
    """A gate object that does not parse; the message says where and why, in one line."""


# -- sources: what a gate reads (the mechanism in gate_sources reads them) -----------------
class RedisKey(NamedTuple):
    url: str
    key: str
    timeout: float


class Scrape(NamedTuple):
    url: str
    timeout: float


class PromQuery(NamedTuple):
    url: str
    query: str
    timeout: float


Source = Union[RedisKey, Scrape, PromQuery]


class Sample(NamedTuple):
    """One sample of a scraped Prometheus text page."""

    name: str
    labels: Tuple[Tuple[str, str], ...]
    value: float


class Failed(NamedTuple):
    reason: str


#: A reading: a number (redis, prometheus-query), the samples of a page (scrape), or Failed.
Reading = Union[float, Tuple[Sample, ...], Failed]


# -- gate values ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Constant:
    budget: float = 1.0


@dataclass(frozen=True)
class Leaf:
    """Common to gates that read a source: how often, and what a failed reading means."""

    interval: float
    fail_open: bool


@dataclass(frozen=True)
class RedisGate(Leaf):
    source: RedisKey


@dataclass(frozen=True)
class Selector:
    """A metric on one or more pages, with label filters."""

    pages: Tuple[Scrape, ...]
    metric: str
    labels: Tuple[Tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ScrapeGate(Leaf):
    selector: Selector
    capacity: Optional[float] = None        # per pod; None: the value is already a saturation
    pods: Union[float, Selector] = 1.0      # a count, or a metric giving the ready-pod count
    reserved: float = 0.0
    aggregate: str = "sum"


@dataclass(frozen=True)
class PromQueryGate(Leaf):
    source: PromQuery


@dataclass(frozen=True)
class MinGate:
    gates: Tuple[Any, ...]


@dataclass(frozen=True)
class VllmGate(Leaf):
    """A pool of vLLM pods: keep room for the online load's bursts, close when online requests queue."""

    pages: Tuple[Scrape, ...]     # one /metrics page per pod
    capacity: float               # requests one pod serves at once (its --max-num-seqs, or less)
    beta: float = 0.25            # headroom: keep R + beta x sqrt(R) slots for an online load R
    window: float = 1.0           # seconds: time constant of the online-load estimate
    kv_cache_limit: float = 0.9   # at or above this KV-cache usage on any pod, asyncproc takes no more
    max_age: float = 3.0          # seconds: an older reading is a failed one
    preempt: bool = False         # abort asyncproc's newest attempts to the pool when online requests wait


Gate = Union[Constant, VllmGate, RedisGate, ScrapeGate, PromQueryGate, MinGate]
OPEN = Constant(1.0)


@dataclass(frozen=True)
class Defaults:
    redis_url: str
    interval: float = 1.0
    timeout: float = 0.25


# -- parsing -----------------------------------------------------------------------------------
def parse(doc: Any, defaults: Defaults, where: str = "gate") -> Gate:
    """A gate from its JSON object; GateError names the first problem."""
    if not isinstance(doc, dict):
        raise GateError(f"{where}: must be an object with a \"type\"")
    kind = doc.get("type")
    if kind not in GATE_TYPES:
        raise GateError(f"{where}: unknown gate type {kind!r} (known: {', '.join(GATE_TYPES)})")
    unknown = sorted(set(doc) - PARAMS[kind])
    if unknown:
        raise GateError(f"{where}: unknown parameter {unknown[0]!r} for gate type {kind}"
                        f" (known: {', '.join(sorted(PARAMS[kind]))})")
    if kind == "constant":
        return Constant(_fraction(doc.get("budget", 1.0), f"{where}.budget"))
    if kind == "min":
        gates = doc.get("gates")
        if not isinstance(gates, list) or not gates:
            raise GateError(f"{where}.gates: must be a non-empty list of gates")
        return MinGate(tuple(parse(g, defaults, f"{where}.gates[{i}]") for i, g in enumerate(gates)))
    interval = _positive(doc.get("interval", defaults.interval), f"{where}.interval")
    timeout = _positive(doc.get("timeout", defaults.timeout), f"{where}.timeout")
    fail_open = doc.get("fail_open", False)
    if not isinstance(fail_open, bool):
        raise GateError(f"{where}.fail_open: must be true or false")
    if kind == "vllm":
        return _vllm(doc, interval, timeout, fail_open, where)
    if kind == "redis":
        key = _string(doc.get("key"), f"{where}.key")
        url = doc.get("url", defaults.redis_url)
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://", "redis+cluster://",
                                                          "rediss+cluster://")):
            raise GateError(f"{where}.url: must be a redis://, rediss://, unix://, redis+cluster:// or"
                            " rediss+cluster:// URL")
        return RedisGate(interval, fail_open, RedisKey(url, key, timeout))
    if kind == "prometheus-query":
        url = _http(doc.get("url"), f"{where}.url")
        return PromQueryGate(interval, fail_open, PromQuery(url.rstrip("/"), _string(doc.get("query"), f"{where}.query"),
                                                            timeout))
    selector = _selector(doc, timeout, where)
    capacity = doc.get("capacity")
    if capacity is not None:
        capacity = _positive(capacity, f"{where}.capacity")
    pods: Union[float, Selector] = 1.0
    if "pods" in doc:
        if isinstance(doc["pods"], dict):
            extra = sorted(set(doc["pods"]) - POD_PARAMS)
            if extra:
                raise GateError(f"{where}.pods: unknown parameter {extra[0]!r} (known: {', '.join(sorted(POD_PARAMS))})")
            pods = _selector(doc["pods"], timeout, f"{where}.pods")
        else:
            pods = _positive(doc["pods"], f"{where}.pods")
        if capacity is None:
            raise GateError(f"{where}.pods: needs a capacity (pods multiply the per-pod capacity)")
    reserved = _fraction(doc.get("reserved", 0.0), f"{where}.reserved")
    aggregate = doc.get("aggregate", "sum" if capacity is not None else "max")
    if aggregate not in AGGREGATES:
        raise GateError(f"{where}.aggregate: must be one of {', '.join(AGGREGATES)} (got {aggregate!r})")
    return ScrapeGate(interval, fail_open, selector, capacity, pods, reserved, aggregate)


def _vllm(doc: Mapping[str, Any], interval: float, timeout: float, fail_open: bool, where: str) -> VllmGate:
    if "capacity" not in doc:
        raise GateError(f"{where}.capacity: required (requests one pod serves at once)")
    beta = _number(doc.get("beta", VllmGate.beta), f"{where}.beta")
    if beta < 0:
        raise GateError(f"{where}.beta: must be 0 or more (got {beta:g})")
    max_age = _positive(doc.get("max_age", max(VllmGate.max_age, 3 * interval)), f"{where}.max_age")
    if max_age < interval:
        raise GateError(f"{where}.max_age: must be at least the interval ({interval:g} s)")
    preempt = doc.get("preempt", VllmGate.preempt)
    if not isinstance(preempt, bool):
        raise GateError(f"{where}.preempt: must be true or false (got {preempt!r})")
    return VllmGate(interval, fail_open, _pages(doc, timeout, where),
                    _positive(doc["capacity"], f"{where}.capacity"), beta,
                    _positive(doc.get("window", VllmGate.window), f"{where}.window"),
                    _fraction(doc.get("kv_cache_limit", VllmGate.kv_cache_limit), f"{where}.kv_cache_limit"),
                    max_age, preempt)


def _pages(doc: Mapping[str, Any], timeout: float, where: str) -> Tuple[Scrape, ...]:
    urls = doc.get("url")
    urls = [urls] if isinstance(urls, str) else urls
    if not isinstance(urls, list) or not urls:
        raise GateError(f"{where}.url: must be an http(s) URL or a non-empty list of them")
    return tuple(Scrape(_http(u, f"{where}.url"), timeout) for u in urls)


def _selector(doc: Mapping[str, Any], timeout: float, where: str) -> Selector:
    pages = _pages(doc, timeout, where)
    metric = _string(doc.get("metric"), f"{where}.metric")
    labels = doc.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise GateError(f"{where}.labels: must be an object of strings")
    return Selector(pages, metric, tuple(sorted(labels.items())))


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise GateError(f"{where}: must be a non-empty string")
    return value


def _http(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")) or len(value) < 10:
        raise GateError(f"{where}: must be an http:// or https:// URL (got {redact.url(value)!r})")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GateError(f"{where}: must be a number (got {value!r})")
    return float(value)


def _positive(value: Any, where: str) -> float:
    number = _number(value, where)
    if number <= 0:
        raise GateError(f"{where}: must be greater than 0 (got {number:g})")
    return number


def _fraction(value: Any, where: str) -> float:
    number = _number(value, where)
    if not 0 <= number <= 1:
        raise GateError(f"{where}: must be between 0 and 1 (got {number:g})")
    return number


# -- what a gate reads and when ---------------------------------------------------------------
def sources(gate: Gate) -> Dict[Source, float]:
    """Every source the gate reads, with the shortest interval it wants it refreshed at."""
    found: Dict[Source, float] = {}

    def add(source: Source, interval: float) -> None:
        found[source] = min(interval, found.get(source, interval))

    if isinstance(gate, MinGate):
        for child in gate.gates:
            for source, interval in sources(child).items():
                add(source, interval)
    elif isinstance(gate, (RedisGate, PromQueryGate)):
        add(gate.source, gate.interval)
    elif isinstance(gate, VllmGate):
        for page in gate.pages:
            add(page, gate.interval)
    elif isinstance(gate, ScrapeGate):
        for page in gate.selector.pages:
            add(page, gate.interval)
        if isinstance(gate.pods, Selector):
            for page in gate.pods.pages:
                add(page, gate.interval)
    return found


# -- evaluation ----------------------------------------------------------------------------------
class Decision(NamedTuple):
    budget: float
    reason: str            # open | throttled | closed | failed-open | failed-closed
    detail: str = ""       # why a reading failed, for the log
    slots: Optional[int] = None   # an absolute cap on asyncproc's in-flight requests to the pool


#: A pool of pods is named by the pages a vllm gate scrapes.
Pool = Tuple[Scrape, ...]


class Load(NamedTuple):
    """One pool's online-load estimate: the requests online traffic keeps in service or
    waiting (smoothed over the gate's window), and when the newest reading it holds was taken."""

    online: float
    at: float


class PoolReading(NamedTuple):
    running: float
    waiting: float
    kv_cache: Optional[float]   # the highest usage of any pod; None where pods do not report it
    taken: float                # when the oldest of its pages was read


RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # vLLM v1, v0


def clamp(value: float) -> float:
    return min(max(value, 0.0), 1.0)


def saturation_budget(value: float, capacity: Optional[float], pods: float, reserved: float) -> float:
    """budget = 1 - saturation - reserved, clamped; saturation = value, or value / (capacity x pods)."""
    if capacity is None:
        saturation = value
    else:
        total = capacity * pods
        saturation = value / total if total > 0 else 1.0
    return clamp(1.0 - clamp(saturation) - reserved)


def vllm_gates(gate: Gate) -> Tuple[VllmGate, ...]:
    """The vllm gates in a gate (itself, or inside a min)."""
    if isinstance(gate, VllmGate):
        return (gate,)
    if isinstance(gate, MinGate):
        return tuple(v for child in gate.gates for v in vllm_gates(child))
    return ()


def read_pool(gate: VllmGate, readings: Mapping[Source, Reading], taken: Optional[Mapping[Source, float]],
              now: float) -> PoolReading:
    """Running and waiting summed over the pool's pages, the highest KV-cache usage; a page
    missing, failed, older than max_age or without the two counts is a ReadingError."""
    running = waiting = 0.0
    kv: Optional[float] = None
    oldest = now
    for page in gate.pages:
        where = redact.url(page.url)
        reading = readings.get(page)
        if reading is None:
            raise ReadingError(f"{where}: no reading yet")
        if isinstance(reading, Failed):
            raise ReadingError(f"{where}: {reading.reason}")
        if not isinstance(reading, tuple):
            raise ReadingError(f"{where}: not a metrics page")
        if taken is not None:
            at = taken.get(page, float("-inf"))
            if now - at > gate.max_age:
                raise ReadingError(f"{where}: the reading is {now - at:.1f} s old (max_age {gate.max_age:g} s)")
            oldest = min(oldest, at)
        found = {RUNNING: [], WAITING: [], **{k: [] for k in KV_CACHE}}
        for sample in reading:
            if sample.name in found:
                found[sample.name].append(sample.value)
        for name in (RUNNING, WAITING):
            if not found[name]:
                raise ReadingError(f"{where}: no sample of {name}")
        values = found[RUNNING] + found[WAITING] + found[KV_CACHE[0]] + found[KV_CACHE[1]]
        if any(math.isnan(v) for v in values):
            raise ReadingError(f"{where}: a NaN sample")
        running += sum(found[RUNNING])
        waiting += sum(found[WAITING])
        usage = found[KV_CACHE[0]] or found[KV_CACHE[1]]
        if usage:
            kv = max(usage + ([kv] if kv is not None else []))
    return PoolReading(running, waiting, kv, oldest)


def online_now(pool: PoolReading, own: int) -> float:
    """Online requests in service or waiting: vLLM counts asyncproc's own in its running count."""
    return max(pool.running - own, 0.0) + pool.waiting


def observe(gate: VllmGate, load: Optional[Load], readings: Mapping[Source, Reading],
            taken: Optional[Mapping[Source, float]], own: int, now: float) -> Optional[Load]:
    """The pool's online-load estimate after its newest reading: an exponential average over
    `window` seconds of the online requests each reading shows. Unchanged when the reading is
    not newer than the estimate (or failed): deciding again does not count a reading twice."""
    try:
        pool = read_pool(gate, readings, taken, now)
    except ReadingError:
        return load
    seen = online_now(pool, own)
    if load is None:
        return Load(seen, pool.taken)
    if pool.taken <= load.at:
        return load
    weight = 1.0 - math.exp(-(pool.taken - load.at) / gate.window)
    return Load(load.online + weight * (seen - load.online), pool.taken)


def headroom_slots(capacity: float, online: float, beta: float) -> int:
    """Square-root staffing: online load R keeps R + beta x sqrt(R) slots; the rest are asyncproc's."""
    need = online + beta * math.sqrt(max(online, 0.0))
    return max(int(math.floor(capacity - need + 1e-9)), 0)


def decide_vllm(gate: VllmGate, readings: Mapping[Source, Reading], now: float,
                taken: Optional[Mapping[Source, float]], own: int, load: Optional[Load]) -> Decision:
    pool = read_pool(gate, readings, taken, now)
    total = gate.capacity * len(gate.pages)
    if pool.waiting > 0:
        return Decision(0.0, "closed", f"{pool.waiting:g} requests waiting", 0)
    online = load.online if load is not None else online_now(pool, own)
    slots = headroom_slots(total, online, gate.beta)
    detail = f"online load {online:.1f} of {total:g} slots"
    if pool.kv_cache is not None and pool.kv_cache >= gate.kv_cache_limit and slots > own:
        slots, detail = own, f"KV-cache usage {pool.kv_cache:.0%}"
    if slots <= 0:
        return Decision(0.0, "closed", detail, 0)
    return Decision(1.0, "open" if slots >= total else "throttled", detail, slots)


def preemptions(gate: VllmGate, readings: Mapping[Source, Reading], taken: Optional[Mapping[Source, float]],
                own: int, aborting: int, since: float, now: float) -> int:
    """With `preempt`: how many more of asyncproc's attempts to the pool to abort now, so
    that online requests waiting get their slots. The online requests waiting are vLLM's
    waiting count less those of asyncproc's own that cannot be running (`own` beyond the
    running count); the attempts already being aborted (`aborting`, counted in `own`) count
    towards them. Only a reading of every page taken after the last abort was sent
    (`since`) is acted on, so a reading that predates an abort never causes a second one
    for the same waiting requests. 0 without `preempt`, or when the reading failed."""
    if not gate.preempt or own <= aborting:
        return 0
    try:
        pool = read_pool(gate, readings, taken, now)
    except ReadingError:
        return 0
    if pool.taken <= since:
        return 0
    online_waiting = pool.waiting - max(own - pool.running, 0.0)
    return max(min(math.ceil(online_waiting - 1e-9), own) - aborting, 0)


def decide(gate: Gate, readings: Mapping[Source, Reading], now: float = 0.0,
           taken: Optional[Mapping[Source, float]] = None, own: Optional[Mapping[Pool, int]] = None,
           loads: Optional[Mapping[Pool, Load]] = None) -> Decision:
    """The gate's budget now, from the latest readings (a missing reading is a failure).
    vllm gates also take when each reading was taken, asyncproc's own requests in flight per
    pool, and the pool's online-load estimate (`observe`)."""
    if isinstance(gate, Constant):
        return _decision(gate.budget)
    if isinstance(gate, MinGate):
        return _least([decide(child, readings, now, taken, own, loads) for child in gate.gates])
    try:
        if isinstance(gate, VllmGate):
            return decide_vllm(gate, readings, now, taken, (own or {}).get(gate.pages, 0),
                               (loads or {}).get(gate.pages))
        if isinstance(gate, (RedisGate, PromQueryGate)):
            value = _number_reading(readings.get(gate.source))
            budget = clamp(value)
        else:
            value = select(gate.selector, readings, gate.aggregate)
            pods = select(gate.pods, readings, "sum") if isinstance(gate.pods, Selector) else gate.pods
            budget = saturation_budget(value, gate.capacity, pods, gate.reserved)
    except ReadingError as exc:
        if gate.fail_open:
            return Decision(1.0, "failed-open", str(exc))
        return Decision(0.0, "failed-closed", str(exc), 0 if isinstance(gate, VllmGate) else None)
    return _decision(budget)


def _least(decisions: Sequence[Decision]) -> Decision:
    """A min gate: the smallest budget and the fewest slots; the reason of the one that binds."""
    slots = min((d.slots for d in decisions if d.slots is not None), default=None)
    closed = [d for d in decisions if d.budget <= 0 or d.slots == 0]
    if closed:
        return closed[0]._replace(budget=0.0, slots=slots)
    least = min(decisions, key=lambda d: d.budget)
    if least.reason == "open" and any(d.reason == "throttled" for d in decisions):
        least = least._replace(reason="throttled")
    return least._replace(slots=slots)


def _decision(budget: float) -> Decision:
    if budget <= 0:
        return Decision(0.0, "closed")
    return Decision(budget, "open" if budget >= 1 else "throttled")


class ReadingError(Exception):
    pass


def _number_reading(reading: Optional[Reading]) -> float:
    if reading is None:
        raise ReadingError("no reading yet")
    if isinstance(reading, Failed):
        raise ReadingError(reading.reason)
    if not isinstance(reading, float):
        raise ReadingError("not a number")
    return reading


def select(selector: Selector, readings: Mapping[Source, Reading], aggregate: str) -> float:
    """The selector's metric over all its pages, samples aggregated; no sample is an error."""
    values = []
    for page in selector.pages:
        reading = readings.get(page)
        if reading is None:
            raise ReadingError(f"{redact.url(page.url)}: no reading yet")
        if isinstance(reading, Failed):
            raise ReadingError(f"{redact.url(page.url)}: {reading.reason}")
        wanted = selector.labels
        matched = [s.value for s in reading if s.name == selector.metric
                   and all(pair in s.labels for pair in wanted)]
        if not matched:
            raise ReadingError(f"{redact.url(page.url)}: no sample of {selector.metric}"
                               + (f" with labels {dict(wanted)}" if wanted else ""))
        values.extend(matched)
    if any(math.isnan(v) for v in values):
        raise ReadingError(f"{selector.metric} is NaN")
    if aggregate == "max":
        return max(values)
    if aggregate == "mean":
        return sum(values) / len(values)
    return sum(values)


def allowed_in_flight(budget: float, limit: int, slots: Optional[int] = None) -> int:
    """How many of a queue's requests may be in flight under a budget: 0 when closed, at
    least one when open at all; never more than `slots` when the gate counts slots."""
    if budget <= 0 or limit <= 0:
        return 0
    allowed = min(limit, max(1, math.ceil(budget * limit - 1e-9)))
    return allowed if slots is None else min(allowed, max(slots, 0))


def limits(names: Sequence[str], queue_limits: Mapping[str, int], budgets: Mapping[str, float],
           concurrency: int) -> Dict[str, int]:
    """Per queue: how many may be in flight (its own limit or --concurrency, scaled by its budget)."""
    return {name: allowed_in_flight(budgets.get(name, 1.0), min(queue_limits.get(name) or concurrency, concurrency))
            for name in names}
