"""The worker pool mechanism: spawn, one Pipe per worker, reap by sentinel, restart with back-off.

The pool knows processes, not messages: the ledger says what a dead worker held.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import select
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, List, Optional

import psutil

from asyncproc import worker
from asyncproc.outcomes import Assignment

log = logging.getLogger("asyncproc.pool")

#: A worker that dies this many times in a row before it says READY cannot boot.
BOOT_FAILURES_MAX = 3
#: Restart delays grow from RESTART_DELAY_MIN while workers die young (crash loop).
RESTART_DELAY_MIN, RESTART_DELAY_MAX = 0.1, 30.0
#: A worker that lived this long before dying was not crash-looping.
STABLE_SECONDS = 10.0
#: After SIGABRT, a worker that is still there this long later gets SIGKILL.
ABORT_GRACE_SECONDS = 2.0


class BootFailure(Exception):
    """Workers die before they are ready: looping would only hide the problem."""


@dataclass
class Handle:
    index: int
    capacity: int      # requests this worker may have in flight
    process: multiprocessing.process.BaseProcess
    conn: Connection
    started: float
    last_seen: float
    ready: bool = False
    retiring: bool = False
    stop_sent: bool = False
    abort_sent: Optional[float] = None
    killed: bool = False
    served: int = 0
    pid: Optional[int] = None
    poller: Any = None   # select.poll on the pipe: asks "more to read?" in one syscall

    @property
    def sentinel(self) -> int:
        return self.process.sentinel

    def more(self) -> bool:
        if self.poller is None:
            self.poller = select.poll()
            self.poller.register(self.conn.fileno(), select.POLLIN)
        return bool(self.poller.poll(0))


@dataclass
class _Slot:
    """Per index: the live handle, or when to start the next one and how often it failed."""

    capacity: int
    handle: Optional[Handle] = None
    restart_at: float = 0.0
    fast_deaths: int = 0
    boot_failures: int = 0


def describe_exit(exitcode: Optional[int]) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (perhaps out of memory?)" if -exitcode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with status {exitcode}"


def worker_spec(settings, index: int, capacity: int) -> worker.WorkerSpec:
    """What worker `index` starts with (config.Settings): a heartbeat well inside
    --worker-timeout, the log format and level, the gateway's TLS files."""
    return worker.WorkerSpec(
        index=index, capacity=capacity, heartbeat=max(min(settings.operations.worker_timeout / 4, 5.0), 0.1),
        log_format=settings.operations.log_format, log_level=settings.operations.log_level,
        tls=settings.gateway.tls,
    )


