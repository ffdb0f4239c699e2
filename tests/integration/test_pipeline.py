"""The whole pipeline on real parts: redis-server, the sim gateway, bin/asyncproc."""
import time

import orjson

from tests.harness import request, wait_subscribed, wait_until


def publish(client, raws, channel="batch-queue"):
    pipe = client.pipeline(transaction=False)
    for raw in raws:
        pipe.publish(channel, raw)
    pipe.execute()


def test_thousand_requests_each_get_exactly_one_correct_result(redis_server, sim, results, start_processor):
    proc = start_processor(sim.url, "--concurrency", "16", "--workers", "2",
                           "--inference-objective", "food-review")
    client = redis_server.client()
    ids = [f"r{i}" for i in range(500)] + list(range(500))
    publish(client, [request(i, {"model": "m", "prompt": f"p-{i}"}, metadata={"n": str(i)}) for i in ids])
    got = results.wait_for(len(ids))
    wait_until(lambda: proc.metric("asyncproc_results_total") == len(ids), what="result counter")
    assert len(results.items) == len(ids)  # no duplicates...
    by_id = results.by_id()
    assert set(by_id) == set(ids)          # ...and none lost; int and str ids stay apart
    for rid in ids:
        result = by_id[rid]
        assert "error" not in result, result
        assert result["metadata"] == {"n": str(rid)}
        assert result["payload"]["object"] == "text_completion"
        assert result["payload"]["x_sim"]["objective"] == "food-review"
        assert result["payload"]["x_sim"]["path"] == "/v1/completions"
    assert sum(1 for r in got if isinstance(r["id"], int)) == 500
    assert sim.stats()["requests"] == len(ids)
    assert len(proc.children()) >= 2  # the supervisor's worker processes


