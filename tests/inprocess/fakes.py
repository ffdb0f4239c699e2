"""Test doubles of the supervisor's interfaces: a clock, a pool of workers and the wait.

The pool answers each assignment through `gateway(assignment, now) -> (Outcome, seconds)`
after that many seconds of the fake clock; the wait advances the clock to the next
answer (or its timeout), so a test of minutes of behaviour runs in milliseconds.
"""
from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from asyncproc import config, outcomes, worker
from asyncproc.outcomes import Assignment, Kind, Outcome
from asyncproc.supervisor import Lifecycle, Supervisor
from asyncproc.transports.memory import Memory

START = 1_700_000_000.0


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


@dataclass(eq=False)
class Handle:
    index: int
    capacity: int
    conn: object = field(default_factory=object)
    sentinel: object = field(default_factory=object)
    pid: int = 0
    ready: bool = True
    retiring: bool = False
    stop_sent: bool = False
    killed: bool = False
    dead: bool = False
    served: int = 0
    pending: List[Tuple[float, str, Outcome]] = field(default_factory=list)


def ok(_assignment: Assignment, _now: float) -> Tuple[Outcome, float]:
    return Outcome(Kind.OK, 200, b'{"ok": true}', elapsed=0.05), 0.05


def answers_after(seconds: float) -> Callable[[Assignment, float], Tuple[Outcome, float]]:
    """A gateway that answers every request with 200 `{}` after `seconds`."""
    def gateway(_assignment: Assignment, _now: float) -> Tuple[Outcome, float]:
        return Outcome(Kind.OK, 200, b"{}", elapsed=seconds), seconds
    return gateway


class FakePool:
    """Workers as plain objects; outcomes come back when the fake clock reaches them."""

    def __init__(self, clock: Clock, capacity: List[int],
                 gateway: Callable[[Assignment, float], Tuple[Outcome, float]] = ok) -> None:
        self.clock = clock
        self.capacity = capacity
        self.gateway = gateway
        self.slots: Dict[int, Optional[Handle]] = {}
        self.sent: List[Assignment] = []
        self.preempted: List[str] = []          # keys whose attempt was aborted by a preemption
        self.max_in_flight = 0
        self.restarts = 0
        self.fail: Optional[Exception] = None   # raised by receive(): a bug in the loop

    def start(self) -> None:
        for index, capacity in enumerate(self.capacity):
            self.slots[index] = Handle(index, capacity, pid=1000 + index)

    @property
    def handles(self) -> List[Handle]:
        return [h for h in self.slots.values() if h is not None]

    def in_flight(self) -> int:
        return sum(len(h.pending) for h in self.handles)

    def wait_objects(self) -> list:
        return [h.conn for h in self.handles]

    def alive(self) -> int:
        return sum(1 for h in self.handles if h.ready)

    def send_cancel(self, handle: Handle, keys: List[str]) -> bool:
        """The worker aborts these attempts at once (gateway.Gateway.cancel): CANCELLED now."""
        now = self.clock()
        handle.pending = [(now, key, outcomes.cancelled()) if key in keys else (at, key, outcome)
                          for at, key, outcome in handle.pending]
        return True

    def send_preempt(self, handle: Handle, keys: List[str]) -> bool:
        """The worker aborts these attempts if still in flight (gateway.Gateway.cancel with
        remember=False): CANCELLED now; one whose answer is already due keeps it."""
        now = self.clock()
        self.preempted.extend(k for at, k, _ in handle.pending if k in keys and at > now)
        handle.pending = [(now, key, outcomes.cancelled()) if key in keys and at > now else (at, key, outcome)
                          for at, key, outcome in handle.pending]
        return True

    def send_jobs(self, handle: Handle, jobs: List[Assignment]) -> bool:
        now = self.clock()
        for job in jobs:
            outcome, seconds = self.gateway(job, now)
            handle.pending.append((now + seconds, job.key, outcome))
            self.sent.append(job)
        assert len(handle.pending) <= handle.capacity, "more assignments than the worker's capacity"
        self.max_in_flight = max(self.max_in_flight, self.in_flight())
        return True

    def receive(self, handle: Handle, limit: int = 1000) -> list:
        if self.fail is not None:
            raise self.fail
        now = self.clock()
        due = [p for p in handle.pending if p[0] <= now]
        handle.pending = [p for p in handle.pending if p[0] > now]
        handle.served += len(due)
        return [(worker.DONE, [(key, outcome) for _, key, outcome in due])] if due else []

    def next_answer(self) -> Optional[float]:
        times = [p[0] for h in self.handles for p in h.pending]
        return min(times) if times else None

    def wait(self, objects: list, timeout: Optional[float] = None) -> list:
        """multiprocessing.connection.wait for the fake: the clock moves to what comes first
        (an answer counts only when a worker's pipe is among `objects`)."""
        if timeout:
            watching = any(h.conn in objects for h in self.handles)
            answer = self.next_answer() if watching else None
            self.clock.advance(timeout if answer is None else min(timeout, answer - self.clock()))
        now = self.clock()
        return [h.conn for h in self.handles if any(p[0] <= now for p in h.pending)]

    def retire(self, handle: Handle) -> None:
        handle.retiring = handle.stop_sent = handle.dead = True

    def rss(self, handle: Handle) -> Optional[int]:
        return None

    def kill(self, handle: Handle) -> bool:
        if handle.killed:
            return False
        handle.killed = handle.dead = True
        return True

    def reap(self) -> List[Handle]:
        dead = [h for h in self.handles if h.dead]
        for handle in dead:
            self.slots[handle.index] = None
        return dead

    def restart_due(self) -> List[Handle]:
        started = []
        for index, handle in self.slots.items():
            if handle is None:
                self.slots[index] = Handle(index, self.capacity[index], pid=2000 + self.restarts)
                self.restarts += 1
                started.append(self.slots[index])
        return started

    def next_restart(self) -> Optional[float]:
        return None

    def kill_silent(self, timeout: float) -> list:
        return []

    def stop(self, timeout: float) -> None:
        self.slots = {}


