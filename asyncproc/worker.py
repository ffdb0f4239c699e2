"""Worker process: N threads posting assignments with one pooled session, over one Pipe.

Spawned with a small picklable spec. Never touches Redis. Ignores SIGINT (the supervisor
decides), finishes in-flight work on SIGTERM or a "stop" message, and exits at once when
its pipe reaches EOF (the supervisor is gone: nobody would read the outcomes).
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection

from asyncproc import gateway, logs, outcomes

log = logging.getLogger("asyncproc.worker")

# Messages on the pipe. Supervisor → worker: (JOB, Assignment) | (STOP,).
# Worker → supervisor: (READY, pid) | (DONE, key, Outcome) | (BEAT,).
JOB, STOP, READY, DONE, BEAT = "job", "stop", "ready", "done", "beat"


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    threads: int
    heartbeat: float
    log_format: str
    log_level: str


def main(spec: WorkerSpec, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    logs.configure(spec.log_format, spec.log_level, f"worker-{spec.index}")
    session = gateway.make_session(spec.threads)
    jobs: "queue.SimpleQueue" = queue.SimpleQueue()
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        with send_lock:
            conn.send(message)

    def run_jobs() -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            try:
                outcome = gateway.post(session, job)
            except Exception as exc:  # a bug must cost one attempt, not a thread
                log.exception("id=%s: unexpected error in the worker", job.key)
                outcome = outcomes.connection_failure(f"worker error: {type(exc).__name__}", 0.0)
            try:
                send((DONE, job.key, outcome))
            except (OSError, ValueError):
                os._exit(0)  # the supervisor is gone

    threads = [threading.Thread(target=run_jobs, name=f"post-{i}", daemon=True)
               for i in range(spec.threads)]
    for thread in threads:
        thread.start()
    send((READY, os.getpid()))
    poll_interval = min(spec.heartbeat, 0.5)
    while not stopping.is_set():
        try:
            if conn.poll(poll_interval):
                message = conn.recv()
                if message[0] == JOB:
                    jobs.put(message[1])
                elif message[0] == STOP:
                    stopping.set()
            else:
                send((BEAT,))
        except (EOFError, OSError):
            os._exit(0)
    for _ in threads:
        jobs.put(None)
    for thread in threads:
        thread.join()
    log.info("worker %d finished its in-flight requests and exits", spec.index)
    conn.close()