class Pool:
    def __init__(
        self,
        capacity_per_worker: List[int],
        spec_for: Callable[[int, int], worker.WorkerSpec],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self._spec_for = spec_for
        self._clock = clock
        self.slots: Dict[int, _Slot] = {i: _Slot(n) for i, n in enumerate(capacity_per_worker)}

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        for index in self.slots:
            self._spawn(index)

    def _spawn(self, index: int) -> Handle:
        slot = self.slots[index]
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker.main, args=(self._spec_for(index, slot.capacity), child),
            name=f"asyncproc-worker-{index}", daemon=True,
        )
        process.start()
        child.close()
        now = self._clock()
        slot.handle = Handle(index, slot.capacity, process, parent, now, now, pid=process.pid)
        return slot.handle

    @property
    def handles(self) -> List[Handle]:
        return [s.handle for s in self.slots.values() if s.handle is not None]

    def wait_objects(self) -> list:
        out: list = []
        for handle in self.handles:
            out.append(handle.conn)
            out.append(handle.sentinel)
        return out

    def alive(self) -> int:
        return sum(1 for h in self.handles if h.ready)

    # -- messages ----------------------------------------------------------------------
    def send_jobs(self, handle: Handle, jobs: List[Assignment]) -> bool:
        return self._send(handle, (worker.JOBS, [tuple(job) for job in jobs]))  # outcomes.py: the wire

    def send_cancel(self, handle: Handle, keys: List[str]) -> bool:
        """Ask a worker to abort the attempts of `keys` it holds."""
        return self._send(handle, (worker.CANCEL, keys))

    def send_preempt(self, handle: Handle, keys: List[str]) -> bool:
        """Ask a worker to abort the attempts of `keys` in flight now (they will be made again)."""
        return self._send(handle, (worker.PREEMPT, keys))

    @staticmethod
    def _send(handle: Handle, message: tuple) -> bool:
        try:
            handle.conn.send(message)
            return True
        except (OSError, ValueError):
            return False  # its sentinel will report the death

    def receive(self, handle: Handle, limit: int = 1000) -> list:
        """Messages waiting on a worker's pipe, which the caller's wait found readable
        (never blocks). `Connection.poll()` is not used to ask for more: it builds a
        selector per call, which cost more than the rest of collecting an outcome."""
        out = []
        try:
            out.append(handle.conn.recv())
            while len(out) < limit and handle.more():
                out.append(handle.conn.recv())
        except (EOFError, OSError, ValueError):
            pass  # dead: reap() handles it
        if out:
            handle.last_seen = self._clock()
            handle.abort_sent = None
        for message in out:
            if message[0] == worker.DONE:
                handle.served += len(message[1])
            elif message[0] == worker.READY:
                handle.ready = True
                self.slots[handle.index].boot_failures = 0
        return out

    def retire(self, handle: Handle) -> None:
        """Ask a worker that holds no work to exit; reap() then starts a fresh one at once."""
        handle.retiring = handle.stop_sent = True
        try:
            handle.conn.send((worker.STOP,))
        except (OSError, ValueError):
            pass

    def rss(self, handle: Handle) -> Optional[int]:
        try:
            return psutil.Process(handle.pid).memory_info().rss
        except (psutil.Error, TypeError):
            return None

    # -- faults ------------------------------------------------------------------------
    def reap(self, boot_failures_max: int = BOOT_FAILURES_MAX) -> List[Handle]:
        """Dead workers, removed from the pool and scheduled for restart (with back-off)."""
        dead = []
        now = self._clock()
        for slot in self.slots.values():
            handle = slot.handle
            if handle is None or handle.process.is_alive():
                continue
            handle.process.join(0)
            slot.handle = None
            handle.conn.close()
            dead.append(handle)
            if handle.retiring and handle.process.exitcode == 0:
                log.info("worker %d (pid %s) retired after %d requests", handle.index, handle.pid,
                         handle.served)
                slot.restart_at = now
                continue
            if not handle.ready:
                slot.boot_failures += 1
                if slot.boot_failures >= boot_failures_max:
                    raise BootFailure(
                        f"worker {handle.index} died {slot.boot_failures} times before it was"
                        f" ready (last: {describe_exit(handle.process.exitcode)})"
                    )
            young = now - handle.started < STABLE_SECONDS
            slot.fast_deaths = slot.fast_deaths + 1 if young else 0
            delay = 0.0 if not slot.fast_deaths else min(
                RESTART_DELAY_MIN * 2 ** (slot.fast_deaths - 1), RESTART_DELAY_MAX
            )
            slot.restart_at = now + delay
            log.warning(
                "worker %d (pid %s) %s; restarting in %.1fs", handle.index, handle.pid,
                "killed: it held work past its attempt budget" if handle.killed
                else describe_exit(handle.process.exitcode), delay,
            )
        return dead

    def restart_due(self) -> List[Handle]:
        started = []
        now = self._clock()
        for index, slot in self.slots.items():
            if slot.handle is None and slot.restart_at <= now:
                started.append(self._spawn(index))
        return started

    def next_restart(self) -> Optional[float]:
        pending = [s.restart_at for s in self.slots.values() if s.handle is None]
        return min(pending) if pending else None

    def kill_silent(self, timeout: float) -> List[Handle]:
        """Workers silent past `timeout`: SIGABRT (a trace to look at), SIGKILL if that fails."""
        now = self._clock()
        signalled = []
        for handle in self.handles:
            if now - handle.last_seen <= timeout or not handle.process.is_alive():
                continue
            if handle.abort_sent is None:
                log.error("worker %d (pid %s) silent for %.0fs; aborting it", handle.index,
                          handle.pid, now - handle.last_seen)
                handle.abort_sent = now
                sig = signal.SIGABRT
            elif now - handle.abort_sent > ABORT_GRACE_SECONDS:
                sig = signal.SIGKILL
            else:
                continue
            try:
                os.kill(handle.pid, sig)
            except ProcessLookupError:
                pass
            signalled.append(handle)
        return signalled

    def kill(self, handle: Handle) -> bool:
        """SIGKILL a worker that must go now (it holds work past any budget); reap() sees it
        die and restarts it. False when it was killed already."""
        if handle.killed:
            return False
        handle.killed = True
        try:
            os.kill(handle.pid, signal.SIGKILL)
        except (ProcessLookupError, TypeError):
            pass
        return True

    def stop(self, timeout: float) -> None:
        """Ask every worker to finish, wait up to `timeout`, then kill what remains."""
        for handle in self.handles:
            try:
                handle.conn.send((worker.STOP,))
            except (OSError, ValueError):
                pass
        deadline = self._clock() + timeout
        for handle in self.handles:
            handle.process.join(max(deadline - self._clock(), 0))
        for handle in self.handles:
            if handle.process.is_alive():
                handle.process.kill()
                handle.process.join(5)
            handle.conn.close()
        for slot in self.slots.values():
            slot.handle = None
