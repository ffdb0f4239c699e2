"""`asyncproc bench` (or `python -m asyncproc.tools.bench`): throughput, latency and cost, measured.

Each scenario starts a private redis-server and the stand-in gateway, measures the
gateway alone at the scenario's concurrency, then runs the real asyncproc process tree,
produces N messages, collects every result, and prints one table row: messages/s (over
the middle 80% of results, so start-up and the last stragglers do not blur the rate),
p50/p99 end-to-end latency, CPU per message summed over the asyncproc tree (psutil), peak
RSS summed over the tree, and lost and duplicate counts.

Absolute figures move twice over between machines, so every run also measures a reference
on the same stand-in: one thread posting the same payload over one keep-alive
`http.client` connection (with the stand-in's latency set to 0), its CPU per POST, once
before the run and once after (the mean: a shared machine's speed drifts). The row
gives asyncproc's CPU per message as a multiple of it (`x ref`), and the stand-in's own
rate at the scenario's concurrency (`gw alone`) beside asyncproc's (`msg/s`).
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import orjson
import psutil
import redis

from asyncproc import config
from asyncproc.tools.local import Processes, find_redis_server, free_port, redis_answers, wait_for
from asyncproc.transports.redisbase import arriving

TRANSPORTS = ("redis-pubsub", "redis-sortedset", "redis-streams")


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    latency: str            # sim latency: "0" or "0.5-1.5"
    messages: int
    rate_503: float = 0.0
    describe: str = ""


SCENARIOS = {
    "P1": Scenario("P1", 16, "0", 20000, describe="zero latency, 16 in flight"),
    "P2": Scenario("P2", 256, "0.5-1.5", 10000, describe="latency 0.5-1.5 s, 256 in flight"),
    "P3": Scenario("P3", 1000, "0.5-1.5", 20000, describe="latency 0.5-1.5 s, 1000 in flight"),
    "P4": Scenario("P4", 16, "0", 20000, rate_503=0.1, describe="zero latency, 10% 503s"),
    "P5": Scenario("P5", 10000, "10-30", 30000, describe="latency 10-30 s, 10,000 in flight"),
}


@dataclass
class Row:
    scenario: str
    transport: str
    concurrency: int
    workers: int
    messages: int
    rate: float
    bound: Optional[float]
    gateway_rate: float
    p50: float
    p99: float
    cpu_us: float
    rss_mb: float
    lost: int
    duplicates: int
    ref_us: float = float("nan")   # CPU of one bare keep-alive http.client POST to the same stand-in
    mid_cpu_us: float = float("nan")   # CPU per message between the 10th and 90th percentile results


def sim_args(s: Scenario) -> List[str]:
    args = ["--latency-min", s.latency.split("-")[0], "--latency-max", s.latency.split("-")[1]] \
        if "-" in s.latency else ["--latency", s.latency]
    if s.rate_503:
        args += ["--rate-503", str(s.rate_503)]
    return args


def mean_latency(s: Scenario) -> float:
    if "-" in s.latency:
        low, high = (float(x) for x in s.latency.split("-"))
        return (low + high) / 2
    return float(s.latency)


def gateway_capacity(url: str, concurrency: int, seconds: float) -> float:
    """Requests/s the stand-in serves alone to `concurrency` keep-alive clients."""
    import aiohttp

    async def run() -> int:
        done = 0
        stop = time.monotonic() + seconds
        body = orjson.dumps({"model": "m", "prompt": "hi"})
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def client() -> None:
                nonlocal done
                while time.monotonic() < stop:
                    async with session.post(url + "/v1/completions", data=body,
                                            headers={"Content-Type": "application/json"}) as r:
                        await r.read()
                    if time.monotonic() <= stop:  # only what completed inside the window
                        done += 1
            await asyncio.gather(*(client() for _ in range(concurrency)))
        return done

    return asyncio.run(run()) / seconds


def bare_post_reference(url: str, seconds: float = 1.0, windows: int = 3) -> float:
    """CPU seconds per POST of one thread posting over one keep-alive `http.client`
    connection to the stand-in (latency 0): the cost of the HTTP exchange itself, measured on
    this machine, in this run, to compare asyncproc's cost per message with. The least of a
    few short windows: other work on the machine only ever adds to it."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    body = orjson.dumps({"model": "m", "prompt": "p0", "x_sim": {"latency": 0}})
    headers = {"Content-Type": "application/json"}
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        for _ in range(50):  # warm: the connection, the stand-in's code paths
            conn.request("POST", "/v1/completions", body, headers)
            conn.getresponse().read()
        costs = []
        for _ in range(windows):
            n, cpu0, stop = 0, time.thread_time(), time.monotonic() + seconds
            while time.monotonic() < stop:
                conn.request("POST", "/v1/completions", body, headers)
                conn.getresponse().read()
                n += 1
            costs.append((time.thread_time() - cpu0) / max(n, 1))
        return min(costs)
    finally:
        conn.close()


