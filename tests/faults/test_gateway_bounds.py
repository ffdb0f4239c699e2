"""A hostile gateway (`asyncproc sim`'s x_sim.hostile modes) against real asyncproc processes:
every attempt ends within its budget, every request gets one result, no worker is lost."""
import os
import signal
import time

import psutil

from tests.harness import request, wait_until

# the budget's end: the worker's watchdog shut the socket, or (the last attempt, cut to the
# deadline) the socket timeout set to what was left of the budget fired first
TIMED_OUT = {"deadline exceeded (last failure: attempt timed out)", "deadline exceeded (last failure: read timeout)"}


def hostile(id_value, mode, deadline_in=4.0, **extra):
    return request(id_value, {"prompt": "x", "x_sim": {"hostile": mode, "key": id_value, "interval": 0.2, **extra}},
                   deadline_in=deadline_in)


def test_every_hostile_mode_ends_in_a_result_within_its_budget(redis_server, sim, results, start_processor):
    proc = start_processor(sim.url, "--concurrency", "12", "--workers", "2", "--request-timeout", "1",
                           "--retry-base-delay", "0.1", "--retry-max-delay", "0.2",
                           "--max-response-bytes", "1000000")
    client = redis_server.client()
    published = time.time()
    modes = ["drip", "trickle", "endless", "huge", "huge-chunked", "reset", "short", "long"]
    for mode in modes:
        client.publish("batch-queue", hostile(mode, mode))
    good = [f"g{i}" for i in range(10)]
    for id_value in good:
        client.publish("batch-queue", request(id_value))
    got = {r["id"]: r for r in results.wait_for(len(modes) + len(good), timeout=30)}
    assert sorted(got) == sorted(modes + good)
    assert len(results.items) == len(modes) + len(good)  # one result each
    assert all("payload" in got[g] for g in good)
    # the deadlines were 3-4 s out: time-outs end there, not at the gateway's pleasure
    assert time.time() - published < 8
    for mode in ("drip", "trickle", "endless"):
        assert got[mode]["error"] in TIMED_OUT, got[mode]
        assert got[mode]["attempts"] >= 2
    for mode in ("huge", "huge-chunked"):
        assert got[mode]["error"] == "response too large (over 1000000 bytes)", got[mode]
        assert got[mode]["attempts"] == 1 and got[mode]["status_code"] == 200
    for mode in ("reset", "short"):
        assert got[mode]["error"].startswith("deadline exceeded (last failure: connection error"), got[mode]
    assert got["long"]["payload"]["object"] == "text_completion"  # the declared body, nothing more
    attempts = sim.stats()["attempts"]
    assert attempts["huge"] == attempts["huge-chunked"] == 1
    # the workers' own watchdog ended every attempt: none was replaced, none holds the bodies
    assert proc.metric("asyncproc_worker_restarts_total") == 0
    assert "past their attempt budget" not in proc.log.read_text()
    for pid in proc.children():
        assert psutil.Process(pid).memory_info().rss < 200 * 1024 * 1024


def test_a_worker_holding_a_request_past_its_budget_is_replaced(redis_server, sim, results, start_processor):
    proc = start_processor(sim.url, "--concurrency", "1", "--workers", "1", "--request-timeout", "1",
                           "--worker-timeout", "60")
    client = redis_server.client()
    client.publish("batch-queue", request("stuck", {"prompt": "x", "x_sim": {"latency": 0.5}}, deadline_in=60))
    wait_until(lambda: proc.metric("asyncproc_in_flight") == 1, what="the request in flight")
    [victim] = proc.children()
    stopped = time.monotonic()
    os.kill(victim, signal.SIGSTOP)  # hung in the middle of an attempt: its watchdog cannot act
    [result] = results.wait_for(1, timeout=20)
    # replaced after the budget (1 s) and the grace, long before --worker-timeout (60 s)
    assert time.monotonic() - stopped < 10
    assert result["id"] == "stuck" and "payload" in result and result["attempts"] == 2
    assert victim not in proc.children()
    log = proc.log.read_text()
    assert 'holds requests past their attempt budget; replacing it: "stuck"' in log
    assert "killed: it held work past its attempt budget" in log
    wait_until(lambda: proc.metric("asyncproc_worker_restarts_total") == 1, what="the restart counted")
