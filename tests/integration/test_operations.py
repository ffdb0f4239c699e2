"""Process shape, endpoints, signals and configuration of the real process tree."""
import signal
import subprocess
import sys

import psutil

from tests.harness import BIN, Processor, request, wait_until


def test_process_shape_and_endpoints(redis_server, sim, results, start_processor):
    proc = start_processor(sim.url, "--concurrency", "6", "--workers", "3")
    workers = wait_until(lambda: len(proc.children()) == 3 and proc.children(), what="3 workers")
    assert all(psutil.Process(pid).ppid() == proc.proc.pid for pid in workers)
    assert proc.get("/healthz").status_code == 200
    assert proc.get("/readyz").status_code == 200
    redis_server.client().publish("batch-queue", request("one"))
    results.wait_for(1)
    wait_until(lambda: proc.metric("asyncproc_results_total", outcome="success") == 1, what="counter")
    wait_until(lambda: proc.metric("asyncproc_workers_alive") == 3, what="workers_alive gauge")
    assert "asyncproc_gateway_latency_seconds_bucket" in proc.get("/metrics").text


def test_sigterm_drains_and_exits_0(redis_server, sim, results, start_processor):
    proc = start_processor(sim.url, "--concurrency", "2", "--shutdown-grace-period", "10")
    redis_server.client().publish("batch-queue", request("inflight", {"prompt": "x", "x_sim": {"latency": 1}}))
    wait_until(lambda: proc.metric("asyncproc_in_flight") == 1, what="one in flight")
    proc.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: proc.get("/readyz").status_code == 503 if proc.proc.poll() is None else True,
               what="not ready while draining")
    assert proc.proc.wait(20) == 0
    assert [r["id"] for r in results.wait_for(1)] == ["inflight"]  # it was allowed to finish



def test_bad_configuration_exits_2(tmp_path):
    out = subprocess.run([sys.executable, str(BIN), "--retry-policy", "sometimes"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "asyncproc: error: argument --retry-policy: invalid choice: 'sometimes' (choose from 'exponential', 'fixed')"]
    bad_file = tmp_path / "bad.conf"
    bad_file.write_text("concurency = 3\n")
    out = subprocess.run([sys.executable, str(BIN), "-c", str(bad_file)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "concurency" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_configuration_from_environment_and_file(tmp_path, redis_server, sim, results):
    conf = tmp_path / "asyncproc.conf"
    conf.write_text("redis.request-queue-name = [from-file]\nconcurrency = 3\n")
    env = {"ASYNCPROC_CONFIG": str(conf), "ASYNCPROC_INFERENCE_OBJECTIVE": "env-objective",
           "REDIS_URL": redis_server.url}
    proc = Processor(redis_server.url, sim.url, log=tmp_path / "p2.log", env=env).wait_ready()
    try:
        redis_server.client().publish("from-file", request("cfg"))
        result = results.wait_for(1)[0]
        assert result["payload"]["x_sim"]["objective"] == "env-objective"
        assert len(proc.children()) == 2   # the harness pins --workers 2: at most the file's concurrency 3
    finally:
        proc.kill()


def test_metrics_by_outcome_and_histograms(redis_server, sim, results, start_processor):
    proc = start_processor(sim.url, "--concurrency", "2", "--retry-base-delay", "0.05", "--retry-max-delay", "0.05")
    client = redis_server.client()
    client.publish("batch-queue", request("ok"))
    client.publish("batch-queue", request("shed", {"prompt": "x", "x_sim": {"key": "shed", "script": [429, 200]}}))
    client.publish("batch-queue", request("bad", {"prompt": "x", "x_sim": {"key": "bad", "script": [422]}}))
    client.publish("batch-queue", request("late", deadline_in=-1))
    client.publish("batch-queue", b'{"id": "inv", "deadline": "soon", "payload": {}}')
    results.wait_for(5)

    def outcome(name):
        return proc.metric("asyncproc_results_total", queue="batch-queue", outcome=name)

    wait_until(lambda: outcome("success") == 2, what="two successes")
    assert (outcome("gateway_error"), outcome("deadline_exceeded"), outcome("invalid")) == (1, 1, 1)
    assert proc.metric("asyncproc_shed_total", queue="batch-queue") == 1
    assert proc.metric("asyncproc_retries_total", queue="batch-queue", reason="shed") == 1
    assert proc.metric("asyncproc_queue_residence_seconds_count", queue="batch-queue") == 3
    assert proc.metric("asyncproc_end_to_end_seconds_count", queue="batch-queue") == 3
    assert proc.metric("asyncproc_gateway_latency_seconds_count", queue="batch-queue") == 4


def test_json_logs_from_supervisor_and_workers(redis_server, sim, results, start_processor):
    proc = start_processor(sim.url, "--log-format", "json", "--workers", "2", "--concurrency", "2")
    redis_server.client().publish("batch-queue", request("j1", {"prompt": "x", "x_sim": {"key": "j1", "script": [404]}}))
    results.wait_for(1)
    assert proc.terminate() == 0
    lines = [__import__("orjson").loads(line) for line in proc.log.read_text().splitlines()]
    assert {line["process"] for line in lines} >= {"supervisor", "worker-0", "worker-1"}
    failed = [line for line in lines if "failed after" in line["msg"]]
    assert failed and failed[0]["id"] == "j1" and failed[0]["level"] == "warning"