def tree_usage(root: psutil.Process) -> tuple:
    cpu, rss = 0.0, 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            cpu += times.user + times.system
            rss += proc.memory_info().rss
        except psutil.Error:
            pass
    return cpu, rss


class Collector(threading.Thread):
    """Reads results from the result queue of any transport; records when each arrived."""

    def __init__(self, client: redis.Redis, transport: str, key: str) -> None:
        super().__init__(daemon=True)
        self.client, self.transport, self.key = client, transport, key
        self.arrivals: Dict[str, List[float]] = {}
        self.count = 0
        self.running = True
        self.ready = threading.Event()
        self.pubsub = None
        if transport == "redis-pubsub":
            self.pubsub = client.pubsub(ignore_subscribe_messages=True)
            self.pubsub.subscribe(key)

    def record(self, raw: bytes) -> None:
        result = orjson.loads(raw)
        self.arrivals.setdefault(result["id"], []).append(time.time())
        self.count += 1

    def run(self) -> None:
        self.ready.set()
        last_id = "0"
        while self.running:
            if self.pubsub is not None:
                if not self.pubsub.connection.can_read(timeout=0.1):
                    continue
                for message in arriving(self.pubsub, sys.maxsize, 1.0):  # (a timeout mid-reply loses results)
                    self.record(message["data"])
            elif self.transport == "redis-sortedset":
                pipe = self.client.pipeline()
                pipe.lrange(self.key, 0, 999)
                pipe.ltrim(self.key, 1000, -1)
                items = pipe.execute()[0]
                for raw in items:
                    self.record(raw)
                if not items:
                    time.sleep(0.02)
            else:
                reply = self.client.xread({self.key: last_id}, count=1000, block=100)
                for _, entries in reply or []:
                    for entry_id, fields in entries:
                        last_id = entry_id
                        self.record(fields[b"message"])


