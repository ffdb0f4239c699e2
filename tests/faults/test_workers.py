"""Worker faults: SIGKILL, silence (SIGSTOP), a broken install, recycling. Every id: one result."""
import os
import shutil
import signal
import sys

from tests.harness import ROOT, assert_exactly_once, request, wait_until


def slow(i, latency=0.3):
    return request(f"w{i}", {"prompt": "x", "x_sim": {"latency": latency}})


def test_repeated_sigkill_of_workers_loses_and_doubles_nothing(redis_server, sim, results, start_processor):
    proc = start_processor(sim.url, "--concurrency", "8", "--workers", "2")
    client = redis_server.client()
    ids = [f"w{i}" for i in range(120)]
    for i in range(120):
        client.publish("batch-queue", slow(i, 0.2))
    for round_ in range(3):
        wait_until(lambda: proc.metric("asyncproc_in_flight") > 0 and len(proc.children()) == 2,
                   what="work in flight on two workers")
        os.kill(proc.children()[round_ % 2], signal.SIGKILL)
        wait_until(lambda r=round_: proc.metric("asyncproc_worker_restarts_total") == r + 1, what="restart")
    results.wait_for(120, timeout=90)
    wait_until(lambda: proc.metric("asyncproc_results_total") >= 120, what="result counter")
    assert_exactly_once(results, ids)
    assert proc.log.read_text().count("killed by SIGKILL") == 3


def test_silent_worker_is_aborted_killed_and_its_work_redone(redis_server, sim, results, start_processor):
    proc = start_processor(sim.url, "--concurrency", "2", "--workers", "2", "--worker-timeout", "1.5")
    client = redis_server.client()
    client.publish("batch-queue", slow(0, 1.0))
    client.publish("batch-queue", slow(1, 1.0))
    wait_until(lambda: proc.metric("asyncproc_in_flight") == 2, what="two in flight")
    victim = proc.children()[0]
    os.kill(victim, signal.SIGSTOP)  # alive but silent: a hung worker
    wait_until(lambda: victim not in proc.children(), timeout=20, what="the silent worker to be killed")
    results.wait_for(2, timeout=30)
    assert_exactly_once(results, ["w0", "w1"])
    log = proc.log.read_text()
    assert "silent for" in log and "killed by SIGKILL" in log


def test_worker_that_cannot_boot_stops_the_supervisor(tmp_path, redis_server, sim, start_processor):
    install = tmp_path / "install"
    shutil.copytree(ROOT / "asyncproc", install / "asyncproc", ignore=shutil.ignore_patterns("__pycache__"))
    proc = start_processor(sim.url, "--workers", "1", "--concurrency", "1",
                           command=[sys.executable, "-m", "asyncproc"], cwd=install,
                           env={"PYTHONPATH": str(install)})
    worker_py = install / "asyncproc" / "worker.py"
    worker_py.write_text(worker_py.read_text() + '\nraise RuntimeError("broken install")\n')
    shutil.rmtree(install / "asyncproc" / "__pycache__", ignore_errors=True)
    os.kill(proc.children()[0], signal.SIGKILL)
    assert proc.proc.wait(60) == 3
    log = proc.log.read_text()
    assert "cannot start workers: worker 0 died 3 times before it was ready" in log
    assert log.count("RuntimeError: broken install") >= 3


def test_max_rss_recycles_workers_without_loss(redis_server, sim, results, start_processor):
    proc = start_processor(sim.url, "--concurrency", "2", "--workers", "1", "--worker-max-rss", "1")
    client = redis_server.client()
    for i in range(40):
        client.publish("batch-queue", slow(i, 0.2))
    results.wait_for(40, timeout=90)
    assert_exactly_once(results, [f"w{i}" for i in range(40)])
    wait_until(lambda: proc.metric("asyncproc_worker_restarts_total") >= 1, what="an RSS retirement")
    log = proc.log.read_text()
    assert "MiB (limit 1); retiring it" in log and "retired after" in log and "killed" not in log
