"""The arbiter: one loop that owns the queues, the ledger, the pool and result publication.

Each tick: wait (one sleep point) → handle signals → reap dead workers → collect outcomes →
take in messages → dispatch → flush writes → housekeeping. Signal handlers only record;
the loop acts. This is the one module that knows both policy and mechanism.
"""
from __future__ import annotations

import enum
import logging
import os
import random
import signal
import time
from multiprocessing.connection import wait
from typing import Dict, List, Optional
from urllib.parse import urlsplit

import orjson

from asyncproc import credentials, gate_sources, gates, gateway, merge, messages, metrics, notify, outbox, redact, retry, worker
from asyncproc.config import QueueConfig, Settings
from asyncproc.ledger import Entry, Ledger, State
from asyncproc.messages import DeadLetter, Rejected, Request, Result
from asyncproc.outcomes import Assignment, Kind, Outcome
from asyncproc.pool import BootFailure, Pool
from asyncproc.transports import Delivery, Transport, TransportError, Unconfirmed, Writes, open_transport

log = logging.getLogger("asyncproc.supervisor")

RECEIVE_BATCH = 2000         # messages read from the transport per tick, at most
RETRY_POLL_SECONDS = 0.1     # how often the retry set is asked for due entries
HOUSEKEEPING_SECONDS = 1.0   # the longest the loop sleeps
QUEUE_STATS_SECONDS = 5.0
GAUGE_SECONDS = 0.25
RECONNECT_MIN, RECONNECT_MAX = 0.2, 10.0
RSS_CHECK_SECONDS = 5.0
STOP_FLUSH_SECONDS = 10.0    # at stop, how long unwritten results wait for Redis to return
CANCEL_POLL_SECONDS = 1.0    # how often cancellations are read


