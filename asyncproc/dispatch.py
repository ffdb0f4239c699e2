"""The Dispatcher: which waiting request goes to which free worker thread now, and what is
held back and why (README: gates, per-queue limits, adaptive concurrency, merge policies).
It learns from outcomes (adaptive concurrency, first gateway failures). No I/O: gate
readings are handed in (gate_sources.GateFeed), the clock is passed in.
"""
from __future__ import annotations

import logging
import random
from typing import AbstractSet, Dict, List, Mapping, NamedTuple, Optional, Tuple
from urllib.parse import urlsplit

import orjson

from asyncproc import aimd, credentials, gates, gateway, llmd, merge, messages, metrics, redact, tracing
from asyncproc.config import GatewayConfig, QueueConfig, Settings
from asyncproc.ledger import Ledger, State
from asyncproc.messages import Request
from asyncproc.outcomes import Assignment, Kind, Outcome
from asyncproc.timers import BatchWindow, Timer

log = logging.getLogger("asyncproc.supervisor")

TOKEN_CHECK_SECONDS = 1.0


class Route:
    """Where one queue's requests go: gateway origin, paths, headers (objective, credentials);
    the queue's own settings (--queues-file) over `defaults`, the gateway section."""

    def __init__(self, queue: QueueConfig, defaults: GatewayConfig,
                 token_files: Optional[Dict[str, credentials.TokenFile]] = None) -> None:
        url = queue.gateway or defaults.url
        parts = urlsplit(url)
        self.origin = credentials.origin(url)
        self.gateway_path = parts.path if parts.path not in ("", "/") else None
        self.queue_path = queue.path
        objective = queue.objective if queue.objective is not None else defaults.objective
        base = dict(gateway.BASE_HEADERS)
        if objective:
            base["x-gateway-inference-objective"] = objective
        headers = [*defaults.headers, *queue.headers.items()]
        token = queue.token if queue.token is not None else defaults.token
        path = queue.token_file or (defaults.token_file if queue.token is None else "")
        token_file = None
        if path:
            token_files = {} if token_files is None else token_files
            token_file = token_files.get(path) or token_files.setdefault(path, credentials.TokenFile(path))
        self.auth = credentials.RouteAuth(base, url, headers, token, token_file)
        self.headers: Dict[str, str] = self.auth.headers
        self.request_headers = queue.request_headers if queue.request_headers is not None else defaults.request_headers
        self.fairness = (defaults.fairness_header, defaults.fairness_metadata_key)

    def headers_for(self, request: Request) -> Dict[str, str]:
        """The route's headers, then the request's own, then the fairness header (llm-d-async)."""
        if not (request.headers or (self.fairness[0] and request.metadata)):
            return self.headers
        return llmd.merge_headers(self.headers, request.headers if self.request_headers else None,
                                  request.metadata, *self.fairness)

    def path(self, request: Request) -> str:
        return messages.request_path(request, self.queue_path, self.gateway_path)

    def refresh(self) -> None:
        if self.auth.refresh():
            self.headers = self.auth.headers


class Plan(NamedTuple):
    """One dispatch: assignments per worker index; what waits although workers have room,
    by (queue, reason); requests whose assignment could not be built (a bug: each is
    answered with an error result); the requests sent that carry an llm-d-async token
    (their cancel marker is read just before sending)."""

    sends: Dict[int, List[Assignment]]
    held: Dict[Tuple[str, str], int]
    failed: List[Tuple[Request, Exception]]
    tokened: List[Request]


