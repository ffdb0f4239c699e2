"""Worker upkeep, the pool side's policy: which workers to retire (past --worker-max-requests
or --worker-max-rss, once they hold no work), which to replace (holding an attempt past its
budget plus a grace: hung, though still heartbeating) and which to abort (silent).

The decisions are functions of the ledger's assigned entries, the pool's handles and `now`,
passed in; the pool (pool.py) does the signalling, and reap() gives back what a replaced
worker held.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Iterable, List, Optional, Tuple

from asyncproc.config import Settings
from asyncproc.ledger import Entry, Ledger
from asyncproc.timers import Timer

log = logging.getLogger("asyncproc.supervisor")

STUCK_GRACE_SECONDS = 3.0    # a worker holding an attempt this long past its budget is replaced
STUCK_CHECK_SECONDS = 1.0    # how often held attempts are compared with their budgets
RSS_CHECK_SECONDS = 5.0      # how often workers' memory is read (when --worker-max-rss is set)
MIB = 1024 * 1024


def overdue_at(dispatched_at: float, deadline: float, request_timeout: float,
               grace: float = STUCK_GRACE_SECONDS) -> float:
    """When an attempt dispatched at `dispatched_at`, if still not answered, has outrun its
    budget, min(--request-timeout, time to the deadline), by more than `grace`: the
    worker's own watchdog (gateway.expire_overdue) did not end it."""
    return min(dispatched_at + request_timeout, deadline) + grace


def scan_overdue(assigned: Iterable[Entry], request_timeout: float, now: float,
                 grace: float = STUCK_GRACE_SECONDS) -> Tuple[Dict[int, List[Entry]], float]:
    """(the overdue entries by worker, when the next of the others becomes overdue)."""
    overdue: Dict[int, List[Entry]] = {}
    soonest = math.inf
    for entry in assigned:
        at = overdue_at(entry.dispatched_at, entry.request.deadline, request_timeout, grace)
        if now > at:
            overdue.setdefault(entry.worker, []).append(entry)
        elif at < soonest:
            soonest = at
    return overdue, soonest


def retire_reason(served: int, max_requests: int, rss: Optional[int] = None,
                  max_rss_mib: float = 0.0) -> Optional[str]:
    """Why a worker should be retired (as logged), or None. `rss` is None when not read."""
    if max_requests and served >= max_requests:
        return f"served {served} requests"
    if max_rss_mib and rss is not None and rss > max_rss_mib * MIB:
        return f"uses {rss / MIB:.0f} MiB (limit {max_rss_mib:.0f})"
    return None


class WorkerKeeper:
    """Applies the upkeep decisions to the pool, from the supervisor's housekeeping."""

    def __init__(self, settings: Settings, pool, ledger: Ledger) -> None:
        self.operations = settings.operations
        self.request_timeout = settings.retry.request_timeout
        self.pool = pool
        self.ledger = ledger
        self.rss_check = Timer(RSS_CHECK_SECONDS)
        self.stuck_check = Timer(STUCK_CHECK_SECONDS)

    def housekeep(self, now: float) -> None:
        self.pool.kill_silent(self.operations.worker_timeout)
        self.replace_stuck(now)
        self.recycle(now)

    def recycle(self, now: float) -> None:
        """Retire workers past --worker-max-requests / --worker-max-rss once they hold no work."""
        max_requests, max_rss = self.operations.worker_max_requests, self.operations.worker_max_rss
        check_rss = max_rss and self.rss_check.every(now)
        for handle in self.pool.handles:
            if not handle.retiring and handle.ready:
                reason = retire_reason(handle.served, max_requests)
                if reason is None and check_rss:
                    reason = retire_reason(handle.served, 0, self.pool.rss(handle), max_rss)
                if reason is not None:
                    handle.retiring = True
                    log.info("worker %d %s; retiring it", handle.index, reason)
            if handle.retiring and not handle.stop_sent and self.ledger.assigned_count(handle.index) == 0:
                self.pool.retire(handle)

    def replace_stuck(self, now: float) -> None:
        """Kill a worker that holds a request past its attempt budget plus a grace; reap()
        then gives back what it held, to be dispatched again (the overdue ones counted as a
        failed attempt), and a request whose deadline has passed by then is answered
        "deadline exceeded"."""
        fresh = self.ledger.assigned_since()
        if fresh is not None:  # what was dispatched since can be overdue no sooner than this
            self.stuck_check.set(min(self.stuck_check.at, overdue_at(*fresh, self.request_timeout)))
        if not self.stuck_check.due(now):
            return
        overdue, soonest = scan_overdue(self.ledger.assigned(), self.request_timeout, now)
        # Nothing held becomes overdue before `soonest` (and what is dispatched later lowers
        # the timer above): no walk over thousands of attempts every second or every grace.
        self.stuck_check.set(max(soonest, now + STUCK_CHECK_SECONDS))
        handles = {h.index: h for h in self.pool.handles}
        for index, entries in overdue.items():
            handle = handles.get(index)
            if handle is None or not self.pool.kill(handle):
                continue
            for entry in entries:
                entry.request = entry.request.after_attempt("attempt timed out (worker replaced)")
            log.error("worker %d (pid %s) holds requests past their attempt budget; replacing it: %s",
                      index, handle.pid, " ".join(e.request.key for e in entries[:20]))
