"""The arbiter: lifecycle, signals, the one wait, reaping, when to reconnect, systemd notify.

Each tick: wait (one sleep point) → handle signals → reap dead workers → collect outcomes →
take in messages → dispatch → flush writes → housekeeping. Signal handlers only record;
the loop acts. What goes where is the Dispatcher's (dispatch.py; its gate readings,
gate_sources.GateFeed's); what is held, written and settled is the books' (books.py); what
is read each tick, staged and leased, intake.py's; which workers to retire or replace, the
keeper's (upkeep.py); what a worker starts with, pool.py's; what is cancelled, the
watcher's (cancelwatcher.py); readiness and gauges, gauges.py's; whether the queue system
answers and the reconnect back-off, the link's (link.py). This is the one module
that knows both policy and mechanism. The clock, the pool and the wait are passed in, so
tests drive it in-process.
"""
from __future__ import annotations

import enum
import functools
import logging
import os
import random
import signal
import time
from multiprocessing.connection import wait as wait_for
from typing import Callable, List, Optional

from asyncproc import gate_sources, metrics, notify, outcomes, redact, runtime, worker
from asyncproc.books import Books
from asyncproc.cancelwatcher import CancelWatcher
from asyncproc.config import Settings
from asyncproc.dispatch import Dispatcher
from asyncproc.gauges import Gauges
from asyncproc.intake import Intake
from asyncproc.ledger import State
from asyncproc.link import RECONNECT_MIN, Link
from asyncproc.outcomes import Outcome
from asyncproc.pool import BootFailure, Pool, worker_spec
from asyncproc.timers import Timer
from asyncproc.transports import Transport, TransportError, open_transport
from asyncproc.upkeep import WorkerKeeper

log = logging.getLogger("asyncproc.supervisor")

HOUSEKEEPING_SECONDS = 1.0   # the longest the loop sleeps
STOP_FLUSH_SECONDS = 10.0    # at stop, how long unwritten results wait for the queue system
EXIT_INTERNAL_ERROR = 1


