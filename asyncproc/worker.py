"""Worker process: one loop that sends each assignment over a kept-alive urllib3
connection, parks the socket until its answer arrives and reads it, plus helper threads for
whatever would make the loop wait; one Pipe to the supervisor.

The loop (`Loop`) never blocks on the gateway: it sends a request itself only over an open
connection with a body that fits the socket's empty send buffer, and reads an answer itself
only once all of it has arrived (`gateway.answer_state`). It opens connections itself too,
without waiting, to a plain-HTTP origin whose address a helper's connection found lately
(`Gateway.opens_now`); a burst to a new origin waits for one helper to find it
(`Loop.addresses_found`). Looking a name up, TLS, larger bodies and answers still arriving
go to helper threads, started as needed up to the worker's share of --concurrency, so a
gateway that trickles bytes holds a thread, never the loop. Thousands of requests waiting on a slow
gateway are thousands of parked sockets, not threads; an instant gateway's answers are read
where they are noticed, with no thread woken per request.

Spawned with a small picklable spec. Never touches Redis. Ignores SIGINT (the supervisor
decides), finishes in-flight work on SIGTERM or a "stop" message, and exits at once when
its pipe reaches EOF (the supervisor is gone: nobody would read the outcomes). Jobs arrive
and outcomes leave in batches, so a busy worker makes one pipe write for many requests:
after a turn that sent outcomes the loop lets answers gather for the batch window
(`timers.BatchWindow`), starting the jobs that come meanwhile; a cancel, a preemption or a
stop ends the wait.
The loop also ends attempts past their time budget (`Gateway.expire_overdue`).
"""
from __future__ import annotations

import logging
import os
import queue
import select
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, List, Optional, Tuple

from asyncproc import gateway, logs, outcomes, runtime
from asyncproc.gateway import Attempt
from asyncproc.outcomes import Assignment, Outcome
from asyncproc.timers import BatchWindow

log = logging.getLogger("asyncproc.worker")

# Messages on the pipe. Supervisor → worker: (JOBS, [tuple(Assignment), ...]) | (CANCEL, [key, ...])
# | (PREEMPT, [key, ...]) | (STOP,). Worker → supervisor: (READY, pid) | (DONE, [(key, to_wire(Outcome)), ...])
# | (BEAT,). (outcomes.py: why plain tuples.)
# CANCEL aborts the keys' attempts now or when they begin; PREEMPT only those in flight now.
JOBS, STOP, READY, DONE, BEAT, CANCEL, PREEMPT = "jobs", "stop", "ready", "done", "beat", "cancel", "preempt"
#: How often the loop looks for attempts past their budget, at most.
EXPIRY_CHECK_SECONDS = 0.1
#: A parked socket wakes the loop once when readable, then is parked again (re-armed).
PARKED = select.EPOLLIN | select.EPOLLONESHOT
#: An answer partly here is looked at again this often, and for at most this long before a
#: helper thread reads the rest (a server that writes headers and body apart: microseconds).
ARRIVING_LOOK_SECONDS = 0.001
ARRIVING_SECONDS = 0.01
#: While attempts wait for a helper to find their origin's address, the loop looks this often.
FINDING_LOOK_SECONDS = 0.005
#: A helper thread idle this long ends.
HELPER_IDLE_SECONDS = 60.0
# What a helper thread is asked to do with an attempt.
SEND, RECEIVE = "send", "receive"


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    capacity: int       # requests it may have in flight (its share of --concurrency)
    heartbeat: float
    log_format: str
    log_level: str
    tls: Optional[Any] = None   # config.TlsFiles for https gateways