def start_redis(procs: Processes, redis_server: str, workdir: str) -> tuple:
    """A private, unpersisted redis-server on a free port: (port, client), once it answers."""
    port = free_port()
    procs.start([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=30)
    wait_for(lambda: redis_answers(client), 10, "redis-server")
    return port, client


def run_one(s: Scenario, transport: str, workers: int, workdir: str, redis_server: str,
            capacity_seconds: float) -> Row:
    procs = Processes()
    try:
        port, client = start_redis(procs, redis_server, workdir)
        sim = procs.start([sys.executable, "-m", "asyncproc", "sim", "--port", "0", *sim_args(s)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        url = sim.stdout.readline().decode().strip().rsplit(" ", 1)[1]
        ref_before = bare_post_reference(url)
        if s.rate_503 or mean_latency(s) >= 5:  # 503s are not capacity; long latencies: the bound is exact
            gateway_rate = 0.0
        else:  # a window several latencies long, so requests cut off at its end weigh little
            gateway_rate = gateway_capacity(url, s.concurrency, max(capacity_seconds, 8 * mean_latency(s)))
        queue, results = "bench-requests", "bench-results"
        collector = Collector(redis.Redis(port=port, socket_timeout=30), transport, results)
        collector.start()
        collector.ready.wait()
        ap = procs.start([sys.executable, "-m", "asyncproc", "--redis-url", f"redis://127.0.0.1:{port}/0",
                          "--inference-gateway", url, "--message-queue-impl", transport,
                          "--redis.request-queue-name", queue, "--redis.result-queue-name", results,
                          "--concurrency", str(s.concurrency), "--workers", str(workers),
                          "--metrics-port", "0", "--log-level", "WARNING",
                          "--retry-base-delay", "0.01", "--retry-max-delay", "0.05"],
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, "asyncproc.log"), "ab"))
        root = psutil.Process(ap.pid)
        if transport == "redis-pubsub":
            wait_for(lambda: dict(client.pubsub_numsub(queue)).get(queue.encode(), 0) > 0, 30, "asyncproc to subscribe")
        wait_for(lambda: len(root.children()) >= workers, 30, "the workers")
        time.sleep(1.0)  # workers import and build their sessions
        cpu_before, _ = tree_usage(root)
        sent: Dict[str, float] = {}
        deadline = int(time.time() + 3600)
        pipe = client.pipeline(transaction=False)
        for i in range(s.messages):
            rid = f"m{i}"
            raw = orjson.dumps({"id": rid, "deadline": deadline, "payload": {"model": "m", "prompt": f"p{i}"}})
            if transport == "redis-pubsub":
                pipe.publish(queue, raw)
            elif transport == "redis-sortedset":
                pipe.zadd(queue, {raw: deadline})
            else:
                pipe.xadd(queue, {"message": raw})
            sent[rid] = time.time()
            if len(pipe) >= 1000:
                pipe.execute()
        pipe.execute()
        peak_rss = 0
        cpu_at: List[Tuple[float, float]] = []   # (when, the tree's CPU seconds so far)
        give_up = time.time() + max(120.0, 10 * s.messages / max(s.concurrency / max(mean_latency(s), 0.001), 100))
        while len(collector.arrivals) < s.messages and time.time() < give_up:
            cpu, rss = tree_usage(root)
            cpu_at.append((time.time(), cpu))
            peak_rss = max(peak_rss, rss)
            time.sleep(0.1)
        cpu_after, rss = tree_usage(root)
        cpu_at.append((time.time(), cpu_after))
        peak_rss = max(peak_rss, rss)
        collector.running = False
        collector.join(5)
        # The machine's speed drifts over minutes (a shared VM): the reference brackets the run.
        ref = (ref_before + bare_post_reference(url)) / 2
        rate, latencies, done = arrival_stats(collector.arrivals, sent)
        return Row(
            s.name, transport, s.concurrency, workers, s.messages, rate,
            s.concurrency / mean_latency(s) if mean_latency(s) else None, gateway_rate,
            _pct(latencies, 50), _pct(latencies, 99),
            (cpu_after - cpu_before) / max(done, 1) * 1e6, peak_rss / 1048576,
            s.messages - done, collector.count - done, ref * 1e6,
            steady_cpu(collector.arrivals, cpu_at) * 1e6,
        )
    finally:
        procs.stop()


# -- G1, G2: online traffic with and without batch -----------------------------------------------
@dataclass(frozen=True)
class Online:
    """The online-vs-batch scenario: an online load on a sim of limited capacity. G1: a fixed
    rate, smooth; G2: Poisson arrivals surging for the middle third of each phase."""

    name: str = "G1"
    capacity: int = 32
    latency: str = "0.4-0.6"
    share: float = 0.5         # of the capacity the online load keeps busy on average (outside a surge)
    seconds: float = 30.0
    concurrency: int = 32      # asyncproc's --concurrency for batch
    reserved: float = 0.125
    interval: float = 0.2
    gain: int = 4              # a gated phase with this many times --concurrency
    arrivals: str = "fixed"    # fixed | poisson
    surge: float = 0.0         # share of the capacity the online load takes in the middle third; 0 = none
    seed: int = 1              # Poisson arrivals: the same in every phase of a run
    beta: Optional[float] = None   # the vllm gate's headroom rule (None: its default)

    @property
    def service(self) -> float:
        return mean_latency(Scenario("", 0, self.latency, 0))

    @property
    def rate(self) -> float:
        return self.share * self.capacity / self.service

    @property
    def surge_rate(self) -> float:
        return self.surge * self.capacity / self.service


ONLINE = {
    "G1": Online(),
    "G2": Online("G2", capacity=8, latency="0.2", share=0.5, seconds=45.0, concurrency=8, reserved=0.25,
                 arrivals="poisson", surge=0.8),
}


@dataclass
class OnlineRow:
    phase: str
    online_n: int
    online_errors: int
    p50: float
    p99: float
    online_busy: float      # mean online requests served at once
    batch_busy: float       # mean batch requests served at once
    batch_rate: float       # batch results/s during the window
    idle_used: float        # batch_busy / (capacity - online_busy)
    shed: int
    surge_batch_busy: float = float("nan")   # mean batch requests served at once during the surge
    lost: int = 0           # batch requests neither answered nor back in the queue after a drain
    duplicates: int = 0
    alone_p99: float = float("nan")
    wasted: float = 0.0     # batch service thrown away (attempts aborted mid-request), over the idle capacity
    aborts: int = 0         # batch requests the sim saw aborted by their client (preempted)


def arrival_times(o: Online) -> List[float]:
    """Seconds from the start of the phase at which online requests are sent."""
    import random

    rng = random.Random(o.seed)
    third = o.seconds / 3
    times: List[float] = []
    t = 0.0
    while True:
        rate = o.surge_rate if o.surge and third <= t < 2 * third else o.rate
        t += rng.expovariate(rate) if o.arrivals == "poisson" else 1.0 / rate
        if t >= o.seconds:
            return times
        times.append(t)


def online_load(url: str, times: List[float], marks: List[float]) -> Dict:
    """Open loop: a request at each of `times` whatever the answers do; client-side latencies.
    At each of `marks` (seconds) the sim's stats are taken."""
    import aiohttp

    async def run() -> Dict:
        latencies: List[float] = []
        errors = 0
        snapshots: List[Dict] = []
        body = orjson.dumps({"model": "m", "prompt": "online"})
        headers = {"Content-Type": "application/json", "x-gateway-inference-objective": "online"}
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def one() -> None:
                nonlocal errors
                started = time.monotonic()
                try:
                    async with session.post(url + "/v1/completions", data=body, headers=headers) as r:
                        await r.read()
                        if r.status != 200:
                            errors += 1
                            return
                except aiohttp.ClientError:
                    errors += 1
                    return
                latencies.append(time.monotonic() - started)

            async def mark(at: float) -> None:
                await asyncio.sleep(max(start + at - time.monotonic(), 0))
                snapshots.append(await loop.run_in_executor(None, sim_stats, url))

            tasks = []
            start = time.monotonic()
            tasks.extend(asyncio.ensure_future(mark(at)) for at in marks)
            for at in times:
                delay = start + at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one()))
            await asyncio.gather(*tasks)
        return {"latencies": latencies, "errors": errors, "snapshots": snapshots}

    return asyncio.run(run())


