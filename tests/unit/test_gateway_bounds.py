"""Bounded gateways: a hostile HTTP server thread (tests/hostile.py) against the worker's
Gateway, with a watchdog thread calling `expire_overdue` as the worker's main loop does."""
import threading
import time

import pytest

from asyncproc.gateway import BASE_HEADERS, TIMED_OUT, Gateway
from asyncproc.outcomes import Assignment, Kind
from tests.harness import wait_until
from tests.hostile import OK_BODY, HostileServer


@pytest.fixture(scope="module")
def hostile():
    server = HostileServer(interval=0.2, huge_bytes=8 * 1024 * 1024)
    yield server
    server.stop()


@pytest.fixture
def gateway():
    """A Gateway whose overdue attempts are expired every 50 ms (the worker loop's job)."""
    http = Gateway()
    stop = threading.Event()

    def watch():
        while not stop.wait(0.05):
            http.expire_overdue()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    yield http
    stop.set()
    watcher.join()
    http.close()


def job(origin, path, request_timeout=1.0, deadline_in=60.0, max_bytes=1024 * 1024):
    return Assignment("k", origin, path, b'{"prompt": "hi"}', dict(BASE_HEADERS), time.time() + deadline_in,
                      5.0, request_timeout, max_bytes)


def timed(gateway, assignment):
    started = time.monotonic()
    outcome = gateway.post(assignment)
    return outcome, time.monotonic() - started


@pytest.mark.parametrize("path", ["/drip", "/trickle", "/endless"])
def test_a_trickling_gateway_cannot_hold_an_attempt_past_the_request_timeout(hostile, gateway, path):
    outcome, took = timed(gateway, job(hostile.url, path, request_timeout=1.0))
    assert (outcome.kind, outcome.error) == (Kind.RETRY, TIMED_OUT)
    assert 0.9 < took < 1.6


def test_the_deadline_cuts_the_budget_when_it_is_nearer(hostile, gateway):
    outcome, took = timed(gateway, job(hostile.url, "/drip", request_timeout=30.0, deadline_in=1.0))
    assert (outcome.kind, outcome.error) == (Kind.RETRY, TIMED_OUT)
    assert took < 1.6


def test_a_declared_length_over_the_limit_fails_fast_without_reading(hostile, gateway):
    outcome, took = timed(gateway, job(hostile.url, "/huge", max_bytes=1024 * 1024))
    assert outcome.kind is Kind.FATAL and outcome.status == 200
    assert outcome.error == f"response too large (over {1024 * 1024} bytes)"
    assert outcome.body is None and took < 0.5


def test_a_streamed_body_over_the_limit_is_cut_off(hostile, gateway):
    outcome, _ = timed(gateway, job(hostile.url, "/huge-chunked", max_bytes=1024 * 1024))
    assert outcome.kind is Kind.FATAL and outcome.error.startswith("response too large")


def test_the_limit_counts_inflated_bytes_not_compressed_ones(hostile, gateway):
    outcome, _ = timed(gateway, job(hostile.url, "/gzip", max_bytes=1024 * 1024))
    assert outcome.kind is Kind.FATAL and outcome.error.startswith("response too large")
    outcome, _ = timed(gateway, job(hostile.url, "/gzip", max_bytes=hostile.huge_bytes))
    assert outcome.kind is Kind.OK and len(outcome.body) == hostile.huge_bytes


def test_a_body_at_the_limit_is_read_whole(hostile, gateway):
    outcome, _ = timed(gateway, job(hostile.url, "/ok", max_bytes=len(OK_BODY)))
    assert outcome.kind is Kind.OK and outcome.body == OK_BODY
    outcome, _ = timed(gateway, job(hostile.url, "/ok", max_bytes=len(OK_BODY) - 1))
    assert outcome.kind is Kind.FATAL


def test_the_connection_of_a_response_too_large_is_discarded_and_the_next_post_connects_afresh(hostile):
    http = Gateway()  # a connection left mid-response and reused would fail the next post
    try:
        assert timed(http, job(hostile.url, "/ok"))[0].kind is Kind.OK
        before = hostile.connections
        assert timed(http, job(hostile.url, "/ok"))[0].kind is Kind.OK
        assert hostile.connections == before  # kept alive and reused
        assert timed(http, job(hostile.url, "/huge-chunked", max_bytes=100_000))[0].kind is Kind.FATAL
        assert timed(http, job(hostile.url, "/ok"))[0].kind is Kind.OK
        assert hostile.connections == before + 1  # the one that sent too much was not reused
    finally:
        http.close()


@pytest.mark.parametrize("path", ["/reset", "/short", "/short-large"])
def test_a_body_cut_short_is_a_retryable_connection_error(hostile, gateway, path):
    outcome, took = timed(gateway, job(hostile.url, path))
    assert outcome.kind is Kind.RETRY and outcome.error.startswith("connection error")
    assert took < 0.5


