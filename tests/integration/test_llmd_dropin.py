"""asyncproc as a drop-in for llm-d-async behind llm-d-batch-gateway: its producer's and
consumer's exact Redis commands (tests/llmd_replay.py), real Redis, the stand-in gateway
echoing the headers it saw, and the real processor."""
import os
import subprocess
import sys
import time

import orjson
import pytest
import redis

from tests import llmd_replay
from tests.harness import BIN, ROOT, wait_subscribed, wait_until
from tests.llmd_replay import Producer, message

LLMD = ("--message-queue-impl", "redis-sortedset", "--result-format", "llm-d-async",
        "--redis.request-queue-name", "request-sortedset", "--redis.result-queue-name", "result-list")


def echo(key, **sim):
    return {"model": "m", "prompt": "p", "x_sim": {"key": key, "headers": True, **sim}}


def leftover_markers(client):
    return sorted(k.decode() for k in client.keys("request-active:*") + client.keys("request-cancel:*"))


def test_headers_fairness_result_queues_and_markers(redis_server, sim, start_processor):
    """50 requests as batch-gateway submits them: each one's Authorization reaches the
    gateway, after the queue's own headers; hop-by-hop, Host and Content-Length do not;
    the fairness header comes from metadata userid; every result is a ResultMessage on
    the result queue the producer named, LPUSHed (BRPOP reads them oldest first); no
    request-active marker is left."""
    client = redis_server.client()
    proc = start_processor(sim.url, *LLMD, "--inference-objective", "queue-obj", "--concurrency", "4",
                           "--log-level", "DEBUG")
    producer = Producer(client)
    ids = [f"r{i}" for i in range(50)]
    for i, rid in enumerate(ids):
        headers = {"Authorization": f"Bearer user-{i}", "x-trace": str(i), "Host": "evil.example",
                   "Connection": "close", "Content-Length": "1", "Transfer-Encoding": "chunked"}
        if i % 2:
            headers["x-gateway-inference-objective"] = "own-obj"  # may override the queue's
            headers["X-LLM-D-Inference-Fairness-ID"] = "spoofed"
        producer.submit(message(rid, echo(rid), headers=headers, metadata={"userid": f"tenant-{i % 3}"}),
                        kind="redis" if i % 5 == 0 else "plain", newest=i % 4 == 0)
    results = producer.get_results(50)
    assert sorted(r["id"] for r in results) == sorted(ids)
    for result in results:
        i = int(result["id"][1:])
        assert result["status_code"] == 200 and result["error_code"] == ""
        assert result["request_token"] == producer.tokens[result["id"]]
        seen = orjson.loads(result["payload"])["x_sim"]["headers"]
        assert seen["authorization"] == f"Bearer user-{i}" and seen["x-trace"] == str(i)
        assert seen["x-llm-d-inference-fairness-id"] == f"tenant-{i % 3}"
        assert seen["x-gateway-inference-objective"] == ("own-obj" if i % 2 else "queue-obj")
        assert seen["host"] != "evil.example" and "transfer-encoding" not in seen
        assert seen.get("connection") != "close" and seen["content-length"] != "1"
    assert client.llen("result-list") == 0 and client.llen("batch-queue-result") == 0
    wait_until(lambda: leftover_markers(client) == [], 10, what="request-active markers released")
    assert proc.metric("asyncproc_request_headers_refused_total", queue="request-sortedset",
                       reason="hop-by-hop") == 100
    assert proc.metric("asyncproc_request_headers_refused_total", queue="request-sortedset", reason="host") == 50
    assert "Bearer user-" not in proc.log.read_text()  # a request's credentials are never logged


def test_result_queue_choice_and_switches(redis_server, sim, start_processor, tmp_path):
    """The queue's configured result queue wins over the one the message names, which wins
    over the default; a queue can turn request headers off; the fairness header can be off."""
    client = redis_server.client()
    queues = tmp_path / "queues.json"
    queues.write_bytes(orjson.dumps({"queues": [
        {"name": "request-sortedset"},
        {"name": "pinned", "result_queue": "pinned-results", "request_headers": False}]}))
    start_processor(sim.url, *LLMD, "--queues-file", str(queues), "--fairness-header", "")
    named = Producer(client, result_queue="named-results")
    named.submit(message("a", echo("a"), headers={"Authorization": "Bearer a"}, metadata={"userid": "u"}))
    named.submit(message("b", echo("b"), result_queue_name="own-results"), kind="redis")
    pinned = Producer(client, request_queue="pinned", result_queue="named-results")
    pinned.submit(message("c", echo("c"), headers={"Authorization": "Bearer c"}))
    (a,) = named.get_results(1, queue="named-results")
    (b,) = named.get_results(1, queue="own-results")
    (c,) = named.get_results(1, queue="pinned-results")
    assert (a["id"], b["id"], c["id"]) == ("a", "b", "c")
    seen_a = orjson.loads(a["payload"])["x_sim"]["headers"]
    assert seen_a["authorization"] == "Bearer a" and "x-llm-d-inference-fairness-id" not in seen_a
    assert "authorization" not in orjson.loads(c["payload"])["x_sim"]["headers"]
    # A message may not name asyncproc's own keys as its result queue: an INVALID_REQUEST result.
    named.submit(message("d", echo("d")), result_queue="asyncproc:cancelled")
    (d,) = named.get_results(1, queue="result-list")
    assert d["id"] == "d" and d["error_code"] == "INVALID_REQUEST" and d["request_token"] == named.tokens["d"]
    assert client.type("asyncproc:cancelled") in (b"none", b"zset")


