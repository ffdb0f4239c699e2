"""Worker upkeep's decisions, table-driven, on a fake clock and a fake pool: when a worker
is retired, when one holding an attempt past its budget is replaced."""
import pytest

from asyncproc import config
from asyncproc.ledger import Ledger
from asyncproc.messages import Request
from asyncproc.upkeep import (
    MIB,
    RSS_CHECK_SECONDS,
    STUCK_CHECK_SECONDS,
    STUCK_GRACE_SECONDS,
    WorkerKeeper,
    retire_reason,
    scan_overdue,
)
from tests.inprocess.fakes import START, Clock, FakePool


@pytest.mark.parametrize("served, max_requests, rss, max_rss, reason", [
    (4, 5, None, 0, None),
    (5, 5, None, 0, "served 5 requests"),
    (500, 0, None, 0, None),                            # 0: no limit
    (0, 0, 300 * MIB, 200, "uses 300 MiB (limit 200)"),
    (0, 0, 100 * MIB, 200, None),
    (0, 0, None, 200, None),                            # memory not read (not due, or unreadable)
    (0, 0, 300 * MIB, 0, None),
    (9, 5, 300 * MIB, 200, "served 9 requests"),        # the count is named first
])
def test_retire_reason(served, max_requests, rss, max_rss, reason):
    assert retire_reason(served, max_requests, rss, max_rss) == reason


def held(ledger, key, worker, dispatched_at, deadline):
    ledger.admit(Request(key, deadline, {}, "q", dispatched_at), None)
    ledger.assign(ledger.take("q").key, worker, dispatched_at)


@pytest.mark.parametrize("dispatched_at, deadline, now, overdue", [
    (0.0, 1000.0, 12.9, False),   # budget: the 10 s request timeout, plus 3 s grace
    (0.0, 1000.0, 13.1, True),
    (0.0, 2.0, 4.9, False),       # budget: the nearer deadline, plus 3 s grace
    (0.0, 2.0, 5.1, True),
])
def test_scan_overdue(dispatched_at, deadline, now, overdue):
    ledger = Ledger()
    held(ledger, "a", 1, START + dispatched_at, START + deadline)
    found = scan_overdue(ledger.assigned(), 10.0, START + now)[0]
    assert (found.keys() == {1} and [e.request.key for e in found[1]] == [ledger.assigned()[0].request.key]) \
        if overdue else found == {}


@pytest.mark.parametrize("held_for, next_scan_in", [
    ([], float("inf")),                             # nothing held: nothing to look at until a dispatch
    ([(0.0, 600.0)], 10.0 + STUCK_GRACE_SECONDS),   # the request timeout, plus the grace
    ([(-12.0, 600.0)], STUCK_CHECK_SECONDS),        # overdue 1 s from now: never sooner than the check interval
    ([(-11.0, 600.0), (0.0, 1.0)], 2.0),            # the soonest of the held ones
])
def test_the_stuck_scan_waits_until_something_can_be_overdue(held_for, next_scan_in):
    """10,000 slow requests in flight are not walked every second: the next scan is when
    the first held attempt could be overdue."""
    clock, pool, ledger, keep = keeper("--request-timeout", "10")
    for n, (dispatched, deadline) in enumerate(held_for):
        held(ledger, f"k{n}", pool.handles[0].index, clock() + dispatched, clock() + deadline)
    keep.housekeep(clock())
    assert keep.stuck_check.at == pytest.approx(clock() + next_scan_in)
    assert not any(h.killed for h in pool.handles)


def test_what_is_dispatched_after_a_scan_brings_the_next_one_forward():
    clock, pool, ledger, keep = keeper("--request-timeout", "10")
    held(ledger, "slow", 0, clock(), clock() + 600)
    keep.housekeep(clock())
    assert keep.stuck_check.at == pytest.approx(clock() + 13.0)
    clock.advance(1.0)
    held(ledger, "near", 1, clock(), clock() + 2.0)   # its deadline in 2 s: overdue 5 s from now
    keep.housekeep(clock())
    assert keep.stuck_check.at == pytest.approx(clock() + 5.0)
    clock.advance(5.5)
    keep.housekeep(clock())
    assert pool.handles[1].killed and not pool.handles[0].killed


def keeper(*args):
    clock = Clock()
    settings = config.load_settings(["--workers", "2", "--concurrency", "4", "--metrics-port", "0", *args],
                                    environ={})
    pool = FakePool(clock, settings.capacity_per_worker())
    pool.start()
    ledger = Ledger()
    return clock, pool, ledger, WorkerKeeper(settings, pool, ledger)


def test_a_worker_past_max_requests_is_retired_once_it_holds_no_work():
    clock, pool, ledger, keep = keeper("--worker-max-requests", "3")
    busy, idle = pool.handles
    busy.served = idle.served = 3
    held(ledger, "a", busy.index, clock(), clock() + 600)
    keep.housekeep(clock())
    assert busy.retiring and not busy.stop_sent  # told to retire, but it still holds work
    assert idle.retiring and idle.stop_sent
    ledger.settle(ledger.assigned()[0].request.key)
    keep.housekeep(clock())
    assert busy.stop_sent


def test_memory_is_read_every_few_seconds_and_a_worker_over_the_limit_retired():
    clock, pool, ledger, keep = keeper("--worker-max-rss", "100")
    reads = []

    def rss(handle):
        reads.append(clock())
        return 150 * MIB if handle.index == 1 else 50 * MIB

    pool.rss = rss
    keep.housekeep(clock())
    assert [h.index for h in pool.handles if h.retiring] == [1] and len(reads) == 2
    clock.advance(RSS_CHECK_SECONDS / 2)
    keep.housekeep(clock())
    assert len(reads) == 2  # not due yet
    clock.advance(RSS_CHECK_SECONDS)
    keep.housekeep(clock())
    assert len(reads) == 3  # the retiring worker is not read again


@pytest.mark.parametrize("held_for, replaced", [(12.0, False), (14.0, True)])
def test_a_worker_holding_an_attempt_past_its_budget_is_killed_and_the_attempt_counted(held_for, replaced):
    clock, pool, ledger, keep = keeper("--request-timeout", "10")
    held(ledger, "a", 0, clock(), clock() + 600)
    clock.advance(held_for)
    keep.housekeep(clock())
    (entry,) = ledger.assigned()
    assert pool.handles[0].killed is replaced and not pool.handles[1].killed
    assert entry.request.attempts == (1 if replaced else 0)
    keep.housekeep(clock())
    assert entry.request.attempts == (1 if replaced else 0)  # killed once, counted once