def online_phases(o: Online, url: str) -> List[tuple]:
    """(phase, gate, --concurrency) for each phase of the scenario."""
    scrape = {"type": "endpoint-scrape", "url": url + "/metrics", "capacity": o.capacity,
              "reserved": o.reserved, "interval": o.interval}
    running = dict(scrape, metric="vllm:num_requests_running")
    vllm = {"type": "vllm", "url": url + "/metrics", "capacity": o.capacity, "interval": o.interval}
    if o.beta is not None:
        vllm["beta"] = o.beta
    if o.name == "G1":
        return [
            ("no batch", None, o.concurrency),
            ("ungated batch", "", o.concurrency),
            ("gated: all running", running, o.concurrency),
            (f"gated: all running x{o.gain}", running, o.gain * o.concurrency),
            ("gated: online running", dict(scrape, metric="sim_running_requests", labels={"objective": "online"}),
             o.concurrency),
            ("gated: vllm", vllm, o.concurrency),
        ]
    waiting = {"type": "endpoint-scrape", "url": url + "/metrics", "metric": "vllm:num_requests_waiting",
               "capacity": 1, "interval": o.interval}
    return [
        ("no batch", None, o.concurrency),
        ("ungated batch", "", o.concurrency),
        ("gated: running", dict(running, reserved=0.0), o.concurrency),
        (f"gated: running r={o.reserved:g}", running, o.concurrency),
        ("gated: min(running,wait)", {"type": "min", "gates": [running, waiting]}, o.concurrency),
        ("gated: vllm", vllm, o.concurrency),
    ]