def test_cancelled_before_arrival_are_never_dispatched(redis_server, sim, start_processor):
    """CancelRequests on 40 of 50 waiting requests: those 40 are answered CANCELLED without
    dispatch, the others answered by the gateway; no marker is left behind."""
    client = redis_server.client()
    producer = Producer(client)
    ids = [f"c{i}" for i in range(50)]
    for rid in ids:
        producer.submit(message(rid, echo(rid)))
    producer.cancel(ids[:40] + ["never-submitted"])
    start_processor(sim.url, *LLMD)
    results = {r["id"]: r for r in producer.get_results(50)}
    assert sorted(results) == sorted(ids)
    for rid in ids[:40]:
        assert results[rid]["error_code"] == "CANCELLED" and results[rid]["status_code"] == 0
        assert orjson.loads(results[rid]["payload"]) == {"error": "cancelled"}
    assert all(results[rid]["status_code"] == 200 for rid in ids[40:])
    assert sim.stats()["requests"] == 10
    wait_until(lambda: leftover_markers(client) == [], 10, what="markers released")
    assert client.brpop(["result-list"], timeout=1) is None  # exactly one result each


def test_a_cancel_that_comes_while_it_waits_is_checked_just_before_dispatch(redis_server, sim, start_processor):
    """With the periodic read far apart, the check just before dispatch (as llm-d-async's
    worker does) is what stops a request cancelled while it waited for a thread."""
    client = redis_server.client()
    start_processor(sim.url, *LLMD, "--concurrency", "1", "--cancel-poll-interval", "10")
    producer = Producer(client)
    producer.submit(message("busy", echo("busy", latency=2)))
    wait_until(lambda: sim.stats()["requests"] == 1, 20, what="the only thread busy")
    producer.submit(message("later", echo("later")))
    wait_until(lambda: client.zcard("request-sortedset") == 0, 20, what="'later' taken in, waiting")
    producer.cancel(["later"])
    results = {r["id"]: r for r in producer.get_results(2, timeout=20)}
    assert results["busy"]["status_code"] == 200 and results["later"]["error_code"] == "CANCELLED"
    assert sim.stats()["requests"] == 1


def test_a_cancel_for_an_older_generation_does_not_cancel_a_resubmission(redis_server, sim, start_processor):
    client = redis_server.client()
    producer = Producer(client)
    producer.submit(message("g", echo("g")))
    old = producer.tokens["g"]
    client.set("request-cancel:g", old)  # a marker left from an earlier generation...
    producer.submit(message("g", echo("g")))  # ...which a resubmission clears (DEL) anyway
    client.set("request-cancel:g", old)  # and a stale one written after it holds the wrong token
    for member in client.zrange("request-sortedset", 0, -1):  # the first generation's member
        if old.encode() in member:
            client.zrem("request-sortedset", member)
    start_processor(sim.url, *LLMD)
    (result,) = producer.get_results(1)
    assert result["status_code"] == 200 and result["request_token"] == producer.tokens["g"] != old
    assert client.get("request-cancel:g") == old.encode()  # not this generation's: left alone


