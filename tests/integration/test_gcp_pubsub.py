"""gcp-pubsub on Google's Pub/Sub emulator, the sim and the real process tree."""
import time

import orjson

from tests.harness import assert_exactly_once, request, wait_until

FAST_RETRIES = ("--retry-base-delay", "0.1", "--retry-max-delay", "0.3", "--gcp.ack-deadline", "10")


def test_every_request_gets_one_result(pubsub, sim, start_gcp_processor):
    ids = [f"g{i}" for i in range(200)]
    pubsub.put([request(i, metadata={"n": i}) for i in ids])
    proc = start_gcp_processor(sim.url, "--concurrency", "16", *FAST_RETRIES)
    results = pubsub.wait_results(200)
    assert_exactly_once(results, ids, ok=False)
    assert all(r["payload"]["object"] == "text_completion" and r["metadata"]["n"] == r["id"] for r in results)
    assert sim.stats()["requests"] == 200
    wait_until(lambda: proc.metric("asyncproc_queue_leased") == 0 and proc.metric("asyncproc_results_total") == 200,
               timeout=15, what="nothing leased")
    assert proc.terminate() == 0
    assert pubsub.undelivered() == 0  # every request acknowledged


def test_two_subscriptions_are_merged(pubsub_emulator, sim, tmp_path):
    from tests.harness import Processor, PubSubQueues

    queues = PubSubQueues(pubsub_emulator, requests_count=2)
    proc = Processor("redis://127.0.0.1:1/0", sim.url, *queues.args("--concurrency", "8", *FAST_RETRIES),
                     env=queues.env(), log=tmp_path / "asyncproc.log")
    try:
        proc.wait_ready()
        a, b = [f"a{i}" for i in range(40)], [f"b{i}" for i in range(40)]
        queues.put([request(i) for i in a], queue=0)
        queues.put([request(i) for i in b], queue=1)
        assert_exactly_once(queues.wait_results(80), a + b, ok=False)
        subs = {attrs["queue"] for attrs in queues.result_attributes()}
        assert subs == set(queues.subscriptions)
        assert all(attrs["request_message_id"] for attrs in queues.result_attributes())
    finally:
        proc.kill()
        queues.close()


def test_retries_deadlines_and_bad_input(pubsub, sim, start_gcp_processor):
    start_gcp_processor(sim.url, "--concurrency", "4", *FAST_RETRIES)
    pubsub.put([
        request("retried", {"prompt": "x", "x_sim": {"key": "retried", "script": [503, 200]}}),
        request("shed", {"prompt": "x", "x_sim": {"key": "shed", "script": [429, 503, 200]}}),
        request("fatal", {"prompt": "x", "x_sim": {"key": "fatal", "script": [400]}}),
        request("late", {"prompt": "x", "x_sim": {"key": "late", "script": [503]}}, deadline_in=4),
        request("past", deadline_in=-5),
        orjson.dumps({"id": "nopayload", "deadline": time.time() + 60}),
        orjson.dumps({"id": "baddeadline", "deadline": "soon", "payload": {}}),
        b"not json at all",
        orjson.dumps({"deadline": time.time() + 60, "payload": {}}),
    ])
    by_id = {r["id"]: r for r in pubsub.wait_results(7, timeout=40)}
    assert by_id["retried"]["attempts"] == 2 and by_id["retried"]["payload"]["object"] == "text_completion"
    assert by_id["shed"]["attempts"] == 3 and "payload" in by_id["shed"]
    assert by_id["fatal"]["error"].startswith("gateway returned HTTP 400")
    assert by_id["late"]["error"].startswith("deadline exceeded (last failure: HTTP 503)")
    assert by_id["late"]["attempts"] >= 2  # the retry state rode on the redeliveries
    assert by_id["past"]["error"] == "deadline exceeded"
    assert by_id["nopayload"]["error"] == "payload missing"
    assert by_id["baddeadline"]["error"].startswith("deadline must be Unix seconds")
    letters = wait_until(lambda: len(pubsub.dead_letters()) >= 2 and pubsub.dead_letters(), what="two dead letters")
    assert sorted(letter["reason"] for letter in letters) == ["id missing", "not valid JSON"]
    assert {letter["queue"] for letter in letters} == set(pubsub.subscriptions)
    assert any(letter["raw"] == "not json at all" for letter in letters)
    assert len(pubsub.results()) == 7  # nothing answered twice


def test_flow_control_leases_no_more_than_it_can_dispatch(pubsub, sim, start_gcp_processor):
    pubsub.put([request(f"f{i}", {"prompt": "x", "x_sim": {"latency": 30}}) for i in range(12)])
    proc = start_gcp_processor(sim.url, "--concurrency", "2", "--workers", "1", *FAST_RETRIES)
    # 2 in flight and 2 more held (the intake buffer defaults to --concurrency); the rest stay
    # with Pub/Sub for other replicas
    wait_until(lambda: proc.metric("asyncproc_queue_leased") == 4, timeout=20, what="4 leased")
    wait_until(lambda: sim.stats()["requests"] == 2, what="2 at the gateway")
    assert proc.metric("asyncproc_queue_leased") == 4 and sim.stats()["requests"] == 2


def test_long_requests_keep_their_lease(pubsub, sim, start_gcp_processor):
    """Requests longer than the ack deadline are not redelivered while being worked on."""
    ids = [f"l{i}" for i in range(3)]
    pubsub.put([request(i, {"prompt": "x", "x_sim": {"latency": 12}}) for i in ids])
    start_gcp_processor(sim.url, "--concurrency", "4", *FAST_RETRIES)
    assert_exactly_once(pubsub.wait_results(3, timeout=40), ids, ok=False)
    assert sim.stats()["requests"] == 3


def test_llm_d_async_envelope_and_result_format(pubsub, sim, start_gcp_processor):
    inner = orjson.loads(request("wrapped"))
    pubsub.put([orjson.dumps({"internal": {"retry_count": 1}, "request_kind": "pubsub", "data": inner})])
    start_gcp_processor(sim.url, "--result-format", "llm-d-async", *FAST_RETRIES)
    (result,) = pubsub.wait_results(1)
    assert result["id"] == "wrapped" and result["status_code"] == 200 and "error_code" not in result
    assert orjson.loads(result["payload"])["object"] == "text_completion"


def test_messages_at_pubsubs_own_size_limit_do_not_jam_the_subscription(pubsub, sim, start_gcp_processor):
    """Valid 9.8 MB messages (Pub/Sub's limit is 10 MB) among small ones: every pull that
    returned one used to fail (gRPC's 4 MB default cap on a reply); now each is answered."""
    good = [f"g{i}" for i in range(100)]
    pubsub.put([request(i) for i in good[:50]])
    big = [f"big{i}" for i in range(5)]
    for rid in big:
        pubsub.put([request(rid, {"prompt": "x" * 9_800_000})])
    pubsub.put([request(i) for i in good[50:]])
    proc = start_gcp_processor(sim.url, "--concurrency", "16", *FAST_RETRIES)
    results = pubsub.wait_results(len(good) + len(big), timeout=90)
    assert_exactly_once(results, good + big, ok=False)
    by_id = {r["id"]: r for r in results}
    assert all(by_id[b]["error"].startswith("message too large") for b in big)
    assert all("payload" in by_id[g] for g in good)
    assert proc.proc.poll() is None