def run_online(o: Online, redis_server: str, workdir: str, workers: int, only: Optional[List[str]] = None,
               full_surge: bool = False, variants: Sequence[Dict] = ()) -> List[OnlineRow]:
    """Phases on one sim: online alone; with ungated batch; with batch under the existing gates
    and under the vllm gate (and its `variants`); with `full_surge`, online alone and under
    the vllm gate and its variants once more with the surge at 100% of capacity (batch must
    stop; nothing lost)."""
    procs = Processes()
    rows: List[OnlineRow] = []
    try:
        port, client = start_redis(procs, redis_server, workdir)
        lat = ["--latency-min", *o.latency.split("-")[:1], "--latency-max", o.latency.split("-")[1]] \
            if "-" in o.latency else ["--latency", o.latency]
        sim = procs.start([sys.executable, "-m", "asyncproc", "sim", "--port", "0", "--capacity", str(o.capacity),
                           *lat], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        url = sim.stdout.readline().decode().strip().rsplit(" ", 1)[1]
        phases = [(p, gate, c, o) for p, gate, c in online_phases(o, url)
                  if not only or p == "no batch" or any(w in p for w in only)]
        vllm = [(p, g, c) for p, g, c in online_phases(o, url) if p == "gated: vllm"][0]
        phases.extend(("vllm " + ",".join(f"{k}={v}" for k, v in extra.items()), dict(vllm[1], **extra), vllm[2], o)
                      for extra in variants)
        if full_surge:
            phases.append(("no batch, surge to 100%", None, o.concurrency, replace(o, surge=1.0)))
            phases.append(("vllm, surge to 100%", vllm[1], vllm[2], replace(o, surge=1.0)))
            phases.extend([(name + ", surge 100%", gate, c, replace(o, surge=1.0))
                           for name, gate, c, _ in phases if name.startswith("vllm ") and "surge" not in name])
        for n, (phase, gate, concurrency, scenario) in enumerate(phases):
            row = online_phase(replace(scenario, concurrency=concurrency), phase, gate, url, port, client, workdir,
                               min(workers, concurrency), n)
            alone = [r.p99 for r in rows if r.phase.startswith("no batch")]   # the latest online-alone phase
            row.alone_p99 = alone[-1] if gate is not None and alone else row.p99
            rows.append(row)
            print(format_online(row), flush=True)
    finally:
        procs.stop()
    return rows


def online_phase(o: Online, phase: str, gate, url: str, port: int, client: redis.Redis, workdir: str,
                 workers: int, n: int) -> OnlineRow:
    procs = Processes()
    queue = f"g-{n}"
    total = 0
    try:
        if gate is not None:
            args = [sys.executable, "-m", "asyncproc", "--redis-url", f"redis://127.0.0.1:{port}/0",
                    "--inference-gateway", url, "--message-queue-impl", "redis-sortedset",
                    "--redis.request-queue-name", queue, "--redis.result-queue-name", queue + "-results",
                    "--concurrency", str(o.concurrency), "--workers", str(workers), "--metrics-port", "0",
                    "--inference-objective", "batch", "--log-level", "WARNING",
                    "--retry-base-delay", "0.05", "--retry-max-delay", "0.5"]
            if gate:
                args += ["--gate", orjson.dumps(gate).decode()]
            deadline = int(time.time() + 3600)
            total = int(2 * o.capacity / o.service * (o.seconds + 30))
            pipe = client.pipeline(transaction=False)
            for i in range(total):
                raw = orjson.dumps({"id": f"{queue}-{i}", "deadline": deadline, "payload": {"model": "m", "prompt": "b"}})
                pipe.zadd(queue, {raw: deadline})
                if len(pipe) >= 1000:
                    pipe.execute()
            pipe.execute()
            procs.start(args, stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, f"asyncproc-{n}.log"), "ab"))
            wait_for(lambda: client.llen(queue + "-results") >= o.capacity, 60, "batch results")
            time.sleep(3.0)  # let the gate settle before measuring
        third = o.seconds / 3
        before, results_before = sim_stats(url), client.llen(queue + "-results")
        load = online_load(url, arrival_times(o), [third, 2 * third] if o.surge else [])
        after, results_after = sim_stats(url), client.llen(queue + "-results")
    finally:
        procs.stop()  # asyncproc drains: what is in flight finishes, what waits goes back to the queue
    lost = duplicates = 0
    if total:
        answered = [orjson.loads(raw)["id"] for raw in client.lrange(queue + "-results", 0, -1)]
        from asyncproc.transports.keys import aux_key

        waiting = client.zrange(queue, 0, -1) + client.zrange(aux_key("asyncproc", queue, "leases"), 0, -1)
        back = {orjson.loads(raw)["id"] for raw in waiting}   # queued, or put back in the lease set
        duplicates = len(answered) - len(set(answered))
        lost = total - len(set(answered) | back)
    wait_for(lambda: sim_stats(url)["running"] == 0 and sim_stats(url)["waiting"] == 0, 120, "the sim to drain")
    elapsed = after["time"] - before["time"]
    busy = {k: after["busy_seconds"].get(k, 0.0) - before["busy_seconds"].get(k, 0.0) for k in ("online", "batch")}
    online_busy, batch_busy = busy["online"] / elapsed, busy["batch"] / elapsed
    wasted = (after.get("aborted_seconds", {}).get("batch", 0.0)
              - before.get("aborted_seconds", {}).get("batch", 0.0)) / elapsed
    aborts = after.get("aborted", {}).get("batch", 0) - before.get("aborted", {}).get("batch", 0)
    surge_busy = float("nan")
    if len(load["snapshots"]) == 2:
        first, last = load["snapshots"]
        surge_busy = ((last["busy_seconds"].get("batch", 0.0) - first["busy_seconds"].get("batch", 0.0))
                      / max(last["time"] - first["time"], 1e-9))
    latencies = sorted(load["latencies"])
    shed = after["by_status"].get("429", 0) - before["by_status"].get("429", 0)
    idle = max(o.capacity - online_busy, 1e-9)
    return OnlineRow(phase, len(latencies), load["errors"], _pct(latencies, 50), _pct(latencies, 99),
                     online_busy, batch_busy, (results_after - results_before) / elapsed,
                     batch_busy / idle, shed, surge_busy, lost, duplicates, wasted=wasted / idle, aborts=aborts)


