"""Gate readings from real sources: the sim's /metrics, a real redis-server, a Prometheus-API
stand-in (a stdlib HTTP server answering /api/v1/query as Prometheus does)."""
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest

from asyncproc import gates
from asyncproc.gate_sources import Sources
from asyncproc.gates import Failed, PromQuery, RedisKey, Scrape
from tests.harness import free_port


class FakePrometheus:
    """Answers GET /api/v1/query?query=<name> with the canned body for <name>; counts hits."""

    def __init__(self, answers):
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                outer.hits += 1
                query = parse_qs(urlsplit(self.path).query).get("query", [""])[0]
                status, body, delay = answers.get(query, (404, b"not found", 0))
                time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def vector(*values):
    return orjson.dumps({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"pool": str(i)}, "value": [1700000000.0, str(v)]} for i, v in enumerate(values)]}})


@pytest.fixture
def prometheus():
    server = FakePrometheus({
        "budget": (200, vector(0.25), 0),
        "scalar(budget)": (200, orjson.dumps({"status": "success", "data": {"resultType": "scalar",
                                                                             "result": [1.0, "0.5"]}}), 0),
        "none": (200, vector(), 0),
        "two": (200, vector(0.1, 0.2), 0),
        "garbage": (200, b"<html>", 0),
        "error": (500, b'{"status": "error"}', 0),
        "slow": (200, vector(1), 5),
    })
    yield server
    server.close()


def read(source):
    sources = Sources({source: 1.0}, time.time)
    try:
        return sources.read(source)
    finally:
        sources.close()


def test_prometheus_query(prometheus):
    assert read(PromQuery(prometheus.url, "budget", 1.0)) == 0.25
    assert read(PromQuery(prometheus.url, "scalar(budget)", 1.0)) == 0.5
    assert read(PromQuery(prometheus.url, "none", 1.0)) == Failed("query gave 0 samples, expected exactly one")
    assert read(PromQuery(prometheus.url, "two", 1.0)) == Failed("query gave 2 samples, expected exactly one")
    assert read(PromQuery(prometheus.url, "garbage", 1.0)).reason.startswith("unexpected Prometheus answer")
    assert read(PromQuery(prometheus.url, "error", 1.0)).reason.endswith("HTTP 500")


def test_a_slow_source_fails_within_its_timeout(prometheus):
    started = time.monotonic()
    reading = read(PromQuery(prometheus.url, "slow", 0.2))
    assert isinstance(reading, Failed) and "timed out" in reading.reason
    assert time.monotonic() - started < 2.0   # the server would have taken 5 s


def test_readings_are_cached_for_their_interval(prometheus):
    source = PromQuery(prometheus.url, "budget", 1.0)
    now = [1000.0]
    sources = Sources({source: 5.0}, lambda: now[0])
    try:
        assert sources.refresh(now[0]) == [source] and prometheus.hits == 1
        assert sources.next_due() == 1005.0
        assert sources.refresh(1004.9) == [] and prometheus.hits == 1
        now[0] = 1005.0
        assert sources.refresh(now[0]) == [source] and prometheus.hits == 2
        assert sources.readings[source] == 0.25
    finally:
        sources.close()


def test_scrape_the_sim_and_decide(sim):
    source = Scrape(sim.url + "/metrics", 1.0)
    reading = read(source)
    names = {s.name for s in reading}
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"} <= names
    gate = gates.parse({"type": "endpoint-scrape", "url": sim.url + "/metrics", "metric": "vllm:num_requests_waiting",
                        "labels": {"model_name": "sim"}, "capacity": 4, "timeout": 1.0}, gates.Defaults("redis://x"))
    assert gates.decide(gate, {source: reading}) == gates.Decision(1.0, "open")


def test_unreachable_and_non_prometheus_pages_fail(prometheus):
    assert isinstance(read(Scrape(f"http://127.0.0.1:{free_port()}/metrics", 0.5)), Failed)
    assert read(Scrape(prometheus.url + "/api/v1/query?query=garbage", 0.5)).reason.startswith("not Prometheus text")


def test_redis_key(redis_server):
    client = redis_server.client()
    source = RedisKey(redis_server.url, "budget", 0.5)
    assert read(source) == Failed("key budget is not set")
    client.set("budget", "0.75")
    assert read(source) == 0.75
    client.set("budget", "lots")
    assert read(source).reason.startswith("key budget holds")
    assert isinstance(read(RedisKey(f"redis://127.0.0.1:{free_port()}/0", "budget", 0.2)), Failed)
