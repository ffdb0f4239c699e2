"""Drain on signals, Redis outages and restarts, bursts, replicas, one result per id."""
import signal

import orjson
import psutil

from tests.harness import Results, Sim, assert_exactly_once, request, wait_subscribed, wait_until


def publish_many(client, raws, channel="batch-queue", chunk=1000):
    for start in range(0, len(raws), chunk):
        pipe = client.pipeline(transaction=False)
        for raw in raws[start:start + chunk]:
            pipe.publish(channel, raw)
        pipe.execute()


def slow_requests(n, latency, prefix="d"):
    return [f"{prefix}{i}" for i in range(n)], [
        request(f"{prefix}{i}", {"prompt": "x", "x_sim": {"latency": latency}}) for i in range(n)]


def test_sigterm_then_restart_finishes_everything_once(redis_server, sim, results, start_processor):
    first = start_processor(sim.url, "--concurrency", "4", "--shutdown-grace-period", "0.3")
    ids, raws = slow_requests(100, 0.25)
    publish_many(redis_server.client(), raws)
    wait_until(lambda: len(results.items) >= 10, what="some results")
    assert first.terminate() == 0
    assert len(results.items) < 100  # the drain really left work behind
    assert "putting back" in first.log.read_text()
    start_processor(sim.url, "--concurrency", "8")
    results.wait_for(100, timeout=60)
    assert_exactly_once(results, ids)



def test_redis_restart_with_requests_in_flight(tmp_path, sim, start_processor, persistent_redis):
    results = Results(persistent_redis.port)
    try:
        proc = start_processor(sim.url, "--concurrency", "4")
        ids, raws = slow_requests(4, 4.0, prefix="o")
        publish_many(persistent_redis.client(), raws)
        wait_until(lambda: proc.metric("asyncproc_in_flight") == 4, what="four in flight")
        persistent_redis.stop()
        wait_until(lambda: proc.get("/readyz").status_code == 503, what="not ready without Redis")
        assert proc.get("/healthz").status_code == 200 and proc.proc.poll() is None
        persistent_redis.start()
        wait_subscribed(persistent_redis.client(), "batch-queue-result")  # the collector is back
        wait_until(proc.ready, what="asyncproc ready again")
        results.wait_for(4, timeout=30)  # held in the outbox across the outage
        more_ids, more = slow_requests(10, 0.0, prefix="after")
        wait_subscribed(persistent_redis.client(), "batch-queue")
        publish_many(persistent_redis.client(), more)
        results.wait_for(14)
        assert_exactly_once(results, ids + more_ids)
        assert proc.metric("asyncproc_transport_errors_total") >= 1
        assert "reachable again" in proc.log.read_text()
    finally:
        results.close()


def test_retries_survive_a_redis_crash_with_persistence(sim, start_processor, persistent_redis):
    results = Results(persistent_redis.port)
    try:
        # Retries due 6 s after their 503: the crash, the restart and the collector's return
        # must all fall before the first is due, or one in flight would be in neither count
        # below (3 s was once too short with the suite in four processes on two cores).
        proc = start_processor(sim.url, "--concurrency", "4", "--retry-policy", "fixed",
                               "--retry-base-delay", "6", "--retry-max-delay", "6")
        client = persistent_redis.client()
        ids = [f"r{i}" for i in range(30)]
        publish_many(client, [request(i, {"prompt": "x", "x_sim": {"key": i, "script": [503, 200]}}) for i in ids])
        wait_until(lambda: client.zcard("batch-sortedset-retry") == 30, what="30 waiting retries")
        persistent_redis.stop()  # SIGKILL
        persistent_redis.start()
        wait_subscribed(persistent_redis.client(), "batch-queue-result")  # the collector is back
        assert persistent_redis.client().zcard("batch-sortedset-retry") + len(results.items) == 30
        results.wait_for(30, timeout=60)
        assert_exactly_once(results, ids)
        assert all(r["attempts"] == 2 for r in results.items)
        assert proc.proc.poll() is None
    finally:
        results.close()