class Dispatcher:
    def __init__(self, settings: Settings, metrics_: metrics.Metrics, rng: random.Random) -> None:
        self.settings = settings
        self.metrics = metrics_
        self.rng = rng
        queues = settings.request_queues
        self.pick = merge.policy(settings.dispatch.merge_policy, {q.name: q.weight for q in queues},
                                 {q.name: q.priority for q in queues}, settings.dispatch.priority_aging)
        # Gates and limits: each queue's gate, its own in-flight limit, the budget decided last.
        self.gates = {q.name: settings.gate_of(q) for q in queues}
        self.queue_limits = {q.name: min(q.max_in_flight or settings.concurrency, settings.concurrency)
                             for q in queues}
        self.decisions: Dict[str, gates.Decision] = {}
        self.gate_reasons: Dict[str, str] = {}   # the last reason logged per queue
        # vllm gates: the queues sending to each pool, and each pool's online-load estimate.
        self.pool_queues: Dict[gates.Pool, List[str]] = {}
        for name, gate in self.gates.items():
            for vllm in gates.vllm_gates(gate):
                if name not in self.pool_queues.setdefault(vllm.pages, []):
                    self.pool_queues[vllm.pages].append(name)
        self.sharing = {name: sorted({o for pool, qs in self.pool_queues.items() if name in qs for o in qs} - {name})
                        for name in self.gates}
        self.loads: Dict[gates.Pool, gates.Load] = {}
        # vllm gates with preempt: each pool's gate, and when its last abort was sent.
        self.preempting_gates = {v.pages: v for g in self.gates.values() for v in gates.vllm_gates(g) if v.preempt}
        self.last_preempt: Dict[gates.Pool, float] = {}
        for name, gate in self.gates.items():
            self.decisions[name] = gates.decide(gate, {})  # sources not read yet: closed, unless fail_open
            self.metrics.of(self.metrics.gate_budget, name).set(self.decisions[name].budget)
        self.held: Dict[Tuple[str, str], int] = {}
        self.aimd = settings.dispatch.adaptive
        self.aimd_state = aimd.start(self.aimd) if self.aimd is not None else None
        self.token_files: Dict[str, credentials.TokenFile] = {}
        self.routes: Dict[str, Route] = {q.name: Route(q, settings.gateway, self.token_files) for q in queues}
        self.default_route = Route(QueueConfig(""), settings.gateway, self.token_files)
        self.token_check = Timer(TOKEN_CHECK_SECONDS)
        self.gateway_failures_logged: set = set()   # origins whose first failure was logged
        self.window = BatchWindow()   # how long a tick lets outcomes gather
        self.tracing = tracing.load(settings.operations.tracing)   # --tracing; off: no-ops

    # -- gates -------------------------------------------------------------------------------
    def source_intervals(self) -> Dict[gates.Source, float]:
        """Every source some gate reads, at the shortest interval any gate wants."""
        intervals: Dict[gates.Source, float] = {}
        for gate in self.gates.values():
            for source, interval in gates.sources(gate).items():
                intervals[source] = min(interval, intervals.get(source, interval))
        return intervals

    def decide_gates(self, readings: Mapping[gates.Source, gates.Reading], now: float = 0.0,
                     taken: Optional[Mapping[gates.Source, float]] = None,
                     in_flight: Optional[Mapping[str, int]] = None) -> None:
        """Decide every queue's budget again from the latest readings (taken when `taken`
        says), with asyncproc's own requests in flight per queue (vllm gates subtract them)."""
        in_flight = in_flight or {}
        own = {pool: sum(in_flight.get(q, 0) for q in queues) for pool, queues in self.pool_queues.items()}
        for gate in {v for g in self.gates.values() for v in gates.vllm_gates(g)}:
            load = gates.observe(gate, self.loads.get(gate.pages), readings, taken, own[gate.pages], now)
            if load is not None:
                self.loads[gate.pages] = load
        for queue, gate in self.gates.items():
            decision = gates.decide(gate, readings, now, taken, own, self.loads)
            self.decisions[queue] = decision
            self.metrics.of(self.metrics.gate_budget, queue).set(decision.budget)
            if decision.slots is not None:
                self.metrics.of(self.metrics.gate_slots, queue).set(decision.slots)
            self.metrics.of(self.metrics.gate_decisions, queue, decision.reason).inc()
            if self.gate_reasons.get(queue) != decision.reason:
                self.gate_reasons[queue] = decision.reason
                if decision.reason.startswith("failed"):
                    log.warning("gate of %s: reading failed (%s); %s", queue, decision.detail,
                                "dispatching as if open" if decision.budget else "holding dispatch")
                elif decision.slots is not None:
                    log.info("gate of %s: %s (%d slots; %s)", queue, decision.reason, decision.slots, decision.detail)
                else:
                    log.info("gate of %s: %s (budget %.2f)", queue, decision.reason, decision.budget)

    def preemptions(self, ledger: Ledger, readings: Mapping[gates.Source, gates.Reading],
                    taken: Optional[Mapping[gates.Source, float]], preempting: AbstractSet[str],
                    now: float) -> Dict[int, List[str]]:
        """Per worker, the attempts to abort now so that online requests waiting at a pool
        get their slots (vllm gates with `preempt`; how many: `gates.preemptions`): the
        newest of the pool's queues' attempts, the least work lost. `preempting`: keys
        already being aborted. Nothing without a preempting gate."""
        plan: Dict[int, List[str]] = {}
        for pool, gate in self.preempting_gates.items():
            queues = self.pool_queues[pool]
            own = sum(ledger.assigned_in(q) for q in queues)
            since = self.last_preempt.get(pool, float("-inf"))
            if not own or not gates.preemptions(gate, readings, taken, own, 0, since, now):
                continue
            mine = [e for e in ledger.assigned() if e.request.queue in queues]
            pending = sum(1 for e in mine if e.request.key in preempting)
            more = gates.preemptions(gate, readings, taken, own, pending, since, now)
            newest = sorted((e for e in mine if e.request.key not in preempting and e.worker is not None),
                            key=lambda e: e.dispatched_at, reverse=True)[:more]
            for entry in newest:
                plan.setdefault(entry.worker, []).append(entry.request.key)
            if newest:
                self.last_preempt[pool] = now
        return plan

    def limit(self, queue: str, ledger: Optional[Ledger] = None) -> int:
        """How many of `queue`'s requests may be in flight: its limit scaled by its gate's
        budget, and within the slots a vllm gate leaves after the pool's other queues."""
        limit = self.queue_limits.get(queue, self.settings.concurrency)
        decision = self.decisions.get(queue)
        if decision is None:
            return limit
        slots = decision.slots
        if slots is not None and ledger is not None:
            slots -= sum(ledger.assigned_in(other) for other in self.sharing.get(queue, ()))
        return gates.allowed_in_flight(decision.budget, limit, slots)

    # -- the plan ----------------------------------------------------------------------------
    def plan(self, ledger: Ledger, free: Dict[int, int], now: float) -> Plan:
        """Fill the workers' `free` room (worker index -> requests it may take) from the waiting
        requests, as far as gates, queue limits and the adaptive limit let each queue. What
        is planned is taken from the waiting lines and marked assigned in the ledger."""
        free = dict(free)
        waiting = ledger.waiting_by_queue
        room = {q: self.limit(q, ledger) - ledger.assigned_in(q) for q, w in waiting.items() if w}
        view = {q: waiting[q] for q, r in room.items() if r > 0}
        total_room = (self.aimd_state.in_flight - ledger.count(State.ASSIGNED)
                      if self.aimd_state is not None else None)
        sends: Dict[int, List[Assignment]] = {}
        failed: List[Tuple[Request, Exception]] = []
        tokened: List[Request] = []
        while free and view and (total_room is None or total_room > 0):
            index = max(free, key=free.__getitem__)
            if free[index] <= 0:
                break
            queue = self.pick(view, self.rng, now)
            if queue is None:
                break
            request = ledger.take(queue)
            first = request.attempts == 0 and request.last_error is None and not ledger.entry(request.key).dispatched_at
            ledger.assign(request.key, index, now)
            try:
                sends.setdefault(index, []).append(self.assignment(request))
                if request.token:
                    tokened.append(request)
            except Exception as exc:  # one request's bug costs that request, not the loop
                failed.append((request, exc))
            if first:   # not again after a preemption or a worker's death
                self.metrics.of(self.metrics.residence, request.queue).observe(max(now - request.received_at, 0.0))
            free[index] -= 1
            room[queue] -= 1
            if room[queue] <= 0 or not waiting[queue]:
                del view[queue]
            if total_room is not None:
                total_room -= 1
        self.held = self._held(waiting, room, total_room, any(n > 0 for n in free.values()))
        return Plan(sends, self.held, failed, tokened)

    def assignment(self, request: Request) -> Assignment:
        route = self.routes.get(request.queue, self.default_route)
        bounds = self.settings.retry
        return Assignment(request.key, route.origin, route.path(request), orjson.dumps(request.payload),
                          self.tracing.attempt_started(request, route.headers_for(request)), request.deadline,
                          bounds.connect_timeout, bounds.request_timeout, self.settings.messages.max_response_bytes)

    def _held(self, waiting, room: Dict[str, int], total_room: Optional[int],
              workers_have_room: bool) -> Dict[Tuple[str, str], int]:
        """What waits although workers have room, and why (for the held-back gauge)."""
        held: Dict[Tuple[str, str], int] = {}
        if workers_have_room:
            for queue, lined in waiting.items():
                if not lined:
                    continue
                if room.get(queue, 1) <= 0:
                    decision = self.decisions.get(queue)
                    gated = decision is not None and (decision.budget < 1 or (
                        decision.slots is not None and decision.slots < self.queue_limits.get(queue, 0)))
                    reason = "gate" if gated else "queue_limit"
                elif total_room is not None and total_room <= 0:
                    reason = "adaptive"
                else:
                    continue
                held[(queue, reason)] = len(lined)
        return held

    # -- learning ----------------------------------------------------------------------------
    def learn(self, request: Request, outcome: Outcome, dispatched_at: float, now: float) -> None:
        """What one outcome says about the gateway: latency, sheds, the adaptive limit, and
        the first failure per gateway (logged once, at ERROR). An attempt aborted because
        its request was cancelled says nothing about the gateway."""
        if outcome.kind is Kind.CANCELLED:
            self.metrics.of(self.metrics.aborted, request.queue).inc()
            return
        if outcome.kind is not Kind.EXPIRED:
            self.metrics.of(self.metrics.gateway_latency, request.queue).observe(outcome.elapsed)
            self.window.learn(outcome.elapsed)
        if outcome.kind is Kind.SHED:
            self.metrics.of(self.metrics.shed, request.queue).inc()
        self._note_gateway(request, outcome)
        if self.aimd_state is not None and outcome.kind is not Kind.EXPIRED:
            self.aimd_state = aimd.adapt(self.aimd_state, self.aimd, outcome.status, outcome.kind is Kind.OK,
                                         outcome.elapsed, dispatched_at, now)

    def _note_gateway(self, request: Request, outcome: Outcome) -> None:
        """The first failed connection (or refused credentials) per gateway: why, once, at ERROR."""
        failed = (outcome.kind is Kind.RETRY and outcome.status is None) or outcome.status in (401, 403)
        if not failed:
            return
        origin = self.routes.get(request.queue, self.default_route).origin
        if origin in self.gateway_failures_logged:
            return
        self.gateway_failures_logged.add(origin)
        reason = outcome.describe()
        log.error("gateway %s: %s (%s); id=%s", redact.url(origin),
                  redact.cause(reason if outcome.status is None else f"HTTP {outcome.status}"), reason,
                  request.key, extra={"id": request.id})

    def refresh_tokens(self, now: float) -> None:
        """Token files are checked once a second (a stat each); a new token goes into the
        headers of every later assignment."""
        if not self.token_files or not self.token_check.every(now):
            return
        if any([f.changed() for f in self.token_files.values()]):
            for route in (*self.routes.values(), self.default_route):
                route.refresh()
