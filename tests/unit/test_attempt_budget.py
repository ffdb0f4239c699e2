"""When worker upkeep judges that a worker holds an attempt past its budget (pure)."""
from asyncproc.upkeep import overdue_at


def attempt_overdue(dispatched_at, deadline, request_timeout, now, grace):
    return now > overdue_at(dispatched_at, deadline, request_timeout, grace)


def test_the_request_timeout_bounds_an_attempt_when_the_deadline_is_further():
    assert not attempt_overdue(100.0, 1000.0, 10.0, now=112.9, grace=3.0)
    assert attempt_overdue(100.0, 1000.0, 10.0, now=113.1, grace=3.0)


def test_the_deadline_bounds_an_attempt_when_it_is_nearer():
    assert not attempt_overdue(100.0, 102.0, 10.0, now=104.9, grace=3.0)
    assert attempt_overdue(100.0, 102.0, 10.0, now=105.1, grace=3.0)
