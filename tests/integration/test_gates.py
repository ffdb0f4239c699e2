"""Capacity-aware dispatch on real parts: gates that read Redis and the sim's /metrics, and
adaptive concurrency against a sim that sheds above its capacity."""
import threading
import time

import orjson
import requests

from tests.harness import Sim, request, wait_until
from tests.integration.test_pipeline import publish


def batch(n, prefix="b"):
    return [request(f"{prefix}{i}") for i in range(n)]


def assert_each_once(results, count):
    got = results.wait_for(count, timeout=90)
    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids)) == count          # no duplicates, none lost
    assert all("payload" in r for r in got), [r for r in got if "payload" not in r][:3]
    return got


def test_redis_gate_holds_dispatch_at_zero_and_resumes(redis_server, sim, results, start_processor):
    client = redis_server.client()
    client.set("bulk-budget", "0")
    gate = {"type": "redis", "key": "bulk-budget", "interval": 0.2}
    proc = start_processor(sim.url, "--concurrency", "4", "--workers", "1", "--gate", orjson.dumps(gate).decode())
    wait_until(lambda: proc.metric("asyncproc_gate_decisions_total", reason="closed") >= 1, what="a closed gate")
    publish(client, batch(40))  # more than --concurrency + --intake-buffer: the rest is staged in Redis
    wait_until(lambda: proc.metric("asyncproc_requests_received_total") == 40, what="40 received")
    wait_until(lambda: proc.metric("asyncproc_held_back", reason="gate") > 0, what="held back by the gate")
    assert sim.stats()["requests"] == 0 and results.items == []
    assert proc.metric("asyncproc_gate_budget") == 0
    client.set("bulk-budget", "0.5")   # half of --concurrency 4: two in flight at most
    assert_each_once(results, 40)
    assert sim.stats()["peak_running"] <= 2
    assert proc.metric("asyncproc_gate_budget") == 0.5


def test_scrape_gate_stops_dispatch_while_the_sim_is_saturated_and_resumes(redis_server, results, start_processor):
    """Online traffic takes 6 of the sim's 8 slots for 4 s; with 25% reserved the gate closes
    (1 - 6/8 - 0.25 = 0): no batch request reaches the sim from one scrape interval after the
    saturation until the online requests end, though 2 slots stay free; then batch resumes."""
    interval = 0.3
    gateway = Sim("--capacity", "8", "--latency", "0.05")
    try:
        gate = {"type": "endpoint-scrape", "url": gateway.url + "/metrics", "metric": "vllm:num_requests_running",
                "capacity": 8, "reserved": 0.25, "interval": interval}
        proc = start_processor(gateway.url, "--concurrency", "4", "--workers", "1", "--inference-objective", "batch",
                               "--gate", orjson.dumps(gate).decode())
        publish(redis_server.client(), batch(200))
        wait_until(lambda: len(results.items) >= 10, what="batch flowing")
        online = []

        def online_request():
            r = requests.post(gateway.url + "/v1/completions", timeout=30,
                              json={"prompt": "online", "x_sim": {"latency": 4.0}})
            online.append(r.json()["x_sim"])

        threads = [threading.Thread(target=online_request) for _ in range(6)]
        for t in threads:
            t.start()
        wait_until(lambda: gateway.stats()["running_by"].get("") == 6, what="online requests served")
        saturated_at = time.time()
        wait_until(lambda: proc.metric("asyncproc_gate_budget") == 0, timeout=interval + 5, what="the gate to close")
        assert gateway.stats()["running_by"].get("") == 6   # still saturated...
        assert len(results.items) < 200                    # ...and batch work still waiting
        for t in threads:
            t.join(30)
        got = assert_each_once(results, 200)
        online_end = min(o["at"] for o in online)
        arrivals = sorted(r["payload"]["x_sim"]["arrived"] for r in got)
        stopped = [a for a in arrivals if saturated_at + interval + 1.5 < a < online_end - 0.05]
        assert stopped == []                                 # nothing dispatched while saturated
        assert online_end - saturated_at > 1.5               # (the window was not empty by chance)
        assert any(a > online_end for a in arrivals)         # and dispatch resumed after
        assert proc.metric("asyncproc_gate_decisions_total", reason="closed") >= 1
    finally:
        gateway.stop()