def test_path_choice_and_endpoint(redis_server, sim, results, start_processor):
    start_processor(sim.url, "--concurrency", "4")
    client = redis_server.client()
    publish(client, [
        request("chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        request("emb", {"model": "m", "input": "hi"}),
        request("comp", {"model": "m", "prompt": "hi"}),
        request("forced", {"model": "m", "prompt": "hi"}, endpoint="/v1/chat/completions"),
    ])
    results.wait_for(4)
    paths = {rid: r["payload"]["x_sim"]["path"] for rid, r in results.by_id().items()}
    assert paths == {"chat": "/v1/chat/completions", "emb": "/v1/embeddings",
                     "comp": "/v1/completions", "forced": "/v1/chat/completions"}
    assert results.by_id()["chat"]["payload"]["object"] == "chat.completion"


def test_gateway_url_with_a_path_is_used_for_every_request(redis_server, sim, results, start_processor):
    start_processor(sim.url + "/v1/embeddings", "--concurrency", "2")
    publish(redis_server.client(), [request("x", {"prompt": "hi"})])
    result = results.wait_for(1)[0]
    assert result["payload"]["x_sim"]["path"] == "/v1/embeddings"


def test_transient_failures_are_retried(redis_server, sim, results, start_processor):
    start_processor(sim.url, "--concurrency", "4", "--retry-base-delay", "0.2", "--retry-max-delay", "0.5")
    publish(redis_server.client(), [
        request("s503", {"prompt": "x", "x_sim": {"key": "s503", "script": [503, 503, 200]}}),
        request("s429", {"prompt": "x", "x_sim": {"key": "s429", "script": [429, 200], "retry_after": "1"}}),
        request("drop", {"prompt": "x", "x_sim": {"key": "drop", "script": ["drop", 502, 200]}}),
        request("s400", {"prompt": "x", "x_sim": {"key": "s400", "script": [400, 200]}}),
    ])
    results.wait_for(4)
    by_id = results.by_id()
    assert by_id["s503"]["attempts"] == 3 and by_id["s503"]["payload"]["x_sim"]["attempt"] == 3
    assert by_id["drop"]["attempts"] == 3 and "payload" in by_id["drop"]
    assert by_id["s429"]["attempts"] == 2 and "payload" in by_id["s429"]
    assert by_id["s400"] == {"id": "s400", "attempts": 1, "status_code": 400,
                             "error": by_id["s400"]["error"]}
    assert by_id["s400"]["error"].startswith("gateway returned HTTP 400")
    attempts = sim.stats()["attempts"]
    assert attempts == {"s503": 3, "s429": 2, "drop": 3, "s400": 1}  # no retry of the 400


def test_retry_after_http_date_is_honoured(redis_server, sim, results, start_processor):
    import email.utils

    start_processor(sim.url, "--concurrency", "2", "--retry-base-delay", "0.05", "--retry-max-delay", "0.05")
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    published = time.time()
    publish(redis_server.client(), [
        request("d", {"prompt": "x", "x_sim": {"key": "d", "script": [503, 200], "retry_after": when}})])
    result = results.wait_for(1, timeout=30)[0]
    assert result["attempts"] == 2
    # the second attempt was not made before the date the gateway named
    assert result["payload"]["x_sim"]["at"] >= published + 1.0


def test_retries_live_in_the_redis_sorted_set(redis_server, sim, results, start_processor):
    start_processor(sim.url, "--concurrency", "2", "--retry-policy", "fixed", "--retry-base-delay", "3",
                    "--retry-max-delay", "3", "--redis.retry-queue-name", "my-retries")
    client = redis_server.client()
    publish(client, [request("later", {"prompt": "x", "x_sim": {"key": "later", "script": [503, 200]}})])
    entry = wait_until(lambda: client.zrange("my-retries", 0, -1, withscores=True), 10,
                       what="a retry-set entry")
    member, due = entry[0]
    state = orjson.loads(member)
    assert state["id"] == "later" and state["attempts"] == 1 and state["last_error"] == "HTTP 503"
    assert time.time() + 1 < due <= time.time() + 3.5
    assert results.wait_for(1, timeout=30)[0]["attempts"] == 2
    assert client.zcard("my-retries") == 0


def test_unreachable_gateway_ends_in_deadline_exceeded(redis_server, results, start_processor):
    from tests.harness import free_port

    start_processor(f"http://127.0.0.1:{free_port()}", "--concurrency", "2",
                    "--retry-base-delay", "0.2", "--retry-max-delay", "0.5")
    publish(redis_server.client(), [request("nowhere", deadline_in=3)])
    result = results.wait_for(1, timeout=30)[0]
    assert result["id"] == "nowhere"
    assert result["error"].startswith("deadline exceeded (last failure: connection error")
    assert result["attempts"] >= 2



def test_several_request_channels_are_all_consumed(redis_server, sim, results, start_processor):
    proc = start_processor(sim.url, "--concurrency", "4", "--redis.request-queue-name", "qa",
                           "--redis.request-queue-name", "qb", "--redis.request-queue-name", "qc")
    client = redis_server.client()
    for channel in ("qa", "qb", "qc"):
        wait_subscribed(client, channel)
        publish(client, [request(f"{channel}-{i}") for i in range(30)], channel=channel)
    results.wait_for(90)
    assert set(results.by_id()) == {f"{c}-{i}" for c in ("qa", "qb", "qc") for i in range(30)}
    for channel in ("qa", "qb", "qc"):
        assert proc.metric("asyncproc_requests_received_total", queue=channel) == 30


def test_queues_file_routes_per_queue(tmp_path, redis_server, sim, results, start_processor):
    queues = tmp_path / "queues.json"
    queues.write_bytes(orjson.dumps({"queues": [
        {"name": "food", "objective": "food-review", "path": "/v1/chat/completions"},
        {"name": "bulk"}]}))
    start_processor(sim.url, "--queues-file", str(queues), "--inference-objective", "default-obj")
    client = redis_server.client()
    wait_subscribed(client, "bulk")
    publish(client, [request("f", {"messages": []})], channel="food")
    publish(client, [request("b", {"prompt": "x"})], channel="bulk")
    results.wait_for(2)
    seen = {rid: r["payload"]["x_sim"] for rid, r in results.by_id().items()}
    assert seen["f"]["objective"] == "food-review" and seen["f"]["path"] == "/v1/chat/completions"
    assert seen["b"]["objective"] == "default-obj" and seen["b"]["path"] == "/v1/completions"


def test_llm_d_async_envelope_and_result_format(redis_server, sim, results, start_processor):
    start_processor(sim.url, "--result-format", "llm-d-async")
    envelope = {"internal": {"retry_count": 0}, "request_kind": "pubsub",
                "data": orjson.loads(request("env", {"prompt": "x"}))}
    publish(redis_server.client(), [orjson.dumps(envelope), request("bad", {"prompt": "x", "x_sim": {"key": "bad", "script": [404]}})])
    results.wait_for(2)
    by_id = results.by_id()
    assert by_id["env"]["status_code"] == 200 and "error_code" not in by_id["env"]
    assert orjson.loads(by_id["env"]["payload"])["object"] == "text_completion"
    assert by_id["bad"]["status_code"] == 404 and "error_code" not in by_id["bad"]  # an HTTP answer
