"""Every bad-input case of SPEC §3.3, sent as real bytes through Redis."""
import time

import orjson

from tests.harness import request, wait_until

FUTURE = str(int(time.time() + 3600))

NO_USABLE_ID = [
    (b"this is not json", "not valid JSON"),
    (b"\xff\xfe\x00\x01", "not valid JSON"),
    (b'{"id": "a", "deadline": ', "not valid JSON"),
    (b"[1, 2, 3]", "not a JSON object"),
    (b"42", "not a JSON object"),
    (orjson.dumps({"deadline": FUTURE, "payload": {}}), "id missing"),
    (orjson.dumps({"id": "", "deadline": FUTURE, "payload": {}}), "id must be"),
    (orjson.dumps({"id": True, "deadline": FUTURE, "payload": {}}), "id must be"),
    (orjson.dumps({"id": {"x": 1}, "deadline": FUTURE, "payload": {}}), "id must be"),
]

WITH_ID = {
    "no-deadline": ({"id": "no-deadline", "payload": {}}, "deadline missing"),
    "bad-deadline": ({"id": "bad-deadline", "deadline": "tomorrow", "payload": {}}, "deadline must be"),
    "no-payload": ({"id": "no-payload", "deadline": FUTURE}, "payload missing"),
    "str-payload": ({"id": "str-payload", "deadline": FUTURE, "payload": "hi"}, "payload must be a JSON object"),
    "past": ({"id": "past", "deadline": str(int(time.time() - 10)), "payload": {}}, "deadline exceeded"),
    "bad-meta": ({"id": "bad-meta", "deadline": FUTURE, "payload": {}, "metadata": {"n": 1}}, "metadata"),
    "big": ({"id": "big", "deadline": FUTURE, "payload": {"prompt": "x" * 5000}}, "message too large"),
    7: ({"id": 7, "deadline": None, "payload": {}}, "deadline must be"),
}


def test_bad_input_is_answered_or_dead_lettered_and_counted(redis_server, sim, results, start_processor):
    proc = start_processor(sim.url, "--concurrency", "2", "--max-message-bytes", "2000")
    client = redis_server.client()
    for raw, _ in NO_USABLE_ID:
        client.publish("batch-queue", raw)
    for obj, _ in WITH_ID.values():
        client.publish("batch-queue", orjson.dumps(obj))
    client.publish("batch-queue", request("good-after"))

    results.wait_for(len(WITH_ID) + 1)
    by_id = results.by_id()
    assert len(results.items) == len(WITH_ID) + 1
    for rid, (_, reason) in WITH_ID.items():
        assert reason in by_id[rid]["error"], by_id[rid]
        assert "payload" not in by_id[rid]
    assert "payload" in by_id["good-after"]  # the processor runs on

    letters = wait_until(lambda: client.llen("batch-queue-dead-letter") == len(NO_USABLE_ID)
                         and client.lrange("batch-queue-dead-letter", 0, -1), what="dead letters")
    letters = [orjson.loads(x) for x in letters]
    assert [x["reason"] for x in letters] == [r for _, r in NO_USABLE_ID] or all(
        any(r in x["reason"] for x in letters) for _, r in NO_USABLE_ID)
    assert all(x["queue"] == "batch-queue" for x in letters)
    assert letters[0]["raw"] == "this is not json"
    assert sim.stats()["requests"] == 1  # nothing bad reached the gateway
    assert proc.metric("asyncproc_dead_letters_total") == len(NO_USABLE_ID)
    assert proc.metric("asyncproc_bad_messages_total", kind="error-result") == len(WITH_ID)
    assert proc.proc.poll() is None


def test_oversized_dead_letter_is_truncated(redis_server, sim, start_processor):
    start_processor(sim.url)
    client = redis_server.client()
    client.publish("batch-queue", b"x" * 100_000)
    letter = orjson.loads(wait_until(lambda: client.lindex("batch-queue-dead-letter", 0), what="dead letter"))
    assert letter["reason"] == "not valid JSON" and len(letter["raw"]) == 4096
