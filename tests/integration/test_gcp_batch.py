"""The batch commands on gcp-pubsub: the emulator, the sim and the real processor."""
import os
import subprocess
import sys
from collections import Counter

import orjson

from tests.harness import ROOT


def tool(pubsub, *args):
    env = dict(os.environ, **pubsub.env())
    return subprocess.run([sys.executable, "-m", "asyncproc", *args, *pubsub.args(), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)


def results_subscriptions(pubsub):
    topic = f"projects/{pubsub.args()[3]}/topics/{pubsub.result_topic}"
    return [s for s in pubsub.publisher.list_topic_subscriptions(request={"topic": topic}) if "asyncproc-results-" in s]


def test_run_batch_on_gcp_pubsub(tmp_path, pubsub, sim, start_gcp_processor):
    start_gcp_processor(sim.url, "--concurrency", "16")
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(orjson.dumps({"custom_id": f"g{i}", "method": "POST", "url": "/v1/completions",
                                                "body": {"model": "m", "prompt": f"p{i}"}}) for i in range(300)) + b"\n")
    out = tmp_path / "out.jsonl"
    done = tool(pubsub, "run-batch", str(source), "--output", str(out))
    assert done.returncode == 0, done.stderr
    lines = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert Counter(x["custom_id"] for x in lines) == Counter(f"g{i}" for i in range(300))
    assert all(x["response"]["status_code"] == 200 and x["error"] is None for x in lines)
    assert results_subscriptions(pubsub) == []  # the batch's results subscription is gone when done


def test_submit_collect_status_on_gcp_pubsub(tmp_path, pubsub, sim, start_gcp_processor):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(orjson.dumps({"id": i, "payload": {"prompt": f"p{i}"}}) for i in range(50)) + b"\n")
    submitted = tool(pubsub, "submit", str(source))
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    assert len(results_subscriptions(pubsub)) == 1
    start_gcp_processor(sim.url, "--concurrency", "8")
    out = tmp_path / "out.jsonl"
    collected = tool(pubsub, "collect", "--batch", batch_id, "--output", str(out), "--wait", "--timeout", "60")
    assert collected.returncode == 0, collected.stderr
    results = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert sorted(r["id"] for r in results) == list(range(50)) and all("payload" in r for r in results)
    status = tool(pubsub, "status", "--json")
    rows = {r["batch"]: r for r in orjson.loads(status.stdout)["batches"]}
    assert rows[batch_id]["total"] == 50
    cancel = tool(pubsub, "cancel", "--batch", batch_id)
    assert cancel.returncode == 1 and "cancel needs a Redis transport" in cancel.stderr
    assert "Traceback" not in cancel.stderr
