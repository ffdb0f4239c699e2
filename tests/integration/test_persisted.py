"""redis-sortedset and redis-streams on real Redis, the sim and real processes."""
import time
from collections import Counter

import orjson
import pytest

from tests.harness import Queue, request, wait_until

IMPLS = ["redis-sortedset", "redis-streams"]


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def start(start_processor, sim, impl, *args):
    return start_processor(sim.url, "--message-queue-impl", impl, "--retry-base-delay", "0.1",
                           "--retry-max-delay", "0.3", *args)


def test_every_request_gets_one_result_and_nothing_is_left(redis_server, sim, start_processor, impl):
    queue = Queue(redis_server.client(), impl)
    ids = [f"s{i}" for i in range(300)]
    queue.put([request(i, metadata={"n": i}) for i in ids])
    proc = start(start_processor, sim, impl, "--concurrency", "16")
    results = queue.wait_results(300)
    counts = Counter(r["id"] for r in results)
    assert set(counts) == set(ids) and max(counts.values()) == 1
    assert all(r["payload"]["object"] == "text_completion" and r["metadata"]["n"] == r["id"] for r in results)
    wait_until(lambda: queue.leftovers() == {}, what=f"nothing left (have {queue.leftovers()})")
    assert sim.stats()["requests"] == 300
    wait_until(lambda: proc.metric("asyncproc_queue_leased") == 0, timeout=15, what="leased gauge")


def test_retries_deadlines_and_bad_input(redis_server, sim, start_processor, impl):
    queue = Queue(redis_server.client(), impl)
    start(start_processor, sim, impl, "--concurrency", "4")  # first: "late" must arrive in time
    queue.put([
        request("retried", {"prompt": "x", "x_sim": {"key": "retried", "script": [503, 429, 200]}}),
        request("fatal", {"prompt": "x", "x_sim": {"key": "fatal", "script": [400]}}),
        request("late", {"prompt": "x", "x_sim": {"key": "late", "script": [503]}}, deadline_in=3),
        request("past", deadline_in=-5),
        orjson.dumps({"id": "nopayload", "deadline": time.time() + 60}),
        b"not json at all",
    ], deadlines=[time.time() + 600] * 6)
    by_id = {r["id"]: r for r in queue.wait_results(5, timeout=30)}
    assert by_id["retried"]["attempts"] == 3 and "payload" in by_id["retried"]
    assert by_id["fatal"]["error"].startswith("gateway returned HTTP 400")
    assert by_id["late"]["error"].startswith("deadline exceeded (last failure: HTTP 503)")
    assert by_id["past"]["error"] == "deadline exceeded"
    assert by_id["nopayload"]["error"] == "payload missing"
    letters = wait_until(queue.dead_letters, what="a dead letter")
    assert "not valid JSON" in str(letters[0])
    wait_until(lambda: queue.leftovers() == {}, what="nothing left")


def test_llm_d_async_envelope(redis_server, sim, start_processor, impl):
    queue = Queue(redis_server.client(), impl)
    inner = orjson.loads(request("wrapped"))
    queue.put([orjson.dumps({"internal": {"retry_count": 1}, "request_kind": "redis", "data": inner})],
              deadlines=[time.time() + 600])
    start(start_processor, sim, impl)
    (result,) = queue.wait_results(1)
    assert result["id"] == "wrapped" and result["attempts"] == 2  # one made before, one here


def test_sorted_set_takes_the_earliest_deadline_first(redis_server, sim, start_processor):
    queue = Queue(redis_server.client(), "redis-sortedset")
    now = time.time()
    order = [f"d{i}" for i in range(20)]
    shuffled = order[::3] + order[1::3] + order[2::3]
    queue.put([request(i, deadline_in=1000 + int(i[1:]) * 10) for i in shuffled],
              deadlines=[now + 1000 + int(i[1:]) * 10 for i in shuffled])
    start(start_processor, sim, "redis-sortedset", "--concurrency", "1", "--workers", "1")
    assert [r["id"] for r in queue.wait_results(20)] == order


def test_streams_group_is_created_and_entries_written_before_it_are_work(redis_server, sim, start_processor):
    client = redis_server.client()
    queue = Queue(client, "redis-streams")
    queue.put([request("early")])  # the stream exists, the group does not
    start(start_processor, sim, "redis-streams", "--redis.consumer-group", "g1")
    assert [r["id"] for r in queue.wait_results(1)] == ["early"]
    assert [g["name"] for g in client.xinfo_groups("batch-queue")] == [b"g1"]


def test_stream_without_message_field_is_dead_lettered(redis_server, sim, start_processor):
    client = redis_server.client()
    client.xadd("batch-queue", {"body": "hello"})
    queue = Queue(client, "redis-streams")
    start(start_processor, sim, "redis-streams")
    letters = wait_until(queue.dead_letters, what="a dead letter")
    assert orjson.loads(letters[0]["message"])["reason"] == "id missing"
    wait_until(lambda: queue.leftovers() == {}, what="the entry acknowledged")


def test_queue_metrics(redis_server, sim, start_processor, impl):
    queue = Queue(redis_server.client(), impl)
    queue.put([request(f"m{i}", {"prompt": "x", "x_sim": {"latency": 30}}) for i in range(10)])
    proc = start(start_processor, sim, impl, "--concurrency", "2", "--workers", "1")
    # 2 in flight and 2 more held (the intake buffer defaults to --concurrency)
    wait_until(lambda: proc.metric("asyncproc_queue_leased") == 4 and proc.metric("asyncproc_queue_depth") == 6,
               timeout=20, what="depth 6 and 4 leased")
    if impl == "redis-streams":
        assert proc.metric("asyncproc_queue_oldest_age_seconds") > 0