def concurrent_at_most(intervals, start, end):
    """The most of `intervals` ((begin, end) pairs) open at once inside [start, end]."""
    edges = sorted([(max(b, start), 1) for b, e in intervals if b < end and e > start]
                   + [(min(e, end), -1) for b, e in intervals if b < end and e > start], key=lambda x: (x[0], x[1]))
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_vllm_gate_keeps_headroom_for_online_load_and_stops_while_online_requests_wait(
        redis_server, results, start_processor):
    """A real sim of 8 slots. While 4 online requests run, batch keeps 8 - 4 - sqrt(4) = 2 in
    flight and keeps flowing (its own requests in vLLM's running count are not online load);
    when 6 more online requests arrive and some wait, no batch request reaches the sim from
    one reading after the queueing until it ends; afterwards every request is answered once."""
    interval = 0.2
    # Batch requests of 0.25 s: asyncproc counts its own from dispatch to outcome, vLLM only
    # while served, and the gap (pipes, ticks; tens of ms on a loaded machine) must stay a
    # small part of a request, or the online load it reads as `running - own` comes out low.
    gateway = Sim("--capacity", "8", "--latency", "0.25")
    try:
        gate = {"type": "vllm", "url": gateway.url + "/metrics", "capacity": 8, "interval": interval, "beta": 1,
                "window": 0.5}
        proc = start_processor(gateway.url, "--concurrency", "8", "--workers", "1", "--inference-objective", "batch",
                               "--gate", orjson.dumps(gate).decode())
        publish(redis_server.client(), batch(400))
        wait_until(lambda: len(results.items) >= 20, what="batch flowing")
        online = []

        def online_requests(n, latency):
            def one():
                r = requests.post(gateway.url + "/v1/completions", timeout=30,
                                  json={"prompt": "online", "x_sim": {"latency": latency}})
                online.append(r.json()["x_sim"])
            threads = [threading.Thread(target=one) for _ in range(n)]
            for t in threads:
                t.start()
            return threads

        first = online_requests(4, 9.0)
        wait_until(lambda: gateway.stats()["running_by"].get("") == 4, what="4 online requests served")
        four_at = time.time()
        settled = four_at + 1.5    # a few readings: the online-load estimate has settled at 4

        def arrived_after(t):
            return sum(1 for r in list(results.items) if r.get("payload", {}).get("x_sim", {}).get("arrived", 0) > t)

        wait_until(lambda: arrived_after(settled) >= 30, timeout=30, what="batch flowing beside online")
        second = online_requests(6, 9.0)
        wait_until(lambda: gateway.stats()["waiting"] > 0, what="online requests waiting")
        queued_at = time.time()
        wait_until(lambda: proc.metric("asyncproc_gate_budget") == 0, timeout=interval + 5, what="the gate to close")
        for t in first + second:
            t.join(30)
        got = assert_each_once(results, 400)
        first_end = min(o["at"] for o in online if o["arrived"] <= four_at)   # 2 of the 6 wait until then
        spans = [(r["payload"]["x_sim"]["arrived"], r["payload"]["x_sim"]["at"]) for r in got]
        beside = [s for s in spans if settled < s[0] < queued_at - 0.1]
        assert len(beside) >= 20 and concurrent_at_most(spans, settled, queued_at - 0.1) <= 2
        stopped = [s for s in spans if queued_at + interval + 1.5 < s[0] < first_end - 0.05]
        assert stopped == []                                  # nothing dispatched while online requests waited
        assert first_end - queued_at > 1.5                    # (the window was not empty by chance)
        assert any(s[0] > first_end for s in spans)           # and dispatch resumed after
        assert proc.metric("asyncproc_gate_decisions_total", reason="closed") >= 1
    finally:
        gateway.stop()


def test_vllm_gate_preempts_a_batch_request_for_a_waiting_online_one_and_answers_it_once(
        redis_server, results, start_processor):
    """A real sim of 2 slots, both held by batch requests of 4 s. An online request arrives and
    waits; the gate (preempt) aborts the newest batch attempt, the sim frees its slot at once
    (as vLLM does when the client disconnects) and the online request is served without
    waiting for batch; the aborted request is attempted again and answered exactly once,
    with its payload, the aborted attempt not counted."""
    gateway = Sim("--capacity", "2", "--latency", "0.1")
    try:
        gate = {"type": "vllm", "url": gateway.url + "/metrics", "capacity": 2, "interval": 0.1, "beta": 0,
                "window": 0.1, "preempt": True}
        proc = start_processor(gateway.url, "--concurrency", "2", "--workers", "1", "--inference-objective", "batch",
                               "--max-attempts", "1", "--gate", orjson.dumps(gate).decode())
        ids = ["p0", "p1"]
        publish(redis_server.client(), [request(i, {"model": "m", "prompt": i, "x_sim": {"key": i, "latency": 4.0}})
                                        for i in ids])
        wait_until(lambda: gateway.stats()["running_by"].get("batch") == 2, what="both slots held by batch")
        started = time.monotonic()
        r = requests.post(gateway.url + "/v1/completions", timeout=30,
                          json={"prompt": "online", "x_sim": {"latency": 0.5}})
        online_took = time.monotonic() - started
        assert r.status_code == 200
        assert online_took < 2.5, f"the online request waited {online_took:.1f} s: batch was not preempted"
        got = assert_each_once(results, 2)
        stats = gateway.stats()
        assert stats["aborted"] == {"batch": 1}
        (preempted,) = [i for i in ids if stats["attempts"][i] == 2]
        assert [i for i in ids if stats["attempts"][i] == 1] == [i for i in ids if i != preempted]
        by_id = {r["id"]: r for r in got}
        assert by_id[preempted]["payload"]["x_sim"]["attempt"] == 2 and by_id[preempted]["attempts"] == 1
        assert all(r["payload"]["x_sim"]["key"] == r["id"] for r in got)
        assert proc.metric("asyncproc_preempted_total") == 1
    finally:
        gateway.stop()