@pytest.mark.parametrize("how", ["llm-d-async", "asyncproc cancel"])
def test_in_flight_requests_are_aborted_within_a_second(redis_server, sim, start_processor, how):
    """Requests already at the gateway (60 s answers) are cancelled: their connections are
    closed by the worker, each is answered CANCELLED within about a second of the cancel,
    none is retried; the others finish, and the pool takes new work at once."""
    client = redis_server.client()
    proc = start_processor(sim.url, *LLMD, "--concurrency", "8", "--workers", "2")
    producer = Producer(client)
    slow = [f"s{i}" for i in range(5)]
    quick = [f"q{i}" for i in range(3)]
    for rid in slow:
        producer.submit(message(rid, echo(rid, latency=60)))
    for rid in quick:
        producer.submit(message(rid, echo(rid, latency=1.5)))
    wait_until(lambda: sim.stats()["requests"] == 8, 20, what="all 8 at the gateway")
    cancelled_at = time.monotonic()
    if how == "llm-d-async":
        producer.cancel(slow)
    else:
        from asyncproc import client as client_api
        from asyncproc import config
        settings = config.load_settings(["--redis-url", redis_server.url, *LLMD])
        client_api.Client(settings).cancel(ids=slow)
    results = {}
    for _ in slow:
        result = producer.get_result(10)
        results[result["id"]] = (result, time.monotonic() - cancelled_at)
    assert sorted(results) == sorted(slow)
    for rid, (result, took) in results.items():
        assert result["error_code"] == "CANCELLED", result
        assert took < 3.0, f"{rid} answered {took:.2f}s after the cancel"  # poll 0.5 s + write
    quick_results = producer.get_results(3, timeout=20)
    assert sorted(r["id"] for r in quick_results) == quick and all(r["status_code"] == 200 for r in quick_results)
    # the pool is healthy: new work goes through at once, on the same workers
    producer.submit(message("after", echo("after")))
    assert producer.get_result(10)["status_code"] == 200
    attempts = sim.stats()["attempts"]
    assert all(attempts[rid] == 1 for rid in slow)  # never retried
    assert proc.metric("asyncproc_cancelled_in_flight_total", queue="request-sortedset") == 5
    assert proc.metric("asyncproc_worker_restarts_total") == 0
    assert client.brpop(["result-list"], timeout=1) is None
    wait_until(lambda: leftover_markers(client) == [], 10, what="markers released")


@pytest.mark.parametrize("impl", ["redis-streams", "redis-pubsub"])
def test_other_redis_transports_route_results_and_send_headers(redis_server, sim, start_processor, impl):
    """The envelope's result queue (a stream, or a channel) and per-request headers on the
    other Redis transports too."""
    client = redis_server.client()
    start_processor(sim.url, "--message-queue-impl", impl, "--result-format", "llm-d-async")
    envelope = orjson.dumps({"internal": {"result_queue_name": "alt", "request_token": "tok1"},
                             "request_kind": "plain",
                             "data": message("x", echo("x"), headers={"Authorization": "Bearer x", "Host": "h"},
                                             metadata={"userid": "t"})})
    client.set("request-active:x", "tok1")
    if impl == "redis-pubsub":
        sub = redis.Redis(port=redis_server.port).pubsub(ignore_subscribe_messages=True)
        sub.subscribe("alt")
        wait_subscribed(client, "alt")
        client.publish("batch-queue", envelope)
        raw = []
        wait_until(lambda: raw.append(sub.get_message(timeout=0.1)) or any(m for m in raw if m), 20,
                   what="a result on channel alt")
        result = llmd_replay.parse_result(next(m for m in raw if m)["data"])
        sub.close()
    else:
        client.xadd("batch-queue", {"message": envelope})
        wait_until(lambda: client.xlen("alt") == 1, 20, what="a result on stream alt")
        result = llmd_replay.parse_result(client.xrange("alt")[0][1][b"message"])
    seen = orjson.loads(result["payload"])["x_sim"]["headers"]
    assert result["id"] == "x" and result["request_token"] == "tok1"
    assert seen["authorization"] == "Bearer x" and seen["x-llm-d-inference-fairness-id"] == "t"
    assert seen["host"] != "h"
    wait_until(lambda: client.exists("request-active:x") == 0, 10, what="the active marker released")


def test_trace_context_reaches_the_gateway(redis_server, sim, start_processor):
    """--tracing: the request's traceparent (in its metadata, as llm-d-async's producers put
    it) is continued: the gateway sees the same trace, with asyncproc's attempt as parent."""
    trace, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    start_processor(sim.url, *LLMD, "--tracing", "true", env={"OTEL_TRACES_EXPORTER": "none"})
    producer = Producer(redis_server.client())
    producer.submit(message("t", echo("t"), metadata={"traceparent": f"00-{trace}-{parent}-01"}))
    result = producer.get_result(20)
    _, seen_trace, seen_parent, _ = orjson.loads(result["payload"])["x_sim"]["headers"]["traceparent"].split("-")
    assert seen_trace == trace and seen_parent != parent


def test_tracing_without_its_exporter_is_a_config_error(redis_server):
    done = subprocess.run([sys.executable, str(BIN), "--redis-url", redis_server.url, "--tracing", "true"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "OTEL_TRACES_EXPORTER": "nope"})
    assert done.returncode == 2 and "--tracing" in done.stderr and "nope" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
