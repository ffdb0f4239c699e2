"""The worker's HTTP layer against `responses` (the one place mocks of HTTP belong)."""
import time

import pytest
import requests
import responses

from asyncproc import gateway
from asyncproc.outcomes import Assignment, Kind

URL = "http://gw.test/v1/completions"


def job(deadline_in=60.0, headers=(("x-gateway-inference-objective", "food"),)):
    return Assignment("k", URL, b'{"prompt": "hi"}', headers, time.time() + deadline_in, 5.0, 300.0)


@responses.activate
def test_post_sends_payload_and_objective_header():
    responses.post(URL, json={"choices": []}, status=200)
    outcome = gateway.post(gateway.make_session(2), job())
    assert outcome.kind is Kind.OK and outcome.status == 200 and outcome.body == b'{"choices": []}'
    sent = responses.calls[0].request
    assert sent.body == b'{"prompt": "hi"}'
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["x-gateway-inference-objective"] == "food"


@responses.activate
def test_timeouts_are_bounded_by_the_deadline():
    responses.post(URL, json={}, status=200)
    gateway.post(gateway.make_session(1), job(deadline_in=2.0))
    connect, read = responses.calls[0].request.req_kwargs["timeout"]
    assert 1.0 < connect <= 2.0 and 1.0 < read <= 2.0


@responses.activate
def test_retry_after_is_passed_on():
    responses.post(URL, status=429, headers={"Retry-After": "7"})
    outcome = gateway.post(gateway.make_session(1), job())
    assert outcome.kind is Kind.SHED and outcome.retry_after == "7"


@pytest.mark.parametrize("exc, reason", [
    (requests.exceptions.ConnectionError("refused"), "connection error"),
    (requests.exceptions.ConnectTimeout("slow"), "connect timeout"),
    (requests.exceptions.ReadTimeout("slow"), "read timeout"),
])
@responses.activate
def test_connection_failures_are_retryable(exc, reason):
    responses.post(URL, body=exc)
    outcome = gateway.post(gateway.make_session(1), job())
    assert outcome.kind is Kind.RETRY and outcome.error.startswith(reason)


@responses.activate
def test_no_attempt_after_the_deadline():
    outcome = gateway.post(gateway.make_session(1), job(deadline_in=-1))
    assert outcome.kind is Kind.EXPIRED and len(responses.calls) == 0