def sim_stats(url: str) -> Dict:
    import urllib3

    return orjson.loads(urllib3.request("GET", url + "/sim/stats", timeout=5).data)


ONLINE_HEADER = (f"{'phase':24} {'online n':>8} {'err':>4} {'p50 s':>6} {'p99 s':>6} {'x alone':>7} "
                 f"{'online busy':>11} {'batch busy':>10} {'in surge':>8} {'batch/s':>7} {'idle used':>9} "
                 f"{'lost':>4} {'dup':>4} {'wasted':>6} {'aborts':>6}")


def format_online(r: OnlineRow) -> str:
    surge = "       -" if r.surge_batch_busy != r.surge_batch_busy else f"{r.surge_batch_busy:8.2f}"
    return (f"{r.phase:24} {r.online_n:8d} {r.online_errors:4d} {r.p50:6.3f} {r.p99:6.3f} {r.p99 / r.alone_p99:7.2f} "
            f"{r.online_busy:11.2f} {r.batch_busy:10.2f} {surge} {r.batch_rate:7.1f} {r.idle_used:9.0%} "
            f"{r.lost:4d} {r.duplicates:4d} {r.wasted:6.0%} {r.aborts:6d}")


def arrival_stats(arrivals: Dict, sent: Dict) -> Tuple[float, List[float], int]:
    """(steady rate between the 10th and 90th percentile of first arrivals, sorted
    send-to-first-result latencies, ids answered) of one run's results."""
    firsts = sorted(times[0] for times in arrivals.values())
    latencies = sorted(arrivals[rid][0] - sent[rid] for rid in arrivals if rid in sent)
    lo, hi = int(len(firsts) * 0.1), max(int(len(firsts) * 0.9) - 1, 0)
    rate = (hi - lo) / (firsts[hi] - firsts[lo]) if hi > lo and firsts[hi] > firsts[lo] else 0.0
    return rate, latencies, len(arrivals)


def steady_cpu(arrivals: Dict, cpu_at: List[Tuple[float, float]]) -> float:
    """CPU seconds per message between the 10th and 90th percentile of first arrivals (the
    window `arrival_stats` takes the rate over), from the tree's CPU sampled every 0.1 s and
    interpolated at the window's ends: a run's steady state, without its start (connections
    opened, the first fill) and its tail. nan when the window is too short to tell."""
    firsts = sorted(times[0] for times in arrivals.values())
    lo, hi = int(len(firsts) * 0.1), max(int(len(firsts) * 0.9) - 1, 0)
    if hi <= lo or len(cpu_at) < 2 or firsts[hi] - firsts[lo] < 1.0:
        return float("nan")
    times, cpus = [t for t, _ in cpu_at], [c for _, c in cpu_at]

    def cpu(at: float) -> float:
        i = min(max(bisect.bisect_left(times, at), 1), len(times) - 1)
        t0, t1 = times[i - 1], times[i]
        return cpus[i - 1] + (cpus[i] - cpus[i - 1]) * (min(max(at, t0), t1) - t0) / max(t1 - t0, 1e-9)

    return (cpu(firsts[hi]) - cpu(firsts[lo])) / (hi - lo)


