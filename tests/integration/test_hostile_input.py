"""Hostile messages and writes Redis refuses, through real Redis, the sim and real processes:
each costs one error result or dead letter, never the process and never another message."""
import time
from collections import Counter

import orjson

from tests.harness import Queue, request, wait_subscribed, wait_until


def poison(now):
    """The messages that once took asyncproc down or held a request for ever."""
    return {
        "huge-retry-count": orjson.dumps({"request_kind": "x", "internal": {"retry_count": 18446744073709551615},
                                          "data": {"id": "huge-retry-count", "deadline": now + 600, "payload": {}}}),
        "far-deadline": orjson.dumps({"id": "far-deadline", "deadline": 1e308, "payload": {"prompt": "x"}}),
        "traversal": request("traversal", endpoint="/../../admin/reset"),
        "lora": request("lora", endpoint="/v1/load_lora_adapter"),
        "query": request("query", endpoint="/v1/completions?admin=1"),
    }


EXPECTED = {"huge-retry-count": "retry_count", "far-deadline": "deadline too far ahead",
            "traversal": "endpoint not allowed", "lora": "endpoint not allowed", "query": "endpoint not allowed"}


def test_poison_messages_on_a_sorted_set_get_error_results_once(redis_server, sim, start_processor):
    queue = Queue(redis_server.client(), "redis-sortedset")
    now = time.time()
    bad = poison(now)
    good = [f"g{i}" for i in range(40)]
    queue.put([*bad.values(), *(request(i) for i in good)], deadlines=[now + 600] * (len(bad) + len(good)))
    proc = start_processor(sim.url, "--message-queue-impl", "redis-sortedset", "--concurrency", "4",
                           "--redis.lease-seconds", "2")
    results = queue.wait_results(len(bad) + len(good))
    counts = Counter(r["id"] for r in results)
    assert set(counts) == set(bad) | set(good) and max(counts.values()) == 1
    by_id = {r["id"]: r for r in results}
    for rid, reason in EXPECTED.items():
        assert reason in by_id[rid]["error"], by_id[rid]
    assert all("payload" in by_id[i] for i in good)
    assert set(sim.stats()["by_path"]) == {"/v1/completions"}  # nothing hostile reached the gateway
    wait_until(lambda: queue.leftovers() == {}, what="nothing left leased (no crash loop)")
    assert proc.proc.poll() is None and proc.metric("asyncproc_internal_errors_total") == 0


def test_a_result_redis_refuses_costs_only_that_result(redis_server, sim, results, start_processor):
    """Over proto-max-bulk-len Redis closes the connection: the others are still written."""
    proc = start_processor(sim.url, "--concurrency", "8", "--max-message-bytes", str(4 << 20))
    client = redis_server.client()
    # the sim echoes the model name: this result is about 2 MB; answers come after 1 s
    client.publish("batch-queue", request("big", {"model": "m" * (2 << 20), "prompt": "x",
                                                 "x_sim": {"latency": 1.0}}))
    wait_until(lambda: sim.stats()["requests"] == 1, what="the big request at the gateway")
    client.config_set("proto-max-bulk-len", str(1 << 20))  # its result is over this
    good = [f"g{i}" for i in range(30)]
    for i in good:
        client.publish("batch-queue", request(i, {"prompt": "x", "x_sim": {"latency": 0.5}}))
    results.wait_for(len(good) + 1)
    counts = Counter(results.ids())
    assert set(counts) == {"big", *good} and max(counts.values()) == 1
    by_id = results.by_id()
    assert "refused by the queue system" in by_id["big"]["error"]
    assert all("payload" in by_id[i] for i in good)
    assert proc.metric("asyncproc_writes_refused_total", kind="result") == 1
    assert proc.get("/readyz").status_code == 200 and proc.proc.poll() is None


def test_results_over_the_limit_become_error_results(redis_server, sim, results, start_processor):
    start_processor(sim.url, "--max-result-bytes", "100000")
    client = redis_server.client()
    client.publish("batch-queue", request("big", {"model": "m" * 200_000, "prompt": "x"}))
    client.publish("batch-queue", request("small"))
    results.wait_for(2)
    by_id = results.by_id()
    assert by_id["big"]["error"].startswith("result too large:") and "limit 100000" in by_id["big"]["error"]
    assert by_id["big"]["status_code"] == 200 and "payload" in by_id["small"]


def test_redis_dropping_the_subscriber_is_logged_counted_and_survived(redis_server, sim, results,
                                                                      start_processor):
    client = redis_server.client()
    client.config_set("client-output-buffer-limit", "pubsub 1mb 0 0")
    proc = start_processor(sim.url, "--max-message-bytes", str(8 << 20))
    client.publish("batch-queue", request("before"))
    results.wait_for(1)
    client.publish("batch-queue", request("huge", {"prompt": "x" * (3 << 20)}))  # over the buffer limit
    wait_until(lambda: proc.metric("asyncproc_subscriber_dropped_total") == 1, what="the drop counted")
    wait_subscribed(client, "batch-queue")
    client.publish("batch-queue", request("after"))
    results.wait_for(2)
    assert set(results.ids()) == {"before", "after"}  # "huge" was dropped by Redis, by design
    log = proc.log.read_text()
    assert log.count("Redis closed the subscription") == 1 and "client-output-buffer-limit pubsub 1048576" in log
    assert proc.proc.poll() is None
