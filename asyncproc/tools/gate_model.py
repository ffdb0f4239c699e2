"""`python -m asyncproc.tools.gate_model`: the vllm gate's policy in a noise-free model of G2.

The benchmark (`asyncproc bench --online`) runs the real processes on a shared machine, where
online p99 (about the 11th slowest of 1,050 requests) moves by ±0.1x between identical
phases. This model runs the gate's own pure policy (`gates.observe`, `gates.decide`) against
a discrete-event model of the same pool, with a fake clock, in well under a second per
phase: `capacity` slots served first come first served for `service` seconds each, online
requests arriving at the benchmark's arrival times (`bench.arrival_times`, seeded), the pool
read every `interval` seconds (its running and waiting counts, as vLLM exports them), and
batch requests dispatched up to the gate's slots, each reaching the pool `delay` seconds after
it is dispatched and seen finished `delay` seconds after it finishes. What it leaves out:
CPU contention, HTTP overheads and jitter in the sim's own latency.

Each row is one gate configuration over several seeds (different arrival times): online p99 over
online alone with the same arrivals, and batch's share of the capacity online traffic left
idle, as the benchmark reports them.
"""
from __future__ import annotations

import argparse
import heapq
import random
import sys
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence

from asyncproc import gates
from asyncproc.tools.bench import ONLINE, Online, arrival_times

PAGE = gates.Scrape("http://model.invalid/metrics", 0.25)


@dataclass
class Result:
    p99: float
    online_busy: float      # mean online requests in service
    batch_busy: float       # mean batch requests in service
    surge_batch_busy: float  # the same, during the surge (the middle third)
    idle_used: float        # batch_busy / (capacity - online_busy)


def gate_of(capacity: int, interval: float, **params) -> gates.VllmGate:
    doc = {"type": "vllm", "url": PAGE.url, "capacity": capacity, "interval": interval, **params}
    return gates.parse(doc, gates.Defaults("redis://localhost", timeout=PAGE.timeout))


def run(o: Online, gate: Optional[gates.VllmGate], delay: float = 0.005, jitter: float = 0.05,
        warm: float = 5.0, ungated: bool = False) -> Result:
    """One phase: online alone when `gate` is None (batch at o.concurrency, ungated, with
    `ungated`), else batch (always waiting, at most o.concurrency in flight) dispatched as
    the gate decides. Readings come every interval
    stretched by up to `jitter` of it (a scrape takes time), so they do not lock in phase
    with batch requests of the same length."""
    service = o.service
    capacity = o.capacity
    start, end = warm, warm + o.seconds
    surge = (start + o.seconds / 3, start + 2 * o.seconds / 3)
    events: List[tuple] = []
    order = 0

    def at(when: float, kind: str, data: float = 0.0) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (when, order, kind, data))

    for t in arrival_times(o):
        at(start + t, "online", start + t)
    running = {"online": 0, "batch": 0}
    lined: List[tuple] = []          # waiting in the pool, first come first served
    head = 0
    busy = {"online": 0.0, "batch": 0.0, "surge": 0.0}
    latencies: List[float] = []
    own = 0                          # batch requests asyncproc counts in flight
    slots = 0
    load: Optional[gates.Load] = None
    if ungated:
        slots = o.concurrency
        at(0.0, "start")
    elif gate is not None:
        rng = random.Random(o.seed + 7919)
        t = 0.0
        while t < end:
            at(t, "read")
            t += gate.interval * (1 + jitter * rng.random())

    def serve(kind: str, arrived: float, now: float) -> None:
        running[kind] += 1
        at(now + service, kind + "-done", arrived)
        busy[kind] += max(min(now + service, end) - max(now, start), 0.0)
        if kind == "batch":
            busy["surge"] += max(min(now + service, surge[1]) - max(now, surge[0]), 0.0)

    def arrive(kind: str, now: float) -> None:
        if running["online"] + running["batch"] < capacity and head == len(lined):
            serve(kind, now, now)
        else:
            lined.append((kind, now))

    def dispatch(now: float) -> None:
        nonlocal own
        while own < min(slots, o.concurrency):
            own += 1
            at(now + delay, "batch")

    while events:
        now, _, kind, data = heapq.heappop(events)
        if now > end and kind in ("online", "read", "batch"):
            continue
        if kind in ("online", "batch"):
            arrive(kind, now)
        elif kind.endswith("-done"):
            done = kind[:-5]
            running[done] -= 1
            if done == "online":
                latencies.append(now - data)
            else:
                at(now + delay, "seen")
            if head < len(lined):
                nxt, arrived = lined[head]
                head += 1
                serve(nxt, arrived, now)
        elif kind in ("seen", "start"):
            own -= kind == "seen"
            dispatch(now)
        elif kind == "read" and gate is not None:
            page = (gates.Sample(gates.RUNNING, (), float(running["online"] + running["batch"])),
                    gates.Sample(gates.WAITING, (), float(len(lined) - head)))
            readings, taken = {PAGE: page}, {PAGE: now}
            load = gates.observe(gate, load, readings, taken, own, now)
            decision = gates.decide(gate, readings, now, taken, {gate.pages: own}, {gate.pages: load})
            slots = gates.allowed_in_flight(decision.budget, o.concurrency, decision.slots)
            dispatch(now)
    latencies.sort()
    p99 = latencies[min(int(len(latencies) * 0.99), len(latencies) - 1)]
    online_busy, batch_busy = busy["online"] / o.seconds, busy["batch"] / o.seconds
    return Result(p99, online_busy, batch_busy, busy["surge"] / (surge[1] - surge[0]),
                  batch_busy / max(capacity - online_busy, 1e-9))