class Outbox:
    """Outcomes from the loop and helper threads, sent in as few pipe writes as the load
    allows: whoever finds nobody sending sends everything queued, including what others
    added meanwhile."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.pending: List[tuple] = []
        self.sending = False
        self.send_lock = threading.Lock()
        self.sent_at = time.monotonic()

    def put(self, items: List[tuple]) -> None:
        with self.lock:
            self.pending.extend(items)
            if self.sending:
                return
            self.sending = True
        while True:
            with self.lock:
                batch, self.pending = self.pending, []
                if not batch:
                    self.sending = False
                    return
            self.send((DONE, [(key, outcomes.to_wire(outcome)) for key, outcome in batch]))

    def send(self, message: tuple) -> None:
        try:
            with self.send_lock:
                self.conn.send(message)
                self.sent_at = time.monotonic()
        except (OSError, ValueError):
            os._exit(0)  # the supervisor is gone


class Helpers:
    """Threads for the work that would make the loop wait (connecting, sending a large body,
    reading an answer still arriving), started when work waits and no thread is free, up to
    `limit`; one left idle for `idle_seconds` ends (a burst of new connections leaves no
    crowd of threads behind)."""

    def __init__(self, limit: int, work: Callable[[Tuple[str, Attempt]], None],
                 idle_seconds: float = HELPER_IDLE_SECONDS) -> None:
        self.limit = max(limit, 1)
        self.work = work
        self.idle_seconds = idle_seconds
        self.queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.waiting = 0     # items queued and not yet taken
        self.idle = 0        # threads waiting for an item
        self.threads: List[threading.Thread] = []
        self.started = 0     # threads ever started (their names)

    def submit(self, item: Tuple[str, Attempt]) -> None:
        with self.lock:
            self.waiting += 1
            start = self.waiting > self.idle and len(self.threads) < self.limit
            if start:
                thread = threading.Thread(target=self._run, name=f"help-{self.started}", daemon=True)
                self.started += 1
                self.threads.append(thread)
        self.queue.put(item)
        if start:
            thread.start()

    def _run(self) -> None:
        while True:
            with self.lock:
                self.idle += 1
            try:
                item = self.queue.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self.lock:
                    self.idle -= 1
                    if self.waiting <= self.idle:  # the others waiting take every queued item
                        self.threads.remove(threading.current_thread())
                        return
                continue
            with self.lock:
                self.idle -= 1
                self.waiting -= 1
            self.work(item)


class Loop:
    """The worker's one loop: the pipe and every parked socket in one epoll."""

    def __init__(self, http: gateway.Gateway, out: Outbox, capacity: int) -> None:
        self.http = http
        self.out = out
        self.epoll = select.epoll()
        self.parked: Dict[int, Attempt] = {}     # socket fd -> the attempt waiting on it
        self.opening: Dict[int, Tuple[Attempt, float]] = {}  # fd -> attempt connecting, until (monotonic)
        self.opening_check = float("inf")          # the earliest of those ends
        # Origins whose address a helper is finding (its attempt) and the attempts waiting
        # for it, to be opened by the loop: a burst to a new origin takes one helper, not one each.
        self.finding: Dict[str, Attempt] = {}
        self.awaiting: Dict[str, List[Attempt]] = {}
        self.helpers = Helpers(capacity, self.help)   # at most one per request in flight
        self.done: List[Tuple[str, Outcome]] = []  # outcomes of this turn, sent at its end
        self.arriving: Dict[Attempt, float] = {}   # part of the answer here, since (monotonic)
        self.window = BatchWindow()   # how long a busy turn lets answers gather
        self.pipe_ready = select.poll()   # the pipe alone, while answers gather

    def start(self, job: Assignment) -> None:
        """Begin an attempt: send it here when that cannot wait, else on a helper thread."""
        attempt = self.http.begin(job)
        if isinstance(attempt, Outcome):
            self.done.append((job.key, attempt))
        elif attempt.inline_send():
            self.sent(attempt, self.guarded(self.http.send_now, attempt))
        elif self.http.opens_now(attempt, time.monotonic()):
            self.open(attempt)
        elif job.origin in self.finding and self.http.may_open_later(attempt):
            self.awaiting.setdefault(job.origin, []).append(attempt)
        else:
            if self.http.may_open_later(attempt):
                self.finding[job.origin] = attempt
            self.helpers.submit((SEND, attempt))

    def addresses_found(self, now: float) -> None:
        """Attempts awaiting an origin's address: opened here once a helper's connection has
        found it; given to helpers (each connects itself) when that helper's attempt ended
        without finding it."""
        for origin, attempt in list(self.finding.items()):
            known = self.http.origins.knows(origin, now)
            if known or attempt.done:
                del self.finding[origin]
                for each in self.awaiting.pop(origin, []):
                    if known:
                        self.open(each)
                    else:
                        self.helpers.submit((SEND, each))

    def open(self, attempt: Attempt) -> None:
        """Connect without waiting: the socket is watched until writable (then `opened`), or
        until the connect timeout (`expire_opening`)."""
        outcome = self.guarded(self.http.open_now, attempt)
        if outcome is None:
            fd = attempt.sock.fileno()
            try:
                self.epoll.register(fd, select.EPOLLOUT | select.EPOLLONESHOT)
            except (OSError, ValueError) as exc:
                outcome = self.http.abandon(attempt, f"worker error: {type(exc).__name__}")
            else:
                ends = time.monotonic() + attempt.connect_timeout
                self.opening[fd] = (attempt, ends)
                self.opening_check = min(self.opening_check, ends)
        if outcome is not None:
            self.done.append((attempt.key, outcome))

    def opened(self, fd: int) -> None:
        """A socket being opened is writable: connected (send the request), or failed."""
        attempt, _ = self.opening.pop(fd)
        outcome = self.guarded(self.http.opened, attempt)
        if outcome is None:
            outcome = self.guarded(self.http.send_now, attempt)
            self.sent(attempt, outcome)   # parked (its fd stays registered) or over
        else:
            self.done.append((attempt.key, outcome))

    def expire_opening(self, now: float) -> None:
        """Sockets still connecting past their connect timeout: those attempts end."""
        self.opening_check = float("inf")
        for fd, (attempt, ends) in list(self.opening.items()):
            if ends <= now:
                del self.opening[fd]
                self.done.append((attempt.key, self.guarded(self.http.open_timed_out, attempt)))
            else:
                self.opening_check = min(self.opening_check, ends)

    def sent(self, attempt: Attempt, outcome: Optional[Outcome]) -> None:
        if outcome is None:
            outcome = self.park(attempt)
        if outcome is not None:
            self.done.append((attempt.key, outcome))

    def park(self, attempt: Attempt) -> Optional[Outcome]:
        """Wait for the answer to a sent attempt (from the loop or a helper thread); the
        attempt's outcome if its socket cannot be watched (it is over)."""
        fd = attempt.sock.fileno()
        try:
            self.parked[fd] = attempt
            try:
                self.epoll.modify(fd, PARKED)
            except FileNotFoundError:  # a socket not seen before (or closed since: a new one)
                self.epoll.register(fd, PARKED)
        except (OSError, ValueError) as exc:
            self.parked.pop(fd, None)
            log.error("id=%s: cannot watch the attempt's socket: %s", attempt.key, exc)
            return self.http.abandon(attempt, f"worker error: {type(exc).__name__}")
        return None

    def wake(self, fd: int) -> None:
        """A parked socket is readable: read the answer here if it is all there."""
        attempt = self.parked.pop(fd, None)
        if attempt is not None:
            self.look(attempt, time.monotonic())

    def look(self, attempt: Attempt, now: float) -> None:
        """Read the answer if it is all there; wait a moment for the rest of a part (looked
        at again each turn), then leave it to a helper thread."""
        try:
            state = gateway.answer_state(attempt)
        except Exception:  # a bug: let a thread read it as it can
            log.exception("id=%s: unexpected error in the worker", attempt.key)
            state = gateway.HELPER
        if state == gateway.WHOLE:
            self.arriving.pop(attempt, None)
            self.done.append((attempt.key, self.guarded(self.http.receive_now, attempt)))
        elif state == gateway.NOTHING:
            self.sent(attempt, None)   # parked again
        elif state == gateway.PART and now - self.arriving.setdefault(attempt, now) < ARRIVING_SECONDS:
            pass  # looked at again next turn
        else:
            self.arriving.pop(attempt, None)
            self.helpers.submit((RECEIVE, attempt))

    def help(self, item: Tuple[str, Attempt]) -> None:
        """On a helper thread: send (then park), or wait for and read the answer."""
        what, attempt = item
        if what == SEND:
            outcome = self.guarded(self.http.send, attempt)
            if outcome is None:
                outcome = self.park(attempt)
            if outcome is None:
                return
        else:
            outcome = self.guarded(self.http.receive, attempt)
        self.out.put([(attempt.key, outcome)])

    def guarded(self, step: Callable[[Attempt], Optional[Outcome]], attempt: Attempt) -> Optional[Outcome]:
        """A bug must cost one attempt (retried), not the loop or a thread."""
        try:
            return step(attempt)
        except Exception as exc:
            log.exception("id=%s: unexpected error in the worker", attempt.key)
            return self.http.abandon(attempt, f"worker error: {type(exc).__name__}")

    def run(self, conn: Connection, stopping: threading.Event, beat_every: float) -> None:
        """Until stopped and every attempt in flight has ended."""
        pipe = conn.fileno()
        self.epoll.register(pipe, select.EPOLLIN)
        self.pipe_ready.register(pipe, select.POLLIN)
        reading = True
        expiry_check_at = 0.0
        while reading or self.http.in_flight():
            if reading and stopping.is_set():
                reading = False
                self.epoll.unregister(pipe)
            now = time.monotonic()
            wait = min(beat_every, max(self.http.next_expiry - now, EXPIRY_CHECK_SECONDS),
                       max(self.opening_check - now, 0.0))
            events = self.epoll.poll(ARRIVING_LOOK_SECONDS if self.arriving else
                                     FINDING_LOOK_SECONDS if self.finding else wait)
            for fd, _ in events:
                if fd == pipe:
                    self.read(conn, stopping)
                elif fd in self.opening:
                    self.opened(fd)
                else:
                    self.wake(fd)
            now = time.monotonic()
            if self.finding:
                self.addresses_found(now)
            for attempt in list(self.arriving):
                self.look(attempt, now)
            if now >= self.opening_check:
                self.expire_opening(now)
            if now >= expiry_check_at:
                expiry_check_at = now + EXPIRY_CHECK_SECONDS
                # Attempts past their budget (a gateway trickling bytes): shut their sockets.
                self.http.expire_overdue(now)
            if self.done:
                done, self.done = self.done, []
                for _, outcome in done:
                    self.window.learn(outcome.elapsed)
                self.out.put(done)
                if reading and self.window.seconds():   # the next answers, for one write
                    self.gather(conn, stopping, now + self.window.seconds())
            elif now - self.out.sent_at >= beat_every:
                self.out.send((BEAT,))

    def gather(self, conn: Connection, stopping: threading.Event, until: float) -> None:
        """Let answers gather until `until` (monotonic), for one turn and one pipe write,
        while the supervisor's jobs start as they come; a cancel, a preemption or a stop
        ends the wait (the sockets it shut are seen in the next turn)."""
        while True:
            left = until - time.monotonic()
            if left <= 0 or not self.pipe_ready.poll(left * 1000):
                return
            if self.read(conn, stopping) != JOBS:
                return

    def read(self, conn: Connection, stopping: threading.Event) -> str:
        """Act on one message from the supervisor; its kind."""
        try:
            message = conn.recv()
        except (EOFError, OSError):
            os._exit(0)  # the supervisor is gone: nobody would read the outcomes
        if message[0] == JOBS:
            for wire in message[1]:
                job = Assignment._make(wire)
                try:
                    self.start(job)
                except Exception as exc:  # a bug must cost one attempt, not the worker
                    log.exception("id=%s: unexpected error in the worker", job.key)
                    self.done.append((job.key, outcomes.connection_failure(
                        f"worker error: {type(exc).__name__}", 0.0)))
        elif message[0] == CANCEL:  # abort these requests' attempts (their sockets)
            self.http.cancel(message[1])
        elif message[0] == PREEMPT:  # abort these attempts in flight; they are made again
            self.http.cancel(message[1], remember=False)
        elif message[0] == STOP:
            stopping.set()
        return message[0]


def main(spec: WorkerSpec, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    logs.configure(spec.log_format, spec.log_level, f"worker-{spec.index}")
    runtime.tune_gc()
    http = gateway.Gateway(spec.tls)
    out = Outbox(conn)
    out.send((READY, os.getpid()))
    Loop(http, out, spec.capacity).run(conn, stopping, min(spec.heartbeat, 0.5))
    http.close()
    log.info("worker %d finished its in-flight requests and exits", spec.index)
    conn.close()
