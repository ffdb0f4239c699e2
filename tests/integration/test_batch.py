"""run-batch, submit, collect, status, cancel and asyncproc.client against real Redis, the sim
and the real processor."""
import signal
import subprocess
import sys
import time
from collections import Counter

import orjson
import pytest

from asyncproc import config
from asyncproc.client import Client
from tests.harness import ROOT, kill_group, wait_until


def tool(redis_server, *args, impl="redis-pubsub", timeout=120):
    """An `asyncproc <tool>` command run to its end."""
    return subprocess.run([sys.executable, "-m", "asyncproc", *args, "--redis-url", redis_server.url,
                           "--message-queue-impl", impl, "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def openai_lines(count, prefix="r"):
    return [orjson.dumps({"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions",
                          "body": {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}})
            for i in range(count)]


def output_lines(path):
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_run_batch_of_10000_openai_lines(tmp_path, redis_server, sim, start_processor):
    start_processor(sim.url, "--concurrency", "32")
    source = tmp_path / "in.jsonl"
    lines = openai_lines(10_000)
    lines[100:100] = [b"{broken", b'{"custom_id": "r5", "url": "/v1/chat/completions", "body": {}}']
    source.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    done = tool(redis_server, "run-batch", str(source), "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert f"{source}:101: not valid JSON" in done.stderr and f"{source}:102: id \"r5\" repeats line 6" in done.stderr
    assert "done: 10000 ok, 0 failed, 2 malformed lines skipped" in done.stderr
    results = output_lines(out)
    assert Counter(r["custom_id"] for r in results) == Counter(f"r{i}" for i in range(10_000))
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in results)
    assert all(r["response"]["body"]["object"] == "chat.completion" for r in results)
    assert sim.stats()["requests"] == 10_000


@pytest.mark.parametrize("impl", ["redis-pubsub", "redis-sortedset"])
def test_interrupted_run_resumes_with_one_result_each(tmp_path, redis_server, start_processor, impl):
    from tests.harness import Sim

    slow = Sim("--latency-min", "0.02", "--latency-max", "0.06")
    try:
        start_processor(slow.url, "--message-queue-impl", impl, "--concurrency", "8")
        source = tmp_path / "in.jsonl"
        source.write_bytes(b"\n".join(orjson.dumps({"id": f"q{i}", "payload": {"prompt": f"p{i}"}})
                                      for i in range(800)) + b"\n")
        out = tmp_path / "out.jsonl"
        argv = [sys.executable, "-m", "asyncproc", "run-batch", str(source), "--output", str(out),
                "--redis-url", redis_server.url, "--message-queue-impl", impl, "--no-progress"]
        first = subprocess.Popen(argv, cwd=ROOT, start_new_session=True, stderr=subprocess.PIPE)
        wait_until(lambda: out.exists() and out.read_bytes().count(b"\n") >= 150, timeout=60,
                   what="some results written")
        kill_group(first)
        first.wait(10)
        with open(out, "ab") as torn:          # as if killed in the middle of a line
            torn.write(b'{"id": "q799", "payl')
        before = out.read_bytes().count(b"\n")
        assert before < 800
        second = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        assert f"{before} already in" in second.stderr
        results = output_lines(out)
        assert Counter(r["id"] for r in results) == Counter(f"q{i}" for i in range(800))
        assert all(r["payload"]["choices"][0]["text"] for r in results)
        assert all("metadata" not in r for r in results)  # the batch tag is taken out
        batch_id = second.stderr.split("batch ", 1)[1].split(":", 1)[0]
        status = tool(redis_server, "status", "--batch", batch_id, "--json", impl=impl)
        row = orjson.loads(status.stdout)["batches"][0]
        assert row["total"] == 800  # a resumed run does not count its batch twice
        if impl != "redis-pubsub":
            assert (row["ok"], row["pending"], row["state"]) == (800, 0, "complete")
    finally:
        slow.stop()


@pytest.mark.parametrize("impl", ["redis-sortedset", "redis-streams"])
def test_submit_status_collect(tmp_path, redis_server, sim, start_processor, impl):
    source = tmp_path / "in.jsonl"
    lines = [orjson.dumps({"id": f"a{i}", "payload": {"prompt": f"p{i}"}}) for i in range(199)]
    lines.append(orjson.dumps({"id": "fails", "payload": {"prompt": "x", "x_sim": {"key": "f", "script": [400]}}}))
    lines.insert(3, b'{"id": "nopayload"}')
    source.write_bytes(b"\n".join(lines) + b"\n")
    strict = tool(redis_server, "submit", str(source), "--strict", impl=impl)
    assert strict.returncode == 1 and "nothing submitted" in strict.stderr
    assert redis_server.client().exists("batch-queue") == 0

    submitted = tool(redis_server, "submit", str(source), impl=impl)
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    assert f"{source}:4: payload must be a JSON object" in submitted.stderr
    other = tmp_path / "other.jsonl"
    other.write_bytes(b'{"id": "x1", "payload": {"prompt": "other batch"}}\n')
    assert tool(redis_server, "submit", str(other), "--batch", "other", impl=impl).returncode == 0

    status = tool(redis_server, "status", "--batch", batch_id, "--json", impl=impl)
    assert status.returncode == 0, status.stderr
    row = orjson.loads(status.stdout)["batches"][0]
    assert row["total"] == 200 and row["pending"] == 200 and row["state"] == "in progress"

    start_processor(sim.url, "--message-queue-impl", impl, "--concurrency", "16")
    out = tmp_path / "out.jsonl"
    collected = tool(redis_server, "collect", "--batch", batch_id, "--output", str(out), "--wait",
                     "--timeout", "60", impl=impl)
    assert collected.returncode == 0, collected.stderr
    results = {r["id"]: r for r in output_lines(out)}
    assert set(results) == {f"a{i}" for i in range(199)} | {"fails"}
    assert results["fails"]["error"].startswith("gateway returned HTTP 400")

    status = tool(redis_server, "status", "--json", impl=impl)
    report = orjson.loads(status.stdout)
    rows = {r["batch"]: r for r in report["batches"]}
    assert (rows[batch_id]["ok"], rows[batch_id]["failed"], rows[batch_id]["state"]) == (199, 1, "complete")
    assert rows["other"]["total"] == 1
    assert report["queues"]["dead_letters"] == {"batch-queue-dead-letter": 0}
    again = tool(redis_server, "collect", "--batch", batch_id, "--output", str(out), impl=impl)
    assert again.returncode == 0 and len(output_lines(out)) == 200  # nothing written twice


def settings_for(redis_server, impl):
    return config.load_settings(["--redis-url", redis_server.url, "--message-queue-impl", impl])


@pytest.mark.parametrize("impl", ["redis-pubsub", "redis-sortedset"])
def test_cancel_a_batch(redis_server, start_processor, impl):
    """The Python client end to end: queued requests of a cancelled batch are answered
    'cancelled' without reaching the gateway; the ones in flight are aborted (answered
    'cancelled' too, never retried)."""
    from tests.harness import Sim

    slow = Sim("--latency", "0.3")
    client = Client(settings_for(redis_server, impl))
    try:
        proc = start_processor(slow.url, "--message-queue-impl", impl, "--concurrency", "2")
        with client.results() as results:
            client.submit([{"id": f"c{i}", "deadline": time.time() + 600, "payload": {"prompt": "x"}}
                           for i in range(60)], batch="doomed")
            client.submit([{"id": "keep", "deadline": time.time() + 600, "payload": {"prompt": "x"}}], batch="kept")
            wait_until(lambda: slow.stats()["requests"] >= 2, what="the first requests in flight")
            client.cancel(batch="doomed")
            got = {}
            for result in results.wait(timeout=60):
                got[result["id"]] = result
                if len(got) == 61:
                    break
        assert set(got) == {f"c{i}" for i in range(60)} | {"keep"}
        cancelled = [r for r in got.values() if r.get("error") == "cancelled"]
        finished = [r for r in got.values() if "payload" in r]
        assert len(cancelled) + len(finished) == 61
        assert "keep" in {r["id"] for r in finished}
        assert len(cancelled) >= 45                          # at most a second of dispatch before it applied
        aborted = proc.metric("asyncproc_cancelled_in_flight_total", queue="batch-queue")
        assert aborted <= 2  # at most what was in flight at the cancel
        wait_until(lambda: slow.stats()["requests"] == len(finished) + aborted,
                   what="gateway saw only the finished ones and those aborted in flight")
        assert all(r["metadata"] == {"asyncproc.batch": "doomed"} for r in cancelled)
    finally:
        client.close()
        slow.stop()


def test_tool_errors_are_one_line(tmp_path, redis_server):
    missing = tool(redis_server, "run-batch", str(tmp_path / "in.jsonl"))
    assert missing.returncode == 2 and "--output" in missing.stderr and "Traceback" not in missing.stderr
    absent = tool(redis_server, "run-batch", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o"))
    assert absent.returncode == 2 and "No such file" in absent.stderr and "Traceback" not in absent.stderr
    window = tool(redis_server, "submit", str(tmp_path / "in.jsonl"), "--completion-window", "soon")
    assert window.returncode == 2 and "--completion-window" in window.stderr
    pubsub = tool(redis_server, "collect", "--output", str(tmp_path / "o"))
    assert pubsub.returncode == 2 and "collect needs a transport that keeps results" in pubsub.stderr
    nothing = tool(redis_server, "cancel")
    assert nothing.returncode == 2 and "nothing to cancel" in nothing.stderr
    down = subprocess.run([sys.executable, "-m", "asyncproc", "status", "--redis-url", "redis://127.0.0.1:1/0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert down.returncode == 1 and "redis" in down.stderr and "Traceback" not in down.stderr


def test_sigint_says_how_to_resume(tmp_path, redis_server):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"id": "a", "payload": {"prompt": "x"}}\n')
    argv = [sys.executable, "-m", "asyncproc", "run-batch", str(source), "--output", str(tmp_path / "o.jsonl"),
            "--redis-url", redis_server.url, "--no-progress"]
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: dict(redis_server.client().pubsub_numsub("batch-queue-result")).get(b"batch-queue-result"),
               what="run-batch listening")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    assert "run the same command again to resume" in proc.stderr.read()