def clairvoyant(o: Online, step: float = 0.001) -> float:
    """The share of the idle capacity a scheduler that knew every future online arrival could
    give batch requests of the same length without delaying any online request: starting one
    whenever a slot stays free of online work for a whole service time (greedy, in steps)."""
    ticks, length = int(o.seconds / step), int(round(o.service / step))
    present = [0] * (ticks + length + 1)       # online requests in the pool (served or waiting), alone
    free = [0.0] * o.capacity
    for t in arrival_times(o):
        begins = max(t, heapq.heappop(free))
        heapq.heappush(free, begins + o.service)
        for k in range(int(t / step), min(int((begins + o.service) / step), len(present))):
            present[k] += 1
    online = sum(min(n, o.capacity) for n in present[:ticks]) * step / o.seconds
    for k in range(ticks):                    # batch starting at k: present + 1 <= capacity throughout
        while max(present[k:k + length]) < o.capacity:
            for j in range(k, k + length):
                present[j] += 1
    used = sum(min(n, o.capacity) for n in present[:ticks]) * step / o.seconds - online
    return used / (o.capacity - online)


def sweep(o: Online, configs: Sequence[Dict], seeds: Sequence[int], delay: float = 0.005) -> List[tuple]:
    """Per configuration (gate parameters; "interval" among them): the p99 ratios and idle
    shares over the seeds."""
    rows = []
    alone = {seed: run(replace(o, seed=seed), None, delay).p99 for seed in seeds}
    for params in configs:
        params = dict(params)
        interval = params.pop("interval", o.interval)
        gate = gate_of(o.capacity, interval, **params)
        results = [run(replace(o, seed=seed), gate, delay) for seed in seeds]
        rows.append((dict(params, interval=interval), [r.p99 / alone[s] for r, s in zip(results, seeds)],
                     [r.idle_used for r in results], [r.surge_batch_busy for r in results]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asyncproc.tools.gate_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--online-scenario", choices=sorted(ONLINE), default="G2")
    parser.add_argument("--seeds", type=int, default=6, help="arrival sequences (seeds 1..N)")
    parser.add_argument("--surge", type=float, help="the surge's share of capacity (G2: 0.8)")
    parser.add_argument("--delay", type=float, default=0.005, help="seconds from dispatch to the pool and back")
    parser.add_argument("--gate", action="append", default=[], metavar="JSON",
                        help="vllm gate parameters, e.g. '{\"beta\": 0.5, \"interval\": 0.1}' (repeatable;"
                             " default: beta 0, 0.25, 0.5, 1 at intervals 0.2 and 0.1)")
    parser.add_argument("--clairvoyant", action="store_true",
                        help="also the bound: what a scheduler that knew every future arrival could use")
    args = parser.parse_args(argv)
    import orjson

    o = ONLINE[args.online_scenario]
    if args.surge is not None:
        o = replace(o, surge=args.surge)
    configs = [orjson.loads(g) for g in args.gate] or [
        {"beta": b, "interval": i} for i in (0.2, 0.1) for b in (0.0, 0.25, 0.5, 1.0)]
    seeds = range(1, args.seeds + 1)
    print(f"# model of {o.name}: capacity {o.capacity} x {o.service:g} s, online {o.rate:g}/s"
          + (f" surging to {o.surge_rate:g}/s" if o.surge else "") + f", seeds 1-{args.seeds}, delay {args.delay:g} s")
    width = max(5 * len(seeds) - 1, 22)
    print(f"{'gate':24} {'p99 x alone, per seed':{width}} {'worst':>5} {'idle used':>9} {'least':>5} {'in surge':>8}")
    ungated = [(run(replace(o, seed=s), None, args.delay, ungated=True), run(replace(o, seed=s), None, args.delay))
               for s in seeds]
    rows = [({"ungated": 1}, [u.p99 / a.p99 for u, a in ungated], [u.idle_used for u, _ in ungated],
             [u.surge_batch_busy for u, _ in ungated])]
    if args.clairvoyant:
        bound = [clairvoyant(replace(o, seed=s)) for s in seeds]
        rows.append(({"clairvoyant": 1}, [1.0] * len(bound), bound, [float("nan")] * len(bound)))
    for params, ratios, used, surge in rows + sweep(o, configs, seeds, args.delay):
        name = next((k for k in ("ungated", "clairvoyant") if k in params), None) or ",".join(
            f"{k}={v:g}" for k, v in sorted(params.items()))
        print(f"{name:24} {' '.join(f'{x:.2f}' for x in ratios):{width}} {max(ratios):5.2f} "
              f"{sum(used) / len(used):9.0%} {min(used):5.0%} {sum(surge) / len(surge):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