class Rig:
    """A supervisor on the memory transport, a fake pool and a fake clock, started."""

    def __init__(self, *args: str, gateway=ok, workers: int = 2, queues=("batch-queue",), start: bool = True) -> None:
        self.clock = Clock()
        self.settings = config.load_settings(["--workers", str(workers), "--metrics-port", "0", *args], environ={})
        self.transport = Memory(tuple(self.settings.queue_names or queues))
        self.pool = FakePool(self.clock, self.settings.capacity_per_worker(), gateway)
        self.sup = Supervisor(self.settings, self.transport, self.pool, self.clock, self.pool.wait)
        if start:
            self.sup.start()

    def request(self, id_value, deadline_in: float = 600.0, queue: Optional[str] = None, **extra) -> None:
        message = {"id": id_value, "deadline": self.clock() + deadline_in, "payload": {"prompt": f"p-{id_value}"}}
        message.update(extra)
        self.transport.enqueue(queue or self.settings.queue_names[0], message)

    def serve_at_most(self, capacity: int, seconds: float, on_request: Callable[[], object] = lambda: None) -> None:
        """The gateway from now on: `capacity` requests at once, each in `seconds`; it sheds
        (HTTP 429) the rest."""
        def gateway(_assignment: Assignment, _now: float) -> Tuple[Outcome, float]:
            on_request()
            if self.pool.in_flight() >= capacity:
                return Outcome(Kind.SHED, 429, b"", "HTTP 429", elapsed=0.01), 0.01
            return Outcome(Kind.OK, 200, b"{}", elapsed=seconds), seconds
        self.pool.gateway = gateway

    def requests(self, ids, **extra) -> None:
        for id_value in ids:
            self.request(id_value, **extra)

    def put_back(self) -> set:
        """The ids in the retry set."""
        return {json.loads(state)["id"] for _, state, _ in self.transport.retry_set}

    def run_until(self, predicate: Callable[[], object], seconds: float = 600.0) -> None:
        """Turn the loop until `predicate` holds, at most `seconds` of the fake clock."""
        end = self.clock() + seconds
        while not predicate():
            assert self.clock() < end, "condition not reached in time (fake clock)"
            assert self.sup.state is not Lifecycle.STOPPED or predicate(), "stopped before the condition"
            self.sup.tick()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.sup.signals.append(signum)

    def metric(self, metric, *labels: str) -> float:
        return self.sup.metrics.of(metric, *labels)._value.get() if labels else metric._value.get()

    def results(self) -> Dict:
        return {r["id"]: r for r in (self.transport.result_of(i) for i in set(self.transport.result_ids()))}


def vllm_pod_rig(gate: dict, *args: str, gateway=ok) -> Tuple["Rig", dict]:
    """A Rig whose `vllm` gate (`gate`'s keys over the pod's URL) reads a fake pod of vLLM:
    `pod["online"]` online requests running (4 at first) and `pod["waiting"]` waiting, with
    asyncproc's attempts in flight counted as running, as vLLM counts them."""
    from asyncproc.gates import Sample

    pod = {"online": 4, "waiting": 0}
    doc = {"type": "vllm", "url": "http://pod-a:8000/metrics", **gate}
    rig = Rig("--gate", json.dumps(doc), *args, gateway=gateway, start=False)

    def metrics_page(_source):
        running = pod["online"] + rig.pool.in_flight()
        return (Sample("vllm:num_requests_running", (("model_name", "m"),), float(running)),
                Sample("vllm:num_requests_waiting", (("model_name", "m"),), float(pod["waiting"])))

    rig.sup.gate_feed.sources.read = metrics_page
    rig.sup.start()
    return rig, pod