class Lifecycle(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Route:
    """Where one queue's requests go: gateway origin, paths, headers (objective, credentials)."""

    def __init__(self, queue: QueueConfig, settings: Settings,
                 token_files: Optional[Dict[str, credentials.TokenFile]] = None) -> None:
        url = queue.gateway or settings.inference_gateway
        parts = urlsplit(url)
        self.origin = credentials.origin(url)
        self.gateway_path = parts.path if parts.path not in ("", "/") else None
        self.queue_path = queue.path
        objective = queue.objective if queue.objective is not None else settings.inference_objective
        base = dict(gateway.BASE_HEADERS)
        if objective:
            base["x-gateway-inference-objective"] = objective
        headers = [*settings.gateway_headers, *queue.headers.items()]
        token = queue.token if queue.token is not None else settings.gateway_token
        path = queue.token_file or (settings.gateway_token_file if queue.token is None else "")
        token_file = None
        if path:
            token_files = {} if token_files is None else token_files
            token_file = token_files.get(path) or token_files.setdefault(path, credentials.TokenFile(path))
        self.auth = credentials.RouteAuth(base, url, headers, token, token_file)
        self.headers: Dict[str, str] = self.auth.headers

    def path(self, request: Request) -> str:
        return messages.request_path(request, self.queue_path, self.gateway_path)

    def refresh(self) -> None:
        if self.auth.refresh():
            self.headers = self.auth.headers


class Supervisor:
    def __init__(self, settings: Settings, transport: Optional[Transport] = None) -> None:
        self.settings = settings
        self.transport = transport or open_transport(settings)
        self.ledger = Ledger(settings.dispatch_order)
        self.metrics = metrics.Metrics()
        self.health = metrics.Health()
        self.pool = Pool(settings.threads_per_worker(), self._worker_spec)
        self.rng = random.Random()
        queues = settings.request_queues
        self.pick = merge.policy(settings.request_merge_policy, {q.name: q.weight for q in queues},
                                 {q.name: q.priority for q in queues}, settings.priority_aging)
        # Gates and limits: each queue's gate, its own in-flight limit, the budget decided last.
        self.gates = {q.name: settings.gate_of(q) for q in queues}
        self.queue_limits = {q.name: min(q.max_in_flight or settings.concurrency, settings.concurrency)
                             for q in queues}
        self.decisions: Dict[str, gates.Decision] = {}
        intervals: Dict = {}
        self.gate_reasons: Dict[str, str] = {}   # the last reason logged per queue
        for name, gate in self.gates.items():
            self.decisions[name] = gates.decide(gate, {})  # sources not read yet: closed, unless fail_open
            self.metrics.of(self.metrics.gate_budget, name).set(self.decisions[name].budget)
            for source, interval in gates.sources(gate).items():
                intervals[source] = min(interval, intervals.get(source, interval))
        self.sources = gate_sources.Sources(intervals, time.time, settings.redis_url,
                                            settings.redis_auth) if intervals else None
        self.held: Dict[tuple, int] = {}
        self.aimd = settings.adaptive
        self.aimd_state = gates.start(self.aimd) if self.aimd is not None else None
        self.token_files: Dict[str, credentials.TokenFile] = {}
        self.routes: Dict[str, Route] = {q.name: Route(q, settings, self.token_files)
                                         for q in settings.request_queues}
        self.default_route = Route(QueueConfig(""), settings, self.token_files)
        self.token_check_at = 0.0
        self.gateway_failures_logged: set = set()   # origins whose first failure was logged
        self.connected_once = False
        self.capacity = settings.concurrency + settings.intake_buffer
        self.state = Lifecycle.STARTING
        self.signals: List[int] = []
        self.readable: set = set()           # what the last wait found ready
        self.outbox = Writes()
        self.outbox_keys: List[str] = []     # ledger keys to forget once the outbox is written
        self.limits = settings.message_limits()
        self.redis_ok = False
        self.outage = False                  # logged as unreachable, no write has succeeded since
        self.subscriber_drops = 0            # the transport's count, last seen
        self.unclaimed: List[tuple] = []     # (parsed, delivery) read while the claim failed
        self.reconnect_at = 0.0
        self.reconnect_delay = RECONNECT_MIN
        self.next_retry_poll = 0.0
        self.more_to_read = False
        self.drain_deadline = 0.0
        self.stop_deadline = 0.0
        self.stats_at = 0.0
        self.gauges_at = 0.0
        self.keep_alive_at = 0.0
        self.cancelled = messages.Cancellations()
        self.cancel_poll_at = 0.0
        self.rss_check_at = 0.0
        self.notifier = notify.Notifier(os.environ)
        self.notified_ready = False
        self.watchdog_at = 0.0
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)

    # -- lifecycle -------------------------------------------------------------------------
    def set_state(self, state: Lifecycle) -> None:
        if state is not self.state:
            log.info("state %s -> %s", self.state.value, state.value)
            self.state = state

    def run(self) -> int:
        """Run until drained. 0 on a clean stop, 3 when workers or the endpoint cannot start."""
        self._install_signals()
        try:
            server = metrics.serve(self.metrics, self.health, self.settings.metrics_host,
                                   self.settings.metrics_port)
        except OSError as exc:
            log.error("cannot serve metrics on %s:%d: %s", self.settings.metrics_host,
                      self.settings.metrics_port, exc.strerror or exc)
            return 3
        log.info(
            "asyncproc starting: %d workers, concurrency %d, queues %s, gateway %s",
            self.settings.workers, self.settings.concurrency, ",".join(self.settings.queue_names),
            redact.url(self.settings.inference_gateway),
        )
        if not self.settings.gateway_tls.verify:
            log.warning("--gateway-tls-verify false: the gateway's certificate is not checked;"
                        " anyone on the path can read the requests and their credentials")
        code = 0
        try:
            self.pool.start()
            self._reconnect()
            self.set_state(Lifecycle.RUNNING)
            while self.state is not Lifecycle.STOPPED:
                self.tick()
        except BootFailure as exc:
            log.error("cannot start workers: %s", exc)
            code = 3
        finally:
            # Everything held was answered or put back: nothing a worker still does matters.
            self.pool.stop(timeout=1.0)
            self.transport.close()
            if self.sources is not None:
                self.sources.close()
            if server is not None:
                server.shutdown()
            signal.set_wakeup_fd(-1)
            self.notifier.close()
        log.info("asyncproc stopped")
        return code

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda num, _frame: self.signals.append(num))

    # -- the loop ------------------------------------------------------------------------------
    def tick(self) -> None:
        self.wait()
        self.handle_signals()
        self.reap()
        self.collect()
        self.intake()
        self.dispatch()
        self.flush()
        self.housekeep()

    def wait(self) -> None:
        objects: list = [self._wake_r, *self.pool.wait_objects()]
        fileno = self.transport.fileno() if self.redis_ok and self.state is Lifecycle.RUNNING else None
        if fileno is not None:
            objects.append(fileno)
        self.readable = set(wait(objects, timeout=self._timeout()))

    def _timeout(self) -> float:
        if self.signals or self.more_to_read:
            return 0.0
        now = time.time()
        wake = [now + HOUSEKEEPING_SECONDS]
        if self.redis_ok and len(self.ledger) < self.capacity and self.state is Lifecycle.RUNNING:
            wake.append(self.next_retry_poll)
        if not self.redis_ok:
            wake.append(self.reconnect_at)
        if self.state is Lifecycle.DRAINING:
            wake.append(self.drain_deadline)
        if self.state is Lifecycle.STOPPING:
            wake.append(self.stop_deadline)
        if self.notifier.watchdog_interval is not None:
            wake.append(self.watchdog_at)
        if self.sources is not None and self.state is Lifecycle.RUNNING:
            wake.append(self.sources.next_due())
        restart = self.pool.next_restart()
        if restart is not None:
            wake.append(now + max(restart - time.monotonic(), 0.0))
        return max(min(wake) - now, 0.0)

    def handle_signals(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        while self.signals:
            signum = self.signals.pop(0)
            name = signal.Signals(signum).name
            if self.state in (Lifecycle.STARTING, Lifecycle.RUNNING):
                log.info("%s received: draining (grace %.0fs)", name, self.settings.shutdown_grace_period)
                self.begin_drain()
            elif self.state is Lifecycle.STOPPING:
                log.warning("%s while stopping: exiting without waiting for Redis", name)
                self.set_state(Lifecycle.STOPPED)
            elif signum == signal.SIGINT:
                log.warning("second SIGINT: stopping now, putting back what is unfinished")
                self.put_back(self.ledger.unfinished())
                self.begin_stop()

    def reap(self) -> None:
        for handle in self.pool.reap():
            released = self.ledger.release_worker(handle.index)
            if released:
                log.warning("worker %d held %d requests; dispatching them again: %s", handle.index,
                            len(released), " ".join(r.key for r in released[:20]))

    def collect(self) -> None:
        for handle in self.pool.handles:
            if handle.conn not in self.readable:
                continue
            for message in self.pool.receive(handle):
                if message[0] == worker.DONE:
                    for key, outcome in message[1]:
                        self.isolated("settle", key, None, self.settle, key, outcome)

    def intake(self) -> None:
        """New messages and due retries, as far as there is room (pub/sub: drain it all)."""
        self.more_to_read = False
        if self.state is not Lifecycle.RUNNING or not self.redis_ok:
            return
        now = time.time()
        if self.unclaimed:
            self.claim_and_accept([])
            if not self.redis_ok:
                return
        try:
            if self.transport.must_drain:
                deliveries = self.transport.receive(RECEIVE_BATCH)
                self.more_to_read = len(deliveries) == RECEIVE_BATCH
                self.accept_new(deliveries, now)
            room = self.capacity - len(self.ledger)
            if room > 0 and now >= self.next_retry_poll:
                claimed = self.transport.claim_due(now, room)
                for delivery in claimed:
                    self.isolated("retry", None, delivery, self.accept_retry, delivery, now)
                room -= len(claimed)
                if room > 0 and not self.transport.must_drain:
                    deliveries = self.transport.receive(room)
                    self.accept_new(deliveries, now)
                    room -= len(deliveries)
                self.next_retry_poll = now if room <= 0 else now + RETRY_POLL_SECONDS
        except TransportError as exc:
            self.transport_down(exc)
        drops = self.transport.subscriber_drops
        if drops != self.subscriber_drops:
            self.metrics.subscriber_dropped.inc(drops - self.subscriber_drops)
            self.subscriber_drops = drops
        if self.transport.must_drain:
            self.stage_overflow(now)

    def dispatch(self) -> None:
        """Fill free worker threads from the waiting requests, as far as gates and limits let
        each queue; one pipe write per worker. What is held back stays waiting."""
        if self.state is not Lifecycle.RUNNING:
            return
        now = time.time()
        self.refresh_gates(now)
        free = {h.index: h.threads - self.ledger.assigned_count(h.index)
                for h in self.pool.handles if h.ready and not h.retiring}
        waiting = self.ledger.waiting_by_queue
        room = {q: self._limit(q) - self.ledger.assigned_in(q) for q, w in waiting.items() if w}
        view = {q: waiting[q] for q, r in room.items() if r > 0}
        total_room = (self.aimd_state.in_flight - self.ledger.count(State.ASSIGNED)
                      if self.aimd_state is not None else None)
        batches: Dict[int, List[Assignment]] = {}
        while free and view and (total_room is None or total_room > 0):
            index = max(free, key=free.__getitem__)
            if free[index] <= 0:
                break
            queue = self.pick(view, self.rng, now)
            if queue is None:
                break
            request = self.ledger.take(queue)
            self.ledger.assign(request.key, index, now)
            try:
                route = self.routes.get(request.queue, self.default_route)
                batches.setdefault(index, []).append(Assignment(
                    request.key, route.origin, route.path(request), orjson.dumps(request.payload),
                    route.headers, request.deadline, self.settings.connect_timeout,
                    self.settings.request_timeout,
                ))
            except Exception as exc:  # one request's bug costs that request, not the loop
                self.internal_error("dispatch", exc, request, None)
            if request.attempts == 0 and request.last_error is None:
                self.metrics.of(self.metrics.residence, request.queue).observe(max(now - request.received_at, 0.0))
            free[index] -= 1
            room[queue] -= 1
            if room[queue] <= 0 or not waiting[queue]:
                del view[queue]
            if total_room is not None:
                total_room -= 1
        handles = {h.index: h for h in self.pool.handles}
        for index, jobs in batches.items():
            self.pool.send_jobs(handles[index], jobs)  # a dead worker: reap() gives its work back
        self._note_held(room, total_room, any(n > 0 for n in free.values()))

    def _limit(self, queue: str) -> int:
        """How many of `queue`'s requests may be in flight: its limit scaled by its gate's budget."""
        limit = self.queue_limits.get(queue, self.settings.concurrency)
        decision = self.decisions.get(queue)
        return limit if decision is None else gates.allowed_in_flight(decision.budget, limit)

    def _note_held(self, room: Dict[str, int], total_room: Optional[int], threads_free: bool) -> None:
        """What waits although worker threads are free, and why (for the held-back gauge)."""
        held: Dict[tuple, int] = {}
        if threads_free:
            for queue, waiting in self.ledger.waiting_by_queue.items():
                if not waiting:
                    continue
                if room.get(queue, 1) <= 0:
                    decision = self.decisions.get(queue)
                    reason = "gate" if decision is not None and decision.budget < 1 else "queue_limit"
                elif total_room is not None and total_room <= 0:
                    reason = "adaptive"
                else:
                    continue
                held[(queue, reason)] = len(waiting)
        self.held = held

    def refresh_gates(self, now: float) -> None:
        """Take the readings that are due (short timeouts, see gate_sources) and decide again."""
        if self.sources is None or now < self.sources.next_due():
            return
        errors_before = dict(self.sources.errors)
        self.sources.refresh(now)
        for source, count in self.sources.errors.items():
            if count != errors_before.get(source, 0):
                self.metrics.of(self.metrics.gate_errors, gate_sources.describe(source)).inc(
                    count - errors_before.get(source, 0))
        for queue, gate in self.gates.items():
            decision = gates.decide(gate, self.sources.readings)
            self.decisions[queue] = decision
            self.metrics.of(self.metrics.gate_budget, queue).set(decision.budget)
            self.metrics.of(self.metrics.gate_decisions, queue, decision.reason).inc()
            if self.gate_reasons.get(queue) != decision.reason:
                self.gate_reasons[queue] = decision.reason
                if decision.reason.startswith("failed"):
                    log.warning("gate of %s: reading failed (%s); %s", queue, decision.detail,
                                "dispatching as if open" if decision.budget else "holding dispatch")
                else:
                    log.info("gate of %s: %s (budget %.2f)", queue, decision.reason, decision.budget)

    def flush(self) -> None:
        if not self.redis_ok:
            return
        if self.outbox:
            try:
                self.transport.write(self.outbox)
            except Exception as exc:  # TransportError, or a transport's bug on one item
                if not self.write_one_by_one(exc):
                    return
            for key in self.outbox_keys:
                self.ledger.forget(key)
            self.outbox, self.outbox_keys = Writes(), []
        if self.outage:  # only a write (or nothing left to write) shows the outage is over
            log.info("queue system reachable again")
            self.outage = False
        self.reconnect_delay = RECONNECT_MIN

    def write_one_by_one(self, failure: Exception) -> bool:
        """A write failed. If the queue system still answers, one item may be what it refuses
        (over proto-max-bulk-len, ...): write the items one at a time and replace each one
        refused on its own by an error result (a dead letter: dropped, logged). True when
        everything is written; False when even a small write fails (an outage)."""
        if isinstance(failure, Unconfirmed):  # written, not yet on enough replicas: wait
            self.transport_down(failure)
            return False
        try:
            self.transport.ping()
        except TransportError:
            self.transport_down(failure)
            return False
        fixed = Writes()
        items = outbox.singles(self.outbox)
        for n, single in enumerate(items):
            try:
                try:
                    self.transport.write(single)
                except Exception:
                    self.transport.write(single)  # once more: a passing fault is not the item's
            except Exception as exc:
                replacement = outbox.replacement(single, exc, self.settings.result_format)
                try:
                    self.transport.write(replacement)
                except Exception:
                    # the queue system refuses even a small write: not this item's fault
                    for rest in items[n:]:
                        outbox.extend(fixed, rest)
                    self.outbox = fixed
                    self.transport_down(failure)
                    return False
                kind = outbox.kind_of(single)
                self.metrics.of(self.metrics.writes_refused, kind).inc()
                log.error("the queue system refused a %s on its own (%s); %s instead", kind,
                          str(exc)[:200], "an error result was written" if kind != "dead letter"
                          else "it was dropped")
                single = replacement
            outbox.extend(fixed, single)
        return True

    def housekeep(self) -> None:
        now = time.time()
        for _ in self.pool.restart_due():
            self.metrics.worker_restarts.inc()
        self.pool.kill_silent(self.settings.worker_timeout)
        self.recycle_workers(now)
        self.keep_alive(now)
        self.refresh_cancellations(now)
        self.refresh_tokens(now)
        if not self.redis_ok and now >= self.reconnect_at and self.state is not Lifecycle.STOPPED:
            self._reconnect()
        if self.state is Lifecycle.DRAINING:
            if self.ledger.count(State.ASSIGNED) == 0 or now >= self.drain_deadline:
                self.put_back(self.ledger.unfinished())
                self.begin_stop()
        if self.state is Lifecycle.STOPPING:
            self.flush()
            if not self.outbox:
                self.set_state(Lifecycle.STOPPED)
            elif now >= self.stop_deadline:
                lost = [k for k, _, _ in self.outbox.results] + [
                    orjson.loads(raw).get("id") for raw, _, _ in self.outbox.retries]
                log.error("queue system unreachable at stop: %d results and put-backs not written"
                          " (ids: %s)", len(lost), " ".join(map(str, lost[:100])))
                self.set_state(Lifecycle.STOPPED)
        self._update_health(now)
        self.tell_systemd(now)

    # -- intake details ------------------------------------------------------------------------
    def accept_new(self, deliveries: List[Delivery], now: float) -> None:
        """Parse a batch, claim its ids (one replica processes each), accept what is ours."""
        fresh = []
        for delivery in deliveries:
            if delivery.state is not None:  # a due retry handed over with new work
                self.isolated("retry", None, delivery, self.accept_retry, delivery, now)
            else:
                fresh.append(delivery)
        if not fresh:
            return
        pairs = []
        for delivery in fresh:
            self.metrics.of(self.metrics.received, delivery.queue).inc()
            item = self.parse(delivery, now)
            if isinstance(item, DeadLetter):
                self.isolated("accept", item, delivery, self.accept, item, delivery)
            else:
                pairs.append((item, delivery))
        self.claim_and_accept(pairs)

    def claim_and_accept(self, pairs: List[tuple]) -> None:
        """Claim the ids (one replica processes each; pub/sub also records each message in
        Redis), then accept what is ours. If the claim fails, they wait unclaimed for the
        reconnect: nothing read is processed before Redis has it."""
        pairs = self.unclaimed + pairs
        self.unclaimed = []
        if not pairs:
            return
        try:
            ours = self.transport.claim([item.key for item, _ in pairs], [d for _, d in pairs])
        except TransportError as exc:
            self.transport_down(exc)
            self.unclaimed = pairs
            return
        except Exception as exc:  # a bug on this batch's ids: process them unclaimed
            self.metrics.of(self.metrics.internal_errors, pairs[0][1].queue, "claim").inc()
            log.error("internal error while claiming %d ids (%s); processing them unclaimed",
                      len(pairs), type(exc).__name__)
            ours = [True] * len(pairs)
        for (item, delivery), mine in zip(pairs, ours):
            if mine:
                self.isolated("accept", item, delivery, self.accept, item, delivery)
            else:
                self.metrics.of(self.metrics.skipped, item.queue, "claimed-or-done").inc()
                log.debug("id=%s is claimed by another replica or already answered", item.key,
                          extra={"id": item.id})

    def parse(self, delivery: Delivery, now: float):
        try:
            return messages.parse_request(delivery.raw, delivery.queue, now, self.limits)
        except Exception as exc:  # parse_request never raises; if it does, one message pays
            self.metrics.of(self.metrics.internal_errors, delivery.queue, "parse").inc()
            log.error("internal error while parsing a message from %s (%s); dead-lettering it",
                      delivery.queue, type(exc).__name__)
            return DeadLetter(bytes(delivery.raw[:messages.RAW_EXCERPT_BYTES]), "internal error while parsing",
                              delivery.queue, now)

    def isolated(self, stage: str, item, delivery: Optional[Delivery], call, *args) -> None:
        """One message's step. An unexpected error costs that message an error result (or a
        dead letter), a count and one log line; never the loop, never another message."""
        try:
            call(*args)
        except Exception as exc:
            if isinstance(item, str):  # an id key (an outcome's): the ledger knows the request
                entry = self.ledger.entry(item)
                item = entry.request if entry is not None else None
            if item is None and delivery is not None and delivery.state is not None:
                decoded = messages.decode_state(delivery.state, delivery.queue)
                item = decoded if isinstance(decoded, Request) else None
            self.internal_error(stage, exc, item, delivery)

    def internal_error(self, stage: str, exc: Exception, item, delivery: Optional[Delivery]) -> None:
        queue = getattr(item, "queue", None) or (delivery.queue if delivery is not None else "")
        self.metrics.of(self.metrics.internal_errors, queue, stage).inc()
        reason = f"internal error while {stage} ({type(exc).__name__})"
        if isinstance(item, (Request, Rejected)) and messages.usable_id(item.id):
            key = item.key
            log.error("id=%s: %s; answering it with an error result", key, reason, extra={"id": item.id})
            if self.ledger.holds(key):
                entry = self.ledger.withdraw(key) or self.ledger.settle(key) or self.ledger.entry(key)
                delivery = delivery or entry.delivery
                self.outbox_keys.append(key)
            self.queue_result(Result(item.id, queue, False, reason, attempts=item.attempts,
                                     metadata=item.metadata), delivery)
            return
        raw = delivery.raw if delivery is not None else b""
        log.error("%s on a message from %s; dead-lettering it", reason, queue or "the retry set")
        self.outbox.dead_letters.append((messages.encode_dead_letter(
            DeadLetter(bytes(raw[:messages.RAW_EXCERPT_BYTES]), reason, queue, time.time())), delivery))

    def queue_result(self, result: Result, delivery: Optional[Delivery]) -> None:
        """Encode a result into the outbox; one larger than --max-result-bytes becomes an
        error result naming its size (on every transport: Redis and its subscribers have
        limits of their own)."""
        raw = messages.encode_result(result, self.settings.result_format)
        limit = self.settings.max_result_bytes
        if len(raw) > limit:
            log.warning("id=%s: result of %d bytes is over --max-result-bytes (%d); writing an error"
                        " result instead", result.key, len(raw), limit, extra={"id": result.id})
            raw = messages.encode_result(Result(
                result.id, result.queue, False, f"result too large: {len(raw)} bytes, limit {limit}",
                status_code=result.status_code, attempts=result.attempts, metadata=result.metadata),
                self.settings.result_format)
        self.outbox.results.append((result.key, raw, delivery))

    def accept_retry(self, delivery: Delivery, now: float) -> None:
        """A due retry, a put-back request, or work abandoned by a holder that died."""
        if delivery.state is not None:
            parsed = messages.decode_state(delivery.state, delivery.queue)
        else:
            parsed = self.parse(delivery, now)
        if isinstance(parsed, Request) and parsed.deadline <= now:
            if not self.ledger.holds(parsed.key):
                self.finish(parsed, Result(parsed.id, parsed.queue, False,
                                           retry.deadline_exceeded(parsed.last_error),
                                           attempts=parsed.attempts, metadata=parsed.metadata),
                            delivery, retry.DEADLINE)
            else:
                self.outbox.drops.append(delivery)
            return
        self.accept(parsed, delivery)

    def accept(self, parsed, delivery: Optional[Delivery] = None) -> None:
        if isinstance(parsed, DeadLetter):
            self.metrics.of(self.metrics.bad_messages, parsed.queue, "dead-letter").inc()
            self.metrics.of(self.metrics.dead_letters, parsed.queue).inc()
            log.warning("dead-lettering a message from %s: %s", parsed.queue or "retry set",
                        parsed.reason)
            self.outbox.dead_letters.append((messages.encode_dead_letter(parsed), delivery))
        elif isinstance(parsed, Rejected):
            if self.ledger.holds(parsed.key):
                self._duplicate(parsed.key, parsed.queue, delivery)
                return
            self.metrics.of(self.metrics.bad_messages, parsed.queue, "error-result").inc()
            log.warning("id=%s rejected: %s", parsed.key, parsed.reason, extra={"id": parsed.id})
            self.queue_result(messages.rejected_result(parsed), delivery)
            late = parsed.reason == "deadline exceeded"
            self.metrics.of(self.metrics.results, parsed.queue, retry.DEADLINE if late else "invalid").inc()
        elif self.cancelled.covers(parsed) and not self.ledger.holds(parsed.key):
            log.info("id=%s cancelled", parsed.key, extra={"id": parsed.id})
            self.finish(parsed, messages.cancelled_result(parsed), delivery, messages.CANCELLED)
        elif not self.ledger.admit(parsed, delivery):
            self._duplicate(parsed.key, parsed.queue, delivery)

    def _duplicate(self, key: str, queue: str, delivery: Optional[Delivery]) -> None:
        self.metrics.of(self.metrics.skipped, queue, "in-flight").inc()
        if delivery is not None and delivery.token is not None:
            self.outbox.drops.append(delivery)
        log.warning("id=%s is already being processed; duplicate delivery ignored", key)

    def stage_overflow(self, now: float) -> None:
        """Keep memory bounded: what exceeds capacity waits in the retry set, due now."""
        excess = len(self.ledger) - self.capacity
        waiting = self.ledger.waiting_by_queue
        while excess > 0 and waiting:
            queue = max(waiting, key=lambda q: len(waiting[q]))
            if not waiting[queue]:
                return
            entry = self.ledger.take_last(queue)
            self.outbox.retries.append((messages.encode_state(entry.request), now, entry.delivery))
            self.metrics.of(self.metrics.staged, queue).inc()
            excess -= 1

    # -- outcomes ------------------------------------------------------------------------------
    def settle(self, key: str, outcome: Outcome) -> None:
        entry = self.ledger.settle(key)
        if entry is None:
            return  # a report for work already given to another worker
        before = entry.request
        request = before.after_attempt(None if outcome.kind is Kind.OK else outcome.describe())
        if outcome.kind is not Kind.EXPIRED:
            self.metrics.of(self.metrics.gateway_latency, request.queue).observe(outcome.elapsed)
        if outcome.kind is Kind.SHED:
            self.metrics.of(self.metrics.shed, request.queue).inc()
        self._note_gateway(request, outcome)
        now = time.time()
        if self.aimd_state is not None and outcome.kind is not Kind.EXPIRED:
            self.aimd_state = gates.adapt(self.aimd_state, self.aimd, outcome.status, outcome.kind is Kind.OK,
                                          outcome.elapsed, entry.dispatched_at, now)
        decision = retry.decide(outcome, request.attempts, request.deadline, now,
                                self.settings.backoff, self.rng, self.settings.max_attempts,
                                last_error=before.last_error)
        if isinstance(decision, retry.RetryAt):
            self.metrics.of(self.metrics.retries, request.queue, outcome.kind.value).inc()
            log.debug("id=%s attempt %d failed (%s); retry in %.2fs", key, request.attempts,
                      outcome.describe(), decision.due - now, extra={"id": request.id})
            self.outbox.retries.append((messages.encode_state(request), decision.due, entry.delivery))
            self.outbox_keys.append(key)
            return
        attempts = request.attempts if outcome.kind is not Kind.EXPIRED else before.attempts
        result = Result(
            request.id, request.queue, decision.ok, decision.reason,
            status_code=outcome.status, body=outcome.body, attempts=attempts,
            metadata=request.metadata,
        )
        if not decision.ok:
            log.warning("id=%s failed after %d attempts: %s", key, attempts, decision.reason,
                        extra={"id": request.id})
        self.finish(request, result, entry.delivery, decision.code)

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

    def finish(self, request: Request, result: Result, delivery: Optional[Delivery], code: str) -> None:
        self.queue_result(result, delivery)
        self.metrics.of(self.metrics.results, request.queue, code).inc()
        self.metrics.of(self.metrics.end_to_end, request.queue).observe(
            max(time.time() - (request.created or request.received_at), 0.0))
        if self.ledger.holds(request.key):
            self.outbox_keys.append(request.key)

    def refresh_tokens(self, now: float) -> None:
        """Token files are checked once a second (a stat each); a new token goes into the
        headers of every later assignment."""
        if not self.token_files or now < self.token_check_at:
            return
        self.token_check_at = now + 1.0
        if any([f.changed() for f in self.token_files.values()]):
            for route in (*self.routes.values(), self.default_route):
                route.refresh()

    def refresh_cancellations(self, now: float) -> None:
        """Read what `asyncproc cancel` named; answer held requests it covers that are not
        dispatched yet (dispatched ones finish). Later arrivals are answered at intake."""
        if now < self.cancel_poll_at or not self.redis_ok:
            return
        self.cancel_poll_at = now + CANCEL_POLL_SECONDS
        try:
            batches, ids = self.transport.cancellations(now)
        except TransportError as exc:
            self.transport_down(exc)
            return
        if batches == self.cancelled.batches and ids == self.cancelled.ids:
            return
        self.cancelled = messages.Cancellations(batches, ids)
        withdrawn = [e.request for e in self.ledger.unfinished([State.WAITING]) if self.cancelled.covers(e.request)]
        for request in withdrawn:
            entry = self.ledger.withdraw(request.key)
            self.finish(request, messages.cancelled_result(request), entry.delivery, messages.CANCELLED)
        if withdrawn:
            log.info("cancelled %d waiting requests: %s", len(withdrawn), " ".join(r.key for r in withdrawn[:20]))

    # -- drain and outages -----------------------------------------------------------------------
    def begin_drain(self) -> None:
        self.notifier.send("STOPPING=1", "STATUS=draining")
        self.set_state(Lifecycle.DRAINING)
        self.drain_deadline = time.time() + self.settings.shutdown_grace_period
        for item, delivery in self.unclaimed:  # read but never claimed: put back with the rest
            self.isolated("accept", item, delivery, self.accept, item, delivery)
        self.unclaimed = []
        self.put_back(self.ledger.unfinished([State.WAITING]))

    def begin_stop(self) -> None:
        """Last step: write what is in the outbox, waiting a little for Redis if it is away."""
        self.set_state(Lifecycle.STOPPING)
        self.stop_deadline = time.time() + STOP_FLUSH_SECONDS

    def put_back(self, entries: List[Entry]) -> None:
        """Unfinished work goes to the retry set, due now, so a restarted asyncproc finishes it.

        The ledger lets go at once: intake has stopped, and a late outcome for a request put
        back is ignored (it will be dispatched again: at-least-once).
        """
        now = time.time()
        for entry in entries:
            self.outbox.retries.append((messages.encode_state(entry.request), now, entry.delivery))
            self.ledger.forget(entry.request.key)
        if entries:
            log.info("putting back %d unfinished requests", len(entries))

    def transport_down(self, exc: Exception) -> None:
        """Stop using the queue system until the next reconnect. The back-off grows until a
        write succeeds again: a successful connect alone does not reset it."""
        self.metrics.transport_errors.inc()
        if not self.outage:  # once per outage; at start-up, say why the first connect failed
            if self.connected_once:
                log.error("queue system unreachable: %s; reconnecting", exc)
            else:
                text = str(exc)
                why = redact.cause(text)
                log.error("cannot connect to the queue system: %s; retrying",
                          text if why in text else f"{why}: {text}")
            self.outage = True
        self.redis_ok = False
        self.reconnect_at = time.time() + self.reconnect_delay
        self.reconnect_delay = min(self.reconnect_delay * 2, RECONNECT_MAX)

    def _reconnect(self) -> None:
        try:
            self.transport.connect()
        except TransportError as exc:
            self.transport_down(exc)
            return
        self.redis_ok = True
        self.connected_once = True
        self.next_retry_poll = 0.0

    def keep_alive(self, now: float) -> None:
        """Extend the leases of everything held, so no other replica takes it over."""
        interval = self.transport.keep_alive_interval
        if interval is None or not self.redis_ok or now < self.keep_alive_at:
            return
        self.keep_alive_at = now + interval
        held = self.ledger.deliveries()
        if held:
            try:
                self.transport.keep_alive(held)
            except TransportError as exc:
                self.transport_down(exc)

    def recycle_workers(self, now: float) -> None:
        """Retire workers past --worker-max-requests / --worker-max-rss once they hold no work."""
        max_requests, max_rss = self.settings.worker_max_requests, self.settings.worker_max_rss
        check_rss = max_rss and now >= self.rss_check_at
        if check_rss:
            self.rss_check_at = now + RSS_CHECK_SECONDS
        for handle in self.pool.handles:
            if not handle.retiring and handle.ready:
                if max_requests and handle.served >= max_requests:
                    handle.retiring = True
                    log.info("worker %d served %d requests; retiring it", handle.index, handle.served)
                elif check_rss:
                    rss = self.pool.rss(handle)
                    if rss is not None and rss > max_rss * 1024 * 1024:
                        handle.retiring = True
                        log.info("worker %d uses %.0f MiB (limit %.0f); retiring it", handle.index,
                                 rss / 1048576, max_rss)
            if handle.retiring and not handle.stop_sent and self.ledger.assigned_count(handle.index) == 0:
                self.pool.retire(handle)

    def tell_systemd(self, now: float) -> None:
        """READY=1 once workers are up; WATCHDOG=1 while the loop turns (Type=notify)."""
        if not self.notified_ready and self.health.ready:
            self.notified_ready = True
            self.notifier.send("READY=1", f"STATUS=running, {self.settings.workers} workers")
        interval = self.notifier.watchdog_interval  # systemd watches only after start-up
        if interval is not None and self.notified_ready and now >= self.watchdog_at:
            self.watchdog_at = now + interval
            self.notifier.send("WATCHDOG=1")

    # -- health and gauges ---------------------------------------------------------------------------
    def _update_health(self, now: float) -> None:
        self.health.last_tick = time.monotonic()
        alive = self.pool.alive()
        if self.state is not Lifecycle.RUNNING:
            self.health.ready, self.health.reason = False, self.state.value
        elif not self.redis_ok:
            self.health.ready, self.health.reason = False, "queue system unreachable"
        elif alive == 0:
            self.health.ready, self.health.reason = False, "no worker ready"
        else:
            self.health.ready, self.health.reason = True, "ready"
        if now < self.gauges_at:
            return
        self.gauges_at = now + GAUGE_SECONDS
        m = self.metrics
        assigned = self.ledger.count_by_queue(State.ASSIGNED)
        for queue in set(assigned) | set(self.routes):
            m.in_flight.labels(queue).set(assigned.get(queue, 0))
        m.waiting.set(self.ledger.count(State.WAITING))
        if self.aimd_state is not None:
            m.adaptive_limit.set(self.aimd_state.in_flight)
        held = self.held
        for queue in self.routes:
            for reason in ("gate", "queue_limit", "adaptive"):
                m.of(m.held_back, queue, reason).set(held.get((queue, reason), 0))
        m.workers_alive.set(alive)
        m.outbox.set(len(self.outbox))
        if self.redis_ok and now >= self.stats_at:
            self.stats_at = now + QUEUE_STATS_SECONDS
            try:
                for name, by_queue in self.transport.stats().items():
                    for queue, value in by_queue.items():
                        m.queue_gauges[name].labels(queue).set(value)
            except TransportError as exc:
                self.transport_down(exc)

    def _worker_spec(self, index: int, threads: int) -> worker.WorkerSpec:
        return worker.WorkerSpec(
            index=index, threads=threads, heartbeat=max(min(self.settings.worker_timeout / 4, 5.0), 0.1),
            log_format=self.settings.log_format, log_level=self.settings.log_level,
            tls=self.settings.gateway_tls,
        )