def test_burst_is_staged_in_redis_not_dropped_nor_held_in_memory(start_processor, redis_server):
    sim = Sim("--latency", "0.05")
    # Redis drops a subscriber whose output buffer passes 16 MB, or stays over 4 MB for 5 s.
    # 10 MB arrive at once; the gateway takes 640 requests/s: a subscriber that read only as
    # fast as it dispatched would stay over 4 MB for about 10 s and be dropped.
    redis_server.stop()
    redis_server.start("--client-output-buffer-limit", "pubsub", "16mb", "4mb", "5")
    results = Results(redis_server.port)
    try:
        proc = start_processor(sim.url, "--concurrency", "32", "--intake-buffer", "64")
        n = 10_000
        ids = [f"b{i}" for i in range(n)]
        prompt = "y" * 1000  # 10 MB in all, far over the buffer limit if it were not drained
        publish_many(redis_server.client(), [request(i, {"prompt": prompt}) for i in ids])
        results.wait_for(n, timeout=240)
        assert_exactly_once(results, ids)
        assert proc.metric("asyncproc_staged_total") > n / 2
        assert proc.metric("asyncproc_transport_errors_total") == 0
        assert "output buffer limits" not in redis_server.log_text()
        rss = psutil.Process(proc.proc.pid).memory_info().rss
        assert rss < 200 * 1024 * 1024, f"supervisor RSS {rss / 1048576:.0f} MiB"
    finally:
        results.close()
        sim.stop()


def test_two_replicas_on_one_channel_process_each_id_once(redis_server, sim, results, start_processor):
    a = start_processor(sim.url, "--concurrency", "4")
    b = start_processor(sim.url, "--concurrency", "4")
    client = redis_server.client()
    wait_until(lambda: dict(client.pubsub_numsub("batch-queue"))[b"batch-queue"] == 2, what="two subscribers")
    ids = [f"p{i}" for i in range(300)]
    publish_many(client, [request(i) for i in ids])
    results.wait_for(300)
    wait_until(lambda: sim.stats()["requests"] >= 300, what="gateway requests")
    assert_exactly_once(results, ids)
    assert sim.stats()["requests"] == 300  # no doubled gateway traffic
    skipped = sum(p.metric("asyncproc_skipped_deliveries_total", reason="claimed-or-done") for p in (a, b))
    assert skipped == 300  # each message was seen by both, and left by one


def test_one_result_per_id_within_the_window(redis_server, sim, results, start_processor):
    proc = start_processor(sim.url, "--concurrency", "2")
    client = redis_server.client()
    client.publish("batch-queue", request("same"))
    results.wait_for(1)
    client.publish("batch-queue", request("same"))  # redelivered after its result
    client.publish("batch-queue", request("later"))
    wait_until(lambda: "later" in results.ids(), what="the next message")
    wait_until(lambda: proc.metric("asyncproc_skipped_deliveries_total") == 1, what="skip counter")
    assert sorted(results.ids()) == ["later", "same"]
    assert sim.stats()["requests"] == 2


def test_dedupe_and_claims_can_be_turned_off(redis_server, sim, results, start_processor):
    start_processor(sim.url, "--redis.claim", "false", "--result-dedupe-window", "0")
    client = redis_server.client()
    client.publish("batch-queue", request("again"))
    results.wait_for(1)
    client.publish("batch-queue", request("again"))
    results.wait_for(2)
    assert results.ids() == ["again", "again"]
    assert not any(k.startswith(b"asyncproc:") for k in client.keys("*"))


def test_put_back_entries_are_the_whole_request_state(redis_server, sim, results, start_processor):
    proc = start_processor(sim.url, "--concurrency", "1", "--workers", "1", "--shutdown-grace-period", "0")
    client = redis_server.client()
    client.publish("batch-queue", request("st", {"prompt": "x", "x_sim": {"latency": 30}}, metadata={"k": "v"}))
    wait_until(lambda: proc.metric("asyncproc_in_flight") == 1, what="in flight")
    assert proc.terminate() == 0
    (entry,) = client.zrange("batch-sortedset-retry", 0, -1)
    state = orjson.loads(entry)
    assert state["id"] == "st" and state["metadata"] == {"k": "v"} and state["queue"] == "batch-queue"
    assert state["payload"]["x_sim"] == {"latency": 30}


def test_stop_waits_for_redis_to_write_what_it_holds(sim, start_processor, persistent_redis):
    proc = start_processor(sim.url, "--concurrency", "2", "--shutdown-grace-period", "20")
    ids, raws = slow_requests(2, 1.0, prefix="h")
    publish_many(persistent_redis.client(), raws)
    wait_until(lambda: proc.metric("asyncproc_in_flight") == 2, what="two in flight")
    persistent_redis.stop()
    proc.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "draining -> stopping" in proc.log.read_text(), what="stopping with results held")
    assert proc.proc.poll() is None  # waiting for Redis, not dropping the results
    persistent_redis.start()
    assert proc.proc.wait(30) == 0
    # Nobody may be subscribed at that instant (pub/sub), but the publish script marks each
    # id it published, atomically with the PUBLISH.
    client = persistent_redis.client()
    for rid in ids:
        assert client.exists(f'asyncproc:{{batch-queue-result}}:done:"{rid}"')
    assert "not written" not in proc.log.read_text()
