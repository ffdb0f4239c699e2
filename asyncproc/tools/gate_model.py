"""`python -m asyncproc.tools.gate_model`: the vllm gate's policy in a noise-free model of G2.

The benchmark (`asyncproc bench --online`) runs the real processes on a shared machine, where
online p99 (about the 11th slowest of 1,050 requests) moves by ±0.1x between identical
phases. This model runs the gate's own pure policy (`gates.observe`, `gates.decide`) against
a discrete-event model of the same pool, with a fake clock, in well under a second per
phase: `capacity` slots served first come first served for `service` seconds each, online
requests arriving at the benchmark's arrival times (`bench.arrival_times`, seeded), the pool
read every `interval` seconds (its running and waiting counts, as vLLM exports them), and
batch requests dispatched up to the gate's slots, each reaching the pool `delay` seconds after
it is dispatched and seen finished `delay` seconds after it finishes. With the gate's
`preempt`, the attempts `gates.preemptions` names are aborted: the pool frees their slots
(or drops them from its line) `react` seconds after the reading, and their work so far is
counted as wasted, apart from batch work. What it leaves out: CPU contention, HTTP
overheads and jitter in the sim's own latency.

Each row is one gate configuration over several seeds (different arrival times): online p99 over
online alone with the same arrivals, and batch's share of the capacity online traffic left
idle, as the benchmark reports them (completed batch work only), and with preemption the
share of it wasted and the attempts aborted.
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
    batch_busy: float       # mean batch requests in service, completed work only
    surge_batch_busy: float  # the same, during the surge (the middle third)
    idle_used: float        # batch_busy / (capacity - online_busy)
    wasted: float = 0.0     # mean slots held by batch work that was then aborted (preempted)
    preempted: int = 0      # batch attempts aborted
    wasted_share: float = 0.0  # wasted / (capacity - online_busy)


def gate_of(capacity: int, interval: float, **params) -> gates.VllmGate:
    doc = {"type": "vllm", "url": PAGE.url, "capacity": capacity, "interval": interval, **params}
    return gates.parse(doc, gates.Defaults("redis://localhost", timeout=PAGE.timeout))


def run(o: Online, gate: Optional[gates.VllmGate], delay: float = 0.005, jitter: float = 0.05,
        warm: float = 5.0, ungated: bool = False, react: Optional[float] = None) -> Result:
    """One phase: online alone when `gate` is None (batch at o.concurrency, ungated, with
    `ungated`), else batch (always waiting, at most o.concurrency in flight) dispatched as
    the gate decides. Readings come every interval
    stretched by up to `jitter` of it (a scrape takes time), so they do not lock in phase
    with batch requests of the same length. With the gate's `preempt`, the batch attempts
    `gates.preemptions` names (the newest) are aborted: `react` seconds after the reading
    (default `delay`) the pool frees the slot (or drops the request from its line), and
    asyncproc sees the attempt end `delay` later; the work it had done is counted as
    wasted, not as batch work."""
    react = delay if react is None else react
    service = o.service
    capacity = o.capacity
    start, end = warm, warm + o.seconds
    surge = (start + o.seconds / 3, start + 2 * o.seconds / 3)
    events: List[tuple] = []
    order = 0

    def at(when: float, kind: str, data=None) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (when, order, kind, data))

    for t in arrival_times(o):
        at(start + t, "online", start + t)
    running = {"online": 0, "batch": 0}
    lined: List[tuple] = []          # waiting in the pool, first come first served: (kind, arrived, batch id)
    head = 0
    waiting = 0                      # in the line, less the batch requests aborted there
    busy = {"online": 0.0, "batch": 0.0, "surge": 0.0, "wasted": 0.0}
    latencies: List[float] = []
    own: Dict[int, float] = {}       # batch requests asyncproc counts in flight: id -> dispatched at
    state: Dict[int, list] = {}      # id -> [where: transit|lined|running|done|aborted, service start]
    aborting: set = set()            # ids whose abort was sent, outcome not seen yet
    last_abort = float("-inf")
    preempted = 0
    serial = 0
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

    def overlap(a: float, b: float, lo: float, hi: float) -> float:
        return max(min(b, hi) - max(a, lo), 0.0)

    def serve(kind: str, arrived: float, ident: Optional[int], now: float) -> None:
        running[kind] += 1
        if ident is not None:
            state[ident] = ["running", now]
        at(now + service, kind + "-done", (arrived, now, ident))

    def arrive(kind: str, ident: Optional[int], now: float) -> None:
        nonlocal waiting
        if running["online"] + running["batch"] < capacity and waiting == 0:
            serve(kind, now, ident, now)
        else:
            lined.append((kind, now, ident))
            waiting += 1
            if ident is not None:
                state[ident][0] = "lined"

    def next_in_line(now: float) -> None:
        nonlocal head, waiting
        while head < len(lined):
            kind, arrived, ident = lined[head]
            head += 1
            if ident is not None and state[ident][0] == "aborted":
                continue
            waiting -= 1
            serve(kind, arrived, ident, now)
            return

    def dispatch(now: float) -> None:
        nonlocal serial
        while len(own) < min(slots, o.concurrency):
            serial += 1
            own[serial] = now
            state[serial] = ["transit", now]
            at(now + delay, "batch", serial)

    while events:
        now, _, kind, data = heapq.heappop(events)
        if now > end and kind in ("online", "read", "batch"):
            if kind == "batch":
                own.pop(data, None)
            continue
        if kind == "online":
            arrive(kind, None, now)
        elif kind == "batch":
            if state[data][0] != "aborted":
                arrive(kind, data, now)
        elif kind.endswith("-done"):
            done = kind[:-5]
            arrived, began, ident = data
            if ident is not None and state[ident][0] == "aborted":
                continue                 # its slot was freed when it was aborted
            running[done] -= 1
            busy[done] += overlap(began, now, start, end)
            if done == "online":
                latencies.append(now - arrived)
            else:
                busy["surge"] += overlap(began, now, *surge)
                state[ident][0] = "done"
                at(now + delay, "seen", ident)
            next_in_line(now)
        elif kind == "abort":
            where, began = state[data]
            if where in ("transit", "lined", "running"):
                state[data][0] = "aborted"
                if where == "lined":
                    waiting -= 1
                elif where == "running":
                    running["batch"] -= 1
                    busy["wasted"] += overlap(began, now, start, end)
                    next_in_line(now)
                at(now + delay, "seen", data)
            # "done": the answer came first; it is seen as a completed attempt
        elif kind in ("seen", "start"):
            if kind == "seen":
                own.pop(data, None)
                aborting.discard(data)
            dispatch(now)
        elif kind == "read" and gate is not None:
            page = (gates.Sample(gates.RUNNING, (), float(running["online"] + running["batch"])),
                    gates.Sample(gates.WAITING, (), float(waiting)))
            readings, taken = {PAGE: page}, {PAGE: now}
            load = gates.observe(gate, load, readings, taken, len(own), now)
            decision = gates.decide(gate, readings, now, taken, {gate.pages: len(own)}, {gate.pages: load})
            slots = gates.allowed_in_flight(decision.budget, o.concurrency, decision.slots)
            more = gates.preemptions(gate, readings, taken, len(own), len(aborting), last_abort, now)
            if more:
                last_abort = now
                newest = sorted((k for k in own if k not in aborting), key=lambda k: own[k], reverse=True)[:more]
                for ident in newest:
                    aborting.add(ident)
                    preempted += 1
                    at(now + react, "abort", ident)
            dispatch(now)
    latencies.sort()
    p99 = latencies[min(int(len(latencies) * 0.99), len(latencies) - 1)]
    online_busy, batch_busy = busy["online"] / o.seconds, busy["batch"] / o.seconds
    idle = max(capacity - online_busy, 1e-9)
    wasted = busy["wasted"] / o.seconds
    return Result(p99, online_busy, batch_busy, busy["surge"] / (surge[1] - surge[0]), batch_busy / idle,
                  wasted, preempted, wasted / idle)


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
    """Per configuration (gate parameters; "interval" among them, and the model's "react"):
    the p99 ratios, idle shares, batch in the surge, wasted shares and preempted attempts
    over the seeds."""
    rows = []
    alone = {seed: run(replace(o, seed=seed), None, delay).p99 for seed in seeds}
    for params in configs:
        params = dict(params)
        interval = params.pop("interval", o.interval)
        react = params.pop("react", None)
        gate = gate_of(params.pop("capacity", o.capacity), interval, **params)
        results = [run(replace(o, seed=seed), gate, delay, react=react) for seed in seeds]
        shown = dict(params, interval=interval)
        if gate.capacity != o.capacity:
            shown["capacity"] = gate.capacity
        if react is not None:
            shown["react"] = react
        rows.append((shown, [r.p99 / alone[s] for r, s in zip(results, seeds)],
                     [r.idle_used for r in results], [r.surge_batch_busy for r in results],
                     [r.wasted_share for r in results], [r.preempted for r in results]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asyncproc.tools.gate_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--online-scenario", choices=sorted(ONLINE), default="G2")
    parser.add_argument("--seeds", type=int, default=6, help="arrival sequences (seeds 1..N)")
    parser.add_argument("--surge", type=float, help="the surge's share of capacity (G2: 0.8)")
    parser.add_argument("--delay", type=float, default=0.005, help="seconds from dispatch to the pool and back")
    parser.add_argument("--gate", action="append", default=[], metavar="JSON",
                        help="vllm gate parameters, e.g. '{\"beta\": 0.5, \"interval\": 0.1}', and the model's"
                             " \"react\" (seconds from a preemption to the freed slot; default --delay)"
                             " (repeatable; default: beta 0, 0.25, 0.5, 1 at intervals 0.2 and 0.1)")
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
    print(f"{'gate':34} {'p99 x alone, per seed':{width}} {'worst':>5} {'idle used':>9} {'least':>5} {'in surge':>8}"
          f" {'wasted':>6} {'aborts':>6}")
    ungated = [(run(replace(o, seed=s), None, args.delay, ungated=True), run(replace(o, seed=s), None, args.delay))
               for s in seeds]
    nothing = [0.0] * len(ungated)
    rows = [({"ungated": 1}, [u.p99 / a.p99 for u, a in ungated], [u.idle_used for u, _ in ungated],
             [u.surge_batch_busy for u, _ in ungated], nothing, nothing)]
    if args.clairvoyant:
        bound = [clairvoyant(replace(o, seed=s)) for s in seeds]
        rows.append(({"clairvoyant": 1}, [1.0] * len(bound), bound, [float("nan")] * len(bound), nothing, nothing))
    for params, ratios, used, surge, wasted, aborts in rows + sweep(o, configs, seeds, args.delay):
        name = next((k for k in ("ungated", "clairvoyant") if k in params), None) or ",".join(
            f"{k}={v:g}" if not isinstance(v, bool) else (k if v else f"no {k}") for k, v in sorted(params.items()))
        print(f"{name:34} {' '.join(f'{x:.2f}' for x in ratios):{width}} {max(ratios):5.2f} "
              f"{sum(used) / len(used):9.0%} {min(used):5.0%} {sum(surge) / len(surge):8.2f}"
              f" {sum(wasted) / len(wasted):6.0%} {sum(aborts) / len(aborts):6.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