def test_bytes_beyond_the_declared_length_are_not_read_as_the_next_answer(hostile):
    http = Gateway()
    try:
        first, _ = timed(http, job(hostile.url, "/long"))
        assert first.kind is Kind.OK and first.body == OK_BODY
        second, _ = timed(http, job(hostile.url, "/ok"))
        assert second.kind is Kind.OK and second.body == OK_BODY
    finally:
        http.close()


def test_after_a_timed_out_attempt_the_gateway_still_serves(hostile, gateway):
    for _ in range(3):  # on the same connection: one left broken would fail the next post
        assert timed(gateway, job(hostile.url, "/drip", request_timeout=0.3))[0].error == TIMED_OUT
    assert timed(gateway, job(hostile.url, "/ok"))[0].kind is Kind.OK
    wait_until(lambda: gateway._attempts == {}, 5, what="no attempt left registered")


def test_expire_overdue_touches_only_attempts_past_their_budget(hostile):
    http = Gateway()
    results = []
    thread = threading.Thread(target=lambda: results.append(http.post(job(hostile.url, "/drip", 30.0))))
    thread.start()
    try:
        wait_until(lambda: any(a.sock is not None for a in list(http._attempts.values())), 5,
                   what="the attempt's socket recorded")
        assert http.expire_overdue() == []  # 30 s left
        [attempt] = list(http._attempts.values())
        assert http.expire_overdue(now=attempt.ends_at + 0.01) == [attempt]
        thread.join(5)
        assert [r.error for r in results] == [TIMED_OUT]
    finally:
        thread.join(5)
        http.close()


def test_max_response_bytes_option():
    from asyncproc import config

    assert config.load_settings([], {}, cpu_count=1).messages.max_response_bytes == 64 * 1024 * 1024
    assert config.load_settings(["--max-response-bytes", "5000"], {}, cpu_count=1).messages.max_response_bytes == 5000
    for bad in ("0", "lots"):
        with pytest.raises(config.ConfigError) as err:
            config.load_settings(["--max-response-bytes", bad], {}, cpu_count=1)
        assert "--max-response-bytes" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("path", ["/drip", "/trickle"])
def test_a_cancelled_attempt_ends_at_once_as_cancelled(hostile, gateway, path):
    """The worker's main loop cancels by key: the attempt's socket is shut, the blocked
    read fails and the outcome is CANCELLED (not a retryable failure); the pool goes on."""
    assignment = job(hostile.url, path, request_timeout=30.0)
    outcome_box = []
    worker = threading.Thread(target=lambda: outcome_box.append(timed(gateway, assignment)), daemon=True)
    worker.start()
    wait_until(lambda: any(a.key == "k" and a.sock is not None for a in list(gateway._attempts.values())), 5,
               what="the attempt connected")
    assert gateway.cancel(["k"]) == 1
    worker.join(5)
    (outcome, took), = outcome_box
    assert outcome.kind is Kind.CANCELLED and took < 2.0
    assert gateway.post(job(hostile.url, "/ok")).kind is Kind.OK


def test_a_cancel_before_the_attempt_begins_is_kept_for_it(hostile, gateway):
    assert gateway.cancel(["k"]) == 0
    assert gateway.post(job(hostile.url, "/ok")).kind is Kind.CANCELLED
    assert gateway.post(job(hostile.url, "/ok")).kind is Kind.OK  # used once
    gateway.cancel(["other"])
    gateway.expire_overdue(time.monotonic() + 3600)  # forgotten after a while
    assert gateway._cancelled == {}


def test_a_preemption_aborts_only_the_attempt_in_flight(hostile, gateway):
    """A preemption (cancel with remember=False) is about the attempt in flight now: one
    not begun is left alone, so the request's next attempt is made."""
    assert gateway.cancel(["k"], remember=False) == 0
    assert gateway.post(job(hostile.url, "/ok")).kind is Kind.OK
    assert gateway._cancelled == {}
    assignment = job(hostile.url, "/drip", request_timeout=30.0)
    outcome_box = []
    worker = threading.Thread(target=lambda: outcome_box.append(timed(gateway, assignment)), daemon=True)
    worker.start()
    wait_until(lambda: any(a.key == "k" and a.sock is not None for a in list(gateway._attempts.values())), 5,
               what="the attempt connected")
    assert gateway.cancel(["k"], remember=False) == 1
    worker.join(5)
    (outcome, took), = outcome_box
    assert outcome.kind is Kind.CANCELLED and took < 2.0
    assert gateway.post(job(hostile.url, "/ok")).kind is Kind.OK
