"""kill -9 of the whole tree, replicas sharing a queue, takeover and dead-lettering."""
import signal

import orjson
import pytest

from tests.harness import Queue, assert_exactly_once, kill_group, request, wait_until

IMPLS = ["redis-sortedset", "redis-streams"]


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def start(start_processor, sim, impl, *args, **kw):
    return start_processor(sim.url, "--message-queue-impl", impl, "--redis.lease-seconds", "2",
                           "--retry-base-delay", "0.1", "--retry-max-delay", "0.3", *args, **kw)


def test_kill_9_of_the_whole_tree_then_restart(redis_server, sim, start_processor, impl):
    queue = Queue(redis_server.client(), impl)
    ids = [f"k{i}" for i in range(200)]
    # some are mid-retry when the tree dies: their attempts must survive too
    queue.put([request(i, {"prompt": "x", "x_sim": {"key": i, "latency": 0.1,
                                                    "script": [503, 200] if n % 5 == 0 else [200]}})
               for n, i in enumerate(ids)])
    first = start(start_processor, sim, impl, "--concurrency", "8")
    wait_until(lambda: 30 <= len(queue.results()), what="some results")
    kill_group(first.proc, signal.SIGKILL)  # supervisor and workers at once, no goodbye
    first.proc.wait(10)
    done_before = len(queue.results())
    assert done_before < 200
    start(start_processor, sim, impl, "--concurrency", "8")
    assert_exactly_once(queue.wait_results(200, timeout=90), ids)
    wait_until(lambda: queue.leftovers() == {}, what="nothing left behind")


def test_replicas_share_the_work_and_survive_one_being_killed(redis_server, sim, start_processor, impl):
    queue = Queue(redis_server.client(), impl)
    ids = [f"r{i}" for i in range(300)]
    replicas = [start(start_processor, sim, impl, "--concurrency", "4") for _ in range(3)]
    # all three ready before the work arrives: a replica slow to start (a busy machine)
    # must not find the work done already
    queue.put([request(i, {"prompt": "x", "x_sim": {"latency": 0.05}}) for i in ids])
    wait_until(lambda: len(queue.results()) >= 60, what="some results")
    kill_group(replicas[0].proc, signal.SIGKILL)
    assert_exactly_once(queue.wait_results(300, timeout=90), ids)
    shares = [p.metric("asyncproc_results_total") for p in replicas[1:]]
    assert all(n > 0 for n in shares), shares  # the work was shared
    wait_until(lambda: queue.leftovers() == {}, what="nothing left behind")


def test_replicas_do_not_double_the_work_in_the_normal_case(redis_server, sim, start_processor, impl):
    queue = Queue(redis_server.client(), impl)
    ids = [f"n{i}" for i in range(200)]
    queue.put([request(i) for i in ids])
    for _ in range(2):
        start(start_processor, sim, impl, "--concurrency", "4")
    assert_exactly_once(queue.wait_results(200), ids)
    assert sim.stats()["requests"] == 200


def test_live_long_requests_are_not_taken_over(redis_server, sim, start_processor, impl):
    """Requests longer than the lease: keep-alive keeps the other replica's hands off."""
    queue = Queue(redis_server.client(), impl)
    ids = [f"l{i}" for i in range(4)]
    queue.put([request(i, {"prompt": "x", "x_sim": {"latency": 5}}) for i in ids])
    start(start_processor, sim, impl, "--concurrency", "4")
    wait_until(lambda: sim.stats()["requests"] == 4, what="all four at the gateway")
    start(start_processor, sim, impl, "--concurrency", "4")
    assert_exactly_once(queue.wait_results(4, timeout=30), ids)
    assert sim.stats()["requests"] == 4


def test_stream_entry_delivered_too_often_is_dead_lettered(redis_server, sim, start_processor):
    queue = Queue(redis_server.client(), "redis-streams")
    queue.put([request("poison", {"prompt": "x", "x_sim": {"latency": 60}})])
    first = start(start_processor, sim, "redis-streams", "--max-deliveries", "1")
    wait_until(lambda: sim.stats()["requests"] == 1, what="the entry in flight")
    kill_group(first.proc, signal.SIGKILL)
    first.proc.wait(10)
    start(start_processor, sim, "redis-streams", "--max-deliveries", "1")
    (letter,) = wait_until(queue.dead_letters, timeout=30, what="a dead letter")
    assert letter["reason"] == "delivered 2 times (max 1)" and letter["queue"] == "batch-queue"
    assert orjson.loads(letter["message"])["id"] == "poison"
    wait_until(lambda: queue.leftovers() == {}, what="the entry acknowledged")
    assert queue.results() == []