def _pct(values: List[float], p: int) -> float:
    if not values:
        return float("nan")
    return values[min(int(len(values) * p / 100), len(values) - 1)]


HEADER = (f"{'scen':4} {'transport':15} {'inflight':>8} {'wrk':>3} {'msgs':>6} {'msg/s':>7} {'bound':>6} "
          f"{'gw alone':>8} {'p50 s':>6} {'p99 s':>6} {'cpu us/msg':>10} {'ref us':>6} {'x ref':>5} {'mid us':>6} "
          f"{'rss MB':>7} {'lost':>4} {'dup':>4}")


def format_row(r: Row) -> str:
    bound = f"{r.bound:6.0f}" if r.bound else "     -"
    gw = f"{r.gateway_rate:8.0f}" if r.gateway_rate else "       -"
    return (f"{r.scenario:4} {r.transport:15} {r.concurrency:8d} {r.workers:3d} {r.messages:6d} {r.rate:7.0f} {bound} "
            f"{gw} {r.p50:6.2f} {r.p99:6.2f} {r.cpu_us:10.0f} {r.ref_us:6.0f} {r.cpu_us / r.ref_us:5.2f} "
            f"{r.mid_cpu_us:6.0f} {r.rss_mb:7.0f} {r.lost:4d} {r.duplicates:4d}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="asyncproc bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                        help="scenario to run (repeatable; default all)")
    parser.add_argument("--transport", action="append", choices=TRANSPORTS,
                        help="transport (repeatable; default all)")
    parser.add_argument("--messages", type=int, default=0, help="messages per run (default: the scenario's)")
    parser.add_argument("--concurrency", type=int, default=0, help="override the scenario's in-flight count")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (default: asyncproc's own, one per CPU but one)")
    parser.add_argument("--capacity-seconds", type=float, default=3.0,
                        help="how long to measure the gateway alone")
    parser.add_argument("--json", help="also write the rows as JSON lines to this file")
    parser.add_argument("--curve", choices=("concurrency", "workers"),
                        help="instead of the scenarios: a scaling curve at 1 s gateway latency")
    parser.add_argument("--points", default="",
                        help="curve points (default: 16,64,256,1000,2000,4000 in flight; 1,2,4 workers)")
    parser.add_argument("--plot", help="with --curve: write a PNG plot here (needs matplotlib)")
    parser.add_argument("--online", action="store_true",
                        help="instead of the scenarios: online traffic with no batch, ungated and gated batch")
    parser.add_argument("--online-scenario", choices=sorted(ONLINE), default="G2",
                        help="--online: G1 (a fixed rate) or G2 (Poisson arrivals and a surge; the default)")
    parser.add_argument("--online-seconds", type=float, help="--online: seconds measured per phase")
    parser.add_argument("--reserved", type=float, help="--online: the endpoint-scrape gates' reserved share")
    parser.add_argument("--beta", type=float, help="--online: the vllm gate's headroom parameter")
    parser.add_argument("--vllm", action="append", default=[], metavar="JSON",
                        help="--online: one more vllm-gate phase with these parameters, e.g. '{\"beta\": 0.5}'"
                             " (repeatable)")
    parser.add_argument("--interval", type=float, help="--online: seconds between the gates' readings")
    parser.add_argument("--seed", type=int, help="--online: the Poisson arrivals' seed (default 1; the same in every phase)")
    parser.add_argument("--phases", default="",
                        help="--online: comma-separated words; only the phases naming one (and no batch) run")
    parser.add_argument("--full-surge", action="store_true",
                        help="--online: more phases with the surge at 100%% of capacity: online alone, the vllm"
                             " gate and each --vllm variant")
    parser.add_argument("--cluster", action="store_true",
                        help="instead of the scenarios: 1, 2, 3 replicas on a 3-master Redis Cluster and on one Redis")
    parser.add_argument("--replicas", default="1,2,3", help="--cluster: the replica counts")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the processes a run started are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    redis_server = find_redis_server()
    if redis_server is None:
        print("asyncproc bench: error: no redis-server found", file=sys.stderr)
        return 2
    print(f"# {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, Python "
          f"{sys.version.split()[0]}; gw alone = the stand-in gateway's own rate at the same concurrency")
    if args.cluster:
        from asyncproc.tools import bench_cluster

        return bench_cluster.main(redis_server, args.messages or 6000, args.concurrency or 16,
                                  [int(x) for x in args.replicas.split(",")], args.json)
    if args.online:
        o = ONLINE[args.online_scenario]
        changes = {"seconds": args.online_seconds, "reserved": args.reserved, "concurrency": args.concurrency or None,
                   "beta": args.beta, "interval": args.interval, "seed": args.seed}
        o = replace(o, **{k: v for k, v in changes.items() if v is not None})
        surge = f", surging to {o.surge_rate:.0f}/s for the middle third" if o.surge else ""
        print(f"# {o.name}: sim capacity {o.capacity}, latency {o.latency} s, online {o.rate:.0f}/s"
              f" ({o.arrivals}, {o.share:.0%} of capacity){surge}, batch --concurrency {o.concurrency},"
              f" endpoint-scrape gates reserve {o.reserved:.1%}, gates read every {o.interval} s"
              f" (vllm beta {'default' if o.beta is None else o.beta}), {o.seconds:.0f} s per phase"
              + (f", seed {o.seed}" if o.arrivals == "poisson" else ""))
        print(ONLINE_HEADER)
        with tempfile.TemporaryDirectory(prefix="asyncproc-bench-") as workdir:
            rows = run_online(o, redis_server, workdir, args.workers or config.default_workers(o.concurrency),
                              [w for w in args.phases.split(",") if w], args.full_surge,
                              [orjson.loads(v) for v in args.vllm])
        if args.json:
            with open(args.json, "ab") as out:
                for row in rows:
                    out.write(orjson.dumps(row.__dict__) + b"\n")
        return 0
    print(HEADER)
    if args.curve:
        rows = curve(args, redis_server)
        if args.plot:
            plot(rows, args.curve, args.plot)
        return 0 if all(r.lost == 0 and r.duplicates == 0 for r in rows) else 1
    rows = []
    for name in args.scenario or sorted(SCENARIOS):
        base = SCENARIOS[name]
        s = Scenario(base.name, args.concurrency or base.concurrency, base.latency,
                     args.messages or base.messages, base.rate_503, base.describe)
        workers = args.workers or config.default_workers(s.concurrency)
        for transport in args.transport or TRANSPORTS:
            rows.append(measure(s, transport, workers, args, redis_server))
    return 0 if all(r.lost == 0 and r.duplicates == 0 for r in rows) else 1


def measure(s: Scenario, transport: str, workers: int, args, redis_server: str) -> Row:
    """One run in a fresh work directory; its row printed (and appended to --json)."""
    with tempfile.TemporaryDirectory(prefix="asyncproc-bench-") as workdir:
        row = run_one(s, transport, workers, workdir, redis_server, args.capacity_seconds)
    print(format_row(row), flush=True)
    if args.json:
        with open(args.json, "ab") as out:
            out.write(orjson.dumps(row.__dict__) + b"\n")
    return row


def curve(args, redis_server: str) -> List[Row]:
    """Throughput and RSS against in-flight requests, or against worker processes."""
    default = "16,64,256,1000,2000,4000" if args.curve == "concurrency" else "1,2,4"
    points = [int(x) for x in (args.points or default).split(",")]
    transport = (args.transport or ["redis-streams"])[0]
    rows = []
    for point in points:
        concurrency = point if args.curve == "concurrency" else (args.concurrency or 1000)
        workers = point if args.curve == "workers" else (args.workers or config.default_workers(concurrency))
        s = Scenario(f"C{point}", concurrency, "1", args.messages or max(200, 8 * concurrency))
        rows.append(measure(s, transport, workers, args, redis_server))
    return rows


def plot(rows: List[Row], axis: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.concurrency if axis == "concurrency" else r.workers for r in rows]
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(xs, [r.rate for r in rows], "o-", label="asyncproc msg/s")
    if axis == "concurrency":
        left.plot(xs, [r.bound for r in rows], "--", color="grey", label="bound: in flight / latency")
        left.set_xscale("log")
    left.set_xlabel("requests in flight" if axis == "concurrency" else "worker processes")
    left.set_ylabel("messages/s")
    right = left.twinx()
    right.plot(xs, [r.rss_mb for r in rows], "s:", color="tab:red", label="RSS MB (tree)")
    right.set_ylabel("RSS MB")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
    left.set_title(f"asyncproc {rows[0].transport}, gateway latency 1 s, {os.cpu_count()} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
