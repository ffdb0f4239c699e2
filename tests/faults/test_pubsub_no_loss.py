"""redis-pubsub: nothing that reached asyncproc's subscriber is lost, whatever is killed.

4,000 requests published in one burst; kill -9 of the whole tree, Redis stopped and started
again, and both at once with two replicas. Every id gets exactly one result: the collector
sees no id twice, and every id has its done marker (set in the same script that publishes
its result, so it proves the publication even while the collector was away with Redis).
"""
import random
import time
from collections import Counter

import orjson

from tests.harness import Results, request, wait_subscribed, wait_until

COUNT = 4000
OPTIONS = ("--concurrency", "32", "--redis.lease-seconds", "2", "--retry-base-delay", "0.1",
           "--retry-max-delay", "0.3")


def burst(client, prefix):
    rng = random.Random(prefix)
    ids = [f"{prefix}{i}" for i in range(COUNT)]
    pipe = client.pipeline(transaction=False)
    for rid in ids:
        pipe.publish("batch-queue", request(rid, {"prompt": "x", "x_sim": {"latency": rng.uniform(0.02, 0.1)}}))
    received = sum(pipe.execute())
    assert received >= COUNT  # every PUBLISH reached a subscriber
    return ids


def done_marker(rid):
    return f"asyncproc:{{batch-queue-result}}:done:{orjson.dumps(rid).decode()}"


def missing_done(client, ids):
    pipe = client.pipeline(transaction=False)
    for rid in ids:
        pipe.exists(done_marker(rid))
    return [rid for rid, found in zip(ids, pipe.execute()) if not found]


def assert_nothing_lost(client, results, ids):
    wait_until(lambda: not missing_done(client, ids), 120, 0.2,
               what=f"every id answered (missing {missing_done(client, ids)[:5]})")
    counts = Counter(results.ids())
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1][:10]
    assert set(counts) <= set(ids)
    wait_until(lambda: client.zcard("asyncproc:{batch-queue-result}:held") == 0
               and client.zcard("asyncproc:{batch-queue-result}:staged") == 0
               and client.zcard("batch-sortedset-retry") == 0
               and client.zcard("asyncproc:{batch-sortedset-retry}:leases") == 0, 30,
               what="no record, retry or lease left")
    assert client.hlen("asyncproc:{batch-queue-result}:held-messages") == 0


def test_kill_9_of_the_whole_tree_during_a_burst_loses_nothing(redis_server, sim, results, start_processor):
    client = redis_server.client()
    first = start_processor(sim.url, *OPTIONS)
    ids = burst(client, "k")
    results.wait_for(COUNT * 3 // 10)
    first.kill()
    start_processor(sim.url, *OPTIONS)
    results.wait_for(COUNT, timeout=120)
    assert set(results.ids()) == set(ids)  # Redis stayed up: the collector saw every one
    assert_nothing_lost(client, results, ids)


def test_redis_stopped_and_started_again_during_a_burst_loses_nothing(persistent_redis, sim, start_processor):
    results = Results(persistent_redis.port)
    try:
        proc = start_processor(sim.url, *OPTIONS)
        ids = burst(persistent_redis.client(), "r")
        results.wait_for(COUNT // 2)
        persistent_redis.stop()  # SIGKILL; with appendfsync always nothing written is lost
        wait_until(lambda: proc.get("/readyz").status_code == 503, what="not ready without Redis")
        persistent_redis.start()
        wait_subscribed(persistent_redis.client(), "batch-queue-result")
        assert_nothing_lost(persistent_redis.client(), results, ids)
        assert proc.proc.poll() is None
    finally:
        results.close()


def test_kill_9_and_redis_restart_at_once_with_two_replicas(persistent_redis, sim, start_processor):
    results = Results(persistent_redis.port)
    try:
        victim = start_processor(sim.url, *OPTIONS)
        survivor = start_processor(sim.url, *OPTIONS)
        ids = burst(persistent_redis.client(), "b")
        results.wait_for(COUNT * 3 // 10)
        victim.kill()
        persistent_redis.stop()
        time.sleep(0.5)  # a fault's length, not a wait for a condition
        persistent_redis.start()
        wait_subscribed(persistent_redis.client(), "batch-queue-result")
        start_processor(sim.url, *OPTIONS)  # the killed replica comes back too
        assert_nothing_lost(persistent_redis.client(), results, ids)
        assert survivor.proc.poll() is None
    finally:
        results.close()