class Lifecycle(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"


def log_start(settings: Settings) -> None:
    """What runs, said once at start (no secret: the gateway URL is redacted)."""
    log.info("asyncproc starting: %d workers, concurrency %d, queues %s, gateway %s", settings.workers,
             settings.concurrency, ",".join(settings.queue_names), redact.url(settings.gateway.url))
    if not settings.gateway.tls.verify:
        log.warning("--gateway-tls-verify false: the gateway's certificate is not checked;"
                    " anyone on the path can read the requests and their credentials")


class Supervisor:
    def __init__(self, settings: Settings, transport: Optional[Transport] = None, pool=None,
                 clock: Callable[[], float] = time.time, wait: Callable = wait_for) -> None:
        self.settings = settings
        self.clock = clock
        self._wait = wait
        self.transport = transport or open_transport(settings)
        self.metrics = metrics.Metrics()
        self.health = metrics.Health()
        self.rng = random.Random()
        self.books = Books(settings, self.metrics, clock, self.rng)
        self.dispatcher = Dispatcher(settings, self.metrics, self.rng)
        self.books.tracing = self.dispatcher.tracing
        self.pool = pool if pool is not None else Pool(settings.capacity_per_worker(), functools.partial(worker_spec, settings))
        self.keeper = WorkerKeeper(settings, self.pool, self.books.ledger)
        self.gauges = Gauges(self.metrics, self.health, self.books, self.dispatcher, self.pool, self.transport)
        self.cancels = CancelWatcher(settings, self.transport, self.books, self.pool, self.metrics)
        self.gate_feed = gate_sources.GateFeed(self.dispatcher, self.metrics, clock, settings.redis.url, settings.redis.auth)
        self.inbound = Intake(self.transport, self.books, self.metrics, settings.concurrency + settings.intake_buffer)
        self.state = Lifecycle.STARTING
        self.deadline = Timer()              # DRAINING: end of the grace; STOPPING: of the flush
        self.signals: List[int] = []
        self.readable: set = set()           # what the last wait found ready
        self.link = Link(self.transport, self.metrics, clock, self.inbound.poll_now)
        self.notifier = notify.Notifier(os.environ)
        self.notified_ready = False
        self.watchdog = Timer(self.notifier.watchdog_interval)
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)

    ledger = property(lambda self: self.books.ledger)

    # -- lifecycle -------------------------------------------------------------------------
    def advance(self, now: float, signum: Optional[int] = None) -> None:
        """The lifecycle's one transition function: on a signal, or as time passes (the drain
        is done or out of time; the outbox is written or out of time)."""
        state = self.state
        if signum is not None:
            name = signal.Signals(signum).name
            if state in (Lifecycle.STARTING, Lifecycle.RUNNING):
                log.info("%s received: draining (grace %.0fs)", name, self.settings.operations.shutdown_grace_period)
                self._enter(Lifecycle.DRAINING, now)
            elif state is Lifecycle.STOPPING:
                log.warning("%s while stopping: exiting without waiting for the queue system", name)
                self._enter(Lifecycle.STOPPED, now)
            elif state is Lifecycle.DRAINING and signum == signal.SIGINT:
                log.warning("second SIGINT: stopping now, putting back what is unfinished")
                self.books.put_back(self.ledger.unfinished(), now)
                self._enter(Lifecycle.STOPPING, now)
            return
        if state is Lifecycle.DRAINING and (self.ledger.count(State.ASSIGNED) == 0 or self.deadline.due(now)):
            self.books.put_back(self.ledger.unfinished(), now)
            self._enter(Lifecycle.STOPPING, now)
        if self.state is Lifecycle.STOPPING:
            self.flush()
            if not self.books.unwritten():
                self._enter(Lifecycle.STOPPED, now)
            elif self.deadline.due(now):
                self.books.log_unwritten("queue system unreachable at stop: ")
                self._enter(Lifecycle.STOPPED, now)

    def _enter(self, state: Lifecycle, now: float) -> None:
        if state is self.state:
            return
        log.info("state %s -> %s", self.state.value, state.value)
        self.state = state
        if state is Lifecycle.DRAINING:  # intake stops; what is not dispatched goes back now
            self.notifier.send("STOPPING=1", "STATUS=draining")
            self.deadline.after(now, self.settings.operations.shutdown_grace_period)
            self.inbound.release_unclaimed()
            self.books.put_back(self.ledger.unfinished([State.WAITING]), now)
        elif state is Lifecycle.STOPPING:  # last step: write the outbox, waiting a little if need be
            self.deadline.after(now, STOP_FLUSH_SECONDS)

    def run(self) -> int:
        """Run until drained. 0 on a clean stop, 3 when workers or the endpoint cannot start,
        1 after an internal error in the loop (what was held is put back first)."""
        self._install_signals()
        runtime.tune_gc()
        try:
            server = metrics.serve(self.metrics, self.health, self.settings.operations.metrics_host,
                                   self.settings.operations.metrics_port)
        except OSError as exc:
            log.error("cannot serve metrics on %s:%d: %s", self.settings.operations.metrics_host,
                      self.settings.operations.metrics_port, exc.strerror or exc)
            return 3
        log_start(self.settings)
        code = 0
        try:
            self.start()
            while self.state is not Lifecycle.STOPPED:
                self.tick()
        except BootFailure as exc:
            log.error("cannot start workers: %s", exc)
            code = 3
        except Exception:
            log.exception("internal error in the supervisor loop; stopping (what is held is put back)")
            code = EXIT_INTERNAL_ERROR
            self.stop_after_error()
        finally:
            # Everything held was written, put back, or logged as lost: nothing a worker still does matters.
            self.pool.stop(timeout=1.0)
            self.dispatcher.tracing.close()
            self.transport.close()
            self.gate_feed.close()
            if server is not None:
                server.shutdown()
            signal.set_wakeup_fd(-1)
            self.notifier.close()
        log.info("asyncproc stopped")
        return code

    def start(self) -> None:
        """Workers started, the queue system connected (or reconnecting): running."""
        self.pool.start()
        self.link.connect()
        self._enter(Lifecycle.RUNNING, self.clock())

    def stop_after_error(self) -> None:
        """Put back everything unfinished and write the outbox, reconnecting for at most
        STOP_FLUSH_SECONDS (a signal stops the wait), as a drain out of time would."""
        try:
            self.state = Lifecycle.STOPPING
            now = self.clock()
            self.books.put_back(self.ledger.unfinished(), now)
            self.deadline.after(now, STOP_FLUSH_SECONDS)
            while self.books.unwritten() and not self.signals and not self.deadline.due(self.clock()):
                self.link.connect_if_due(self.clock())
                if not self.flush():
                    self._wait([self._wake_r], timeout=RECONNECT_MIN)
            if self.books.outbox:
                self.books.log_unwritten()
        except Exception:
            log.exception("internal error while putting back; stopping without it")
        self.state = Lifecycle.STOPPED

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
        """The one sleep point: a signal, a worker's pipe or death, new messages, or the
        next timer due."""
        objects: list = [self._wake_r, *self.pool.wait_objects()]
        fileno = self.transport.fileno() if self.link.connected and self.state is Lifecycle.RUNNING else None
        if fileno is not None:
            objects.append(fileno)
        timeout = self._timeout()
        window = self.dispatcher.window.seconds() if self.state is Lifecycle.RUNNING and timeout > 0 else 0.0
        if window:  # let outcomes gather (only a signal cuts it short), then take them all at once
            self._wait([self._wake_r], timeout=min(window, timeout))
            timeout = 0.0 if self.signals else max(timeout - window, 0.0)
        self.readable = set(self._wait(objects, timeout=timeout))

    def _timeout(self) -> float:
        if self.signals or self.inbound.more_to_read:
            return 0.0
        now = self.clock()
        wake = [now + HOUSEKEEPING_SECONDS]
        if self.link.connected and len(self.ledger) < self.inbound.capacity and self.state is Lifecycle.RUNNING:
            wake.append(self.inbound.retry_poll.at)
        if not self.link.connected:
            wake.append(self.link.reconnect.at)
        if self.state in (Lifecycle.DRAINING, Lifecycle.STOPPING):
            wake.append(self.deadline.at)
        if self.state is Lifecycle.STOPPING and self.link.connected and self.books.unwritten():
            return 0.0  # the last writes (a settling the write before left: Transport.settles_later)
        if self.notifier.watchdog_interval is not None:
            wake.append(self.watchdog.at)
        gates_due = self.gate_feed.next_due()
        if gates_due is not None and self.state is Lifecycle.RUNNING:
            wake.append(gates_due)
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
            self.advance(self.clock(), self.signals.pop(0))

    def reap(self) -> None:
        for handle in self.pool.reap():
            released = self.ledger.release_worker(handle.index)
            self.books.aborting.difference_update(r.key for r in released)  # a cancel still covers them
            self.books.preempting.difference_update(r.key for r in released)
            if released:
                log.warning("worker %d held %d requests; dispatching them again: %s", handle.index,
                            len(released), " ".join(r.key for r in released[:20]))

    def collect(self) -> None:
        for handle in self.pool.handles:
            if handle.conn not in self.readable:
                continue
            for message in self.pool.receive(handle):
                if message[0] == worker.DONE:
                    for key, wire in message[1]:
                        self.books.isolation.run("settle", key, None, self.settle, key, outcomes.from_wire(wire))

    def settle(self, key: str, outcome: Outcome) -> None:
        entry = self.ledger.settle(key)
        if entry is None:
            return  # a report for work already given to another worker
        now = self.clock()
        self.dispatcher.tracing.attempt_ended(key, outcome)
        if self.books.preempted(key, outcome):  # waits again, first in line: the attempt does not count
            self.metrics.of(self.metrics.preempted, entry.request.queue).inc()
            return
        outcome = self.books.aborted(key, outcome)  # cancelled in flight: never retried
        self.dispatcher.learn(entry.request, outcome, entry.dispatched_at, now)
        self.books.conclude(entry, outcome, now)

    def intake(self) -> None:
        """New messages and due retries while running (intake.py); the supervisor only
        flushes first when asked and reconnects after a TransportError."""
        self.inbound.more_to_read = False
        if self.state is Lifecycle.RUNNING and self.link.connected:
            self.inbound.step(self.clock(), self.flush, self.link.down)

    def dispatch(self) -> None:
        """Fill the workers' free room as the Dispatcher plans; one pipe write per worker."""
        if self.state is not Lifecycle.RUNNING:
            return
        now = self.clock()
        if self.gate_feed.refresh(now, self.ledger):  # readings due: gates decided again, and
            self.gate_feed.preempt(now, self.ledger, self.books.preempting, self.pool)  # aborts sent
        free = {h.index: h.capacity - self.ledger.assigned_count(h.index)
                for h in self.pool.handles if h.ready and not h.retiring}
        plan = self.dispatcher.plan(self.ledger, free, now)
        for request, exc in plan.failed:
            self.books.isolation.internal_error("dispatch", exc, request, None)
        sends = plan.sends
        if plan.tokened:  # a failed read dispatches: the in-flight watch still aborts them
            try:
                sends = self.cancels.before_send(plan.tokened, sends)
            except TransportError as exc:
                self.link.down(exc)
        handles = {h.index: h for h in self.pool.handles}
        for index, jobs in sends.items():
            self.pool.send_jobs(handles[index], jobs)  # a dead worker: reap() gives its work back

    def flush(self) -> bool:
        """Write the outbox; whether the queue system still answers."""
        if not self.link.connected:
            return False
        failure = self.books.flush(self.transport)
        if failure is not None:
            self.link.down(failure)
            return False
        self.link.written()  # only a write (or nothing left to write) shows the outage is over
        return True

    def housekeep(self) -> None:
        now = self.clock()
        for _ in self.pool.restart_due():
            self.metrics.worker_restarts.inc()
        self.keeper.housekeep(now)
        if self.link.connected:
            try:
                self.inbound.keep_alive(now)
                self.cancels.refresh(now)
            except TransportError as exc:
                self.link.down(exc)
        self.dispatcher.refresh_tokens(now)
        if self.state is not Lifecycle.STOPPED:
            self.link.connect_if_due(now)
        self.advance(now)
        try:
            self.gauges.update(now, self.state.value if self.state is not Lifecycle.RUNNING else None, self.link.connected)
        except TransportError as exc:
            self.link.down(exc)
        self.tell_systemd(now)

    def tell_systemd(self, now: float) -> None:
        """READY=1 once workers are up; WATCHDOG=1 while the loop turns (Type=notify)."""
        if not self.notified_ready and self.health.ready:
            self.notified_ready = True
            self.notifier.send("READY=1", f"STATUS=running, {self.settings.workers} workers")
        # systemd watches only after start-up
        if self.notifier.watchdog_interval is not None and self.notified_ready and self.watchdog.every(now):
            self.notifier.send("WATCHDOG=1")
