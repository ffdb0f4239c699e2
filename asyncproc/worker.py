"""Worker process: N threads posting assignments through one Gateway (a kept-alive
connection per thread), over one Pipe.

Spawned with a small picklable spec. Never touches Redis. Ignores SIGINT (the supervisor
decides), finishes in-flight work on SIGTERM or a "stop" message, and exits at once when
its pipe reaches EOF (the supervisor is gone: nobody would read the outcomes). Jobs arrive
and outcomes leave in batches, so a busy worker makes one pipe write for many requests.
The main loop also ends attempts past their time budget (`Gateway.expire_overdue`).
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
from typing import Any, List, Optional

from asyncproc import gateway, logs, outcomes

log = logging.getLogger("asyncproc.worker")

# Messages on the pipe. Supervisor → worker: (JOBS, [Assignment, ...]) | (CANCEL, [key, ...])
# | (PREEMPT, [key, ...]) | (STOP,). Worker → supervisor: (READY, pid) | (DONE, [(key, Outcome), ...]) | (BEAT,).
# CANCEL aborts the keys' attempts now or when they begin; PREEMPT only those in flight now.
JOBS, STOP, READY, DONE, BEAT, CANCEL, PREEMPT = "jobs", "stop", "ready", "done", "beat", "cancel", "preempt"
#: How often the main loop looks for attempts past their budget, at most (it wakes at least
#: every half second anyway).
EXPIRY_CHECK_SECONDS = 0.1


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    threads: int
    heartbeat: float
    log_format: str
    log_level: str
    tls: Optional[Any] = None   # config.TlsFiles for https gateways


class Outbox:
    """Outcomes from many threads, sent in as few pipe writes as the load allows: the
    thread that finds nobody sending sends everything queued, including what others added
    meanwhile."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.pending: List[tuple] = []
        self.sending = False
        self.send_lock = threading.Lock()

    def put(self, item: tuple) -> None:
        with self.lock:
            self.pending.append(item)
            if self.sending:
                return
            self.sending = True
        while True:
            with self.lock:
                batch, self.pending = self.pending, []
                if not batch:
                    self.sending = False
                    return
            self.send((DONE, batch))

    def send(self, message: tuple) -> None:
        try:
            with self.send_lock:
                self.conn.send(message)
        except (OSError, ValueError):
            os._exit(0)  # the supervisor is gone


def main(spec: WorkerSpec, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    logs.configure(spec.log_format, spec.log_level, f"worker-{spec.index}")
    http = gateway.Gateway(spec.tls)
    jobs: "queue.SimpleQueue" = queue.SimpleQueue()
    out = Outbox(conn)

    def run_jobs() -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            try:
                outcome = http.post(job)
            except Exception as exc:  # a bug must cost one attempt, not a thread
                log.exception("id=%s: unexpected error in the worker", job.key)
                outcome = outcomes.connection_failure(f"worker error: {type(exc).__name__}", 0.0)
            out.put((job.key, outcome))

    threads = [threading.Thread(target=run_jobs, name=f"post-{i}", daemon=True)
               for i in range(spec.threads)]
    for thread in threads:
        thread.start()
    out.send((READY, os.getpid()))
    poll_ms = int(min(spec.heartbeat, 0.5) * 1000)
    # One poll object for the pipe: Connection.poll() builds a selector on every call.
    pipe_ready = select.poll()
    pipe_ready.register(conn.fileno(), select.POLLIN)
    expiry_check_at = 0.0
    while not stopping.is_set():
        try:
            if pipe_ready.poll(poll_ms):
                message = conn.recv()
                if message[0] == JOBS:
                    for job in message[1]:
                        jobs.put(job)
                elif message[0] == CANCEL:  # abort these requests' attempts (their sockets)
                    http.cancel(message[1])
                elif message[0] == PREEMPT:  # abort these attempts in flight; they are made again
                    http.cancel(message[1], remember=False)
                elif message[0] == STOP:
                    stopping.set()
            else:
                out.send((BEAT,))
            # Attempts past their budget (a gateway trickling bytes): shut their sockets.
            now = time.monotonic()
            if now >= expiry_check_at:
                expiry_check_at = now + EXPIRY_CHECK_SECONDS
                http.expire_overdue(now)
        except (EOFError, OSError):
            os._exit(0)
    for _ in threads:
        jobs.put(None)
    for thread in threads:
        thread.join(EXPIRY_CHECK_SECONDS)
        while thread.is_alive():  # finishing in-flight attempts, still within their budgets
            http.expire_overdue()
            thread.join(EXPIRY_CHECK_SECONDS)
    http.close()
    log.info("worker %d finished its in-flight requests and exits", spec.index)
    conn.close()
