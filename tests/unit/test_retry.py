import email.utils
import random

import pytest

from asyncproc import outcomes, retry
from asyncproc.outcomes import Kind, Outcome
from asyncproc.retry import Backoff, Finish, RetryAt

NOW = 1_700_000_000.0


@pytest.mark.parametrize("status, kind", [
    (200, Kind.OK), (201, Kind.OK), (204, Kind.OK),
    (429, Kind.SHED),
    (408, Kind.RETRY), (425, Kind.RETRY), (500, Kind.RETRY), (502, Kind.RETRY),
    (503, Kind.RETRY), (504, Kind.RETRY),
    (400, Kind.FATAL), (401, Kind.FATAL), (404, Kind.FATAL), (422, Kind.FATAL),
    (501, Kind.FATAL), (505, Kind.FATAL),
])
def test_classify(status, kind):
    assert outcomes.classify(status) is kind


def test_fatal_outcome_names_status_and_body_excerpt():
    outcome = outcomes.from_response(400, b"bad model " + b"x" * 1000, None, 0.1)
    assert outcome.error.startswith("gateway returned HTTP 400: bad model")
    assert len(outcome.error) < 260


@pytest.mark.parametrize("value, expected", [
    ("3", 3.0), ("0", 0.0), (" 2.5 ", 2.5), ("-4", 0.0),
    (email.utils.formatdate(NOW + 30, usegmt=True), 30.0),
    (email.utils.formatdate(NOW - 30, usegmt=True), 0.0),
    ("soon", None), ("", None), (None, None),
])
def test_parse_retry_after(value, expected):
    assert retry.parse_retry_after(value, NOW) == expected


def test_exponential_full_jitter_stays_under_ceiling():
    backoff = Backoff("exponential", base=1.0, cap=10.0)
    rng = random.Random(1)
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (40, 10), (500, 10)]:
        delays = [backoff.delay(attempt, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # it really spreads over the range


def test_fixed_policy():
    assert Backoff("fixed", base=2.0, cap=60).delay(7, random.Random()) == 2.0


def decide(outcome, attempts=1, deadline=NOW + 100, backoff=Backoff("fixed", 1.0, 1.0), **kw):
    return retry.decide(outcome, attempts, deadline, NOW, backoff, random.Random(0), **kw)


@pytest.mark.parametrize("outcome, expected", [
    (Outcome(Kind.OK, 200), Finish(True)),
    (outcomes.from_response(400, b"no", None, 0), Finish(False, "gateway returned HTTP 400: no", "gateway_error")),
    (outcomes.from_response(503, b"", None, 0), RetryAt(NOW + 1)),
    (outcomes.from_response(429, b"", "5", 0), RetryAt(NOW + 5)),
    (outcomes.from_response(503, b"", "0", 0), RetryAt(NOW + 1)),
    (outcomes.connection_failure("connection error: refused", 0), RetryAt(NOW + 1)),
    (outcomes.connection_failure("read timeout", 0), RetryAt(NOW + 1)),
])
def test_decide(outcome, expected):
    assert decide(outcome) == expected


def test_no_retry_past_the_deadline():
    outcome = outcomes.from_response(429, b"", "50", 0)
    assert decide(outcome, deadline=NOW + 20) == Finish(False, "deadline exceeded (last failure: HTTP 429)",
                                                        "deadline_exceeded")
    refused = outcomes.connection_failure("connection error: refused", 0)
    assert decide(refused, deadline=NOW + 0.5) == Finish(
        False, "deadline exceeded (last failure: connection error: refused)", "deadline_exceeded")


def test_expired_before_dispatch_reports_the_previous_failure():
    assert decide(outcomes.expired(), last_error="HTTP 503") == Finish(
        False, "deadline exceeded (last failure: HTTP 503)", "deadline_exceeded")
    assert decide(outcomes.expired()) == Finish(False, "deadline exceeded", "deadline_exceeded")


def test_max_attempts():
    outcome = outcomes.from_response(503, b"", None, 0)
    assert isinstance(decide(outcome, attempts=2, max_attempts=3), RetryAt)
    assert decide(outcome, attempts=3, max_attempts=3) == Finish(
        False, "max attempts (3) reached (last failure: HTTP 503)", "max_attempts")
