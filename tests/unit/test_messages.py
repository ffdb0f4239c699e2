import orjson
import pytest

from asyncproc import messages
from asyncproc.messages import DeadLetter, Rejected, Request, Result

NOW = 1_700_000_000.0
FUTURE = NOW + 3600


def parse(obj, max_bytes=1 << 20):
    raw = obj if isinstance(obj, bytes) else orjson.dumps(obj)
    return messages.parse_request(raw, "q1", NOW, messages.Limits(max_bytes=max_bytes))


@pytest.mark.parametrize("deadline, expected", [
    (int(FUTURE), FUTURE),
    (FUTURE + 0.5, FUTURE + 0.5),
    (str(int(FUTURE)), FUTURE),
    (" %s " % FUTURE, FUTURE),
])
def test_deadline_forms(deadline, expected):
    request = parse({"id": "a", "deadline": deadline, "payload": {}})
    assert isinstance(request, Request)
    assert request.deadline == expected


@pytest.mark.parametrize("id_value", ["19933123533434", 7, 0, -3, "x y"])
def test_usable_ids_are_kept_unchanged(id_value):
    request = parse({"id": id_value, "deadline": FUTURE, "payload": {"prompt": "hi"}})
    assert isinstance(request, Request)
    assert request.id == id_value and type(request.id) is type(id_value)


@pytest.mark.parametrize("raw, reason", [
    (b"not json", "not valid JSON"),
    (b"\xff\xfe\x00", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'"text"', "not a JSON object"),
    (orjson.dumps({"deadline": FUTURE, "payload": {}}), "id missing"),
    (orjson.dumps({"id": "", "deadline": FUTURE, "payload": {}}), "id must be"),
    (orjson.dumps({"id": True, "deadline": FUTURE, "payload": {}}), "id must be"),
    (orjson.dumps({"id": 1.5, "deadline": FUTURE, "payload": {}}), "id must be"),
    (orjson.dumps({"id": ["a"], "deadline": FUTURE, "payload": {}}), "id must be"),
    (orjson.dumps({"id": None, "deadline": FUTURE, "payload": {}}), "id must be"),
])
def test_no_usable_id_is_a_dead_letter(raw, reason):
    letter = parse(raw)
    assert isinstance(letter, DeadLetter)
    assert reason in letter.reason
    assert letter.queue == "q1" and letter.raw == raw[: messages.RAW_EXCERPT_BYTES]


@pytest.mark.parametrize("obj, reason", [
    ({"id": "a", "payload": {}}, "deadline missing"),
    ({"id": "a", "deadline": "soon", "payload": {}}, "deadline must be"),
    ({"id": "a", "deadline": None, "payload": {}}, "deadline must be"),
    ({"id": "a", "deadline": True, "payload": {}}, "deadline must be"),
    ({"id": "a", "deadline": "nan", "payload": {}}, "deadline must be"),
    ({"id": "a", "deadline": FUTURE}, "payload missing"),
    ({"id": "a", "deadline": FUTURE, "payload": "hi"}, "payload must be a JSON object"),
    ({"id": "a", "deadline": FUTURE, "payload": [1]}, "payload must be a JSON object"),
    ({"id": "a", "deadline": FUTURE, "payload": {}, "metadata": {"k": 1}}, "metadata"),
    ({"id": "a", "deadline": FUTURE, "payload": {}, "endpoint": "v1/x"}, "endpoint"),
    ({"id": "a", "deadline": FUTURE, "payload": {}, "created": "yesterday"}, "created"),
    ({"id": "a", "deadline": NOW - 1, "payload": {}}, "deadline exceeded"),
    ({"id": "a", "deadline": str(NOW), "payload": {}}, "deadline exceeded"),
])
def test_bad_field_with_usable_id_is_rejected(obj, reason):
    rejected = parse(obj)
    assert isinstance(rejected, Rejected)
    assert rejected.id == "a"
    assert reason in rejected.reason
    late = reason == "deadline exceeded"
    assert rejected.code == (messages.DEADLINE_EXCEEDED if late else messages.INVALID)  # a code, not the text


def test_oversize_message_is_rejected_with_its_id():
    rejected = parse({"id": 9, "deadline": FUTURE, "payload": {"prompt": "x" * 500}}, max_bytes=100)
    assert isinstance(rejected, Rejected) and rejected.id == 9
    assert "too large" in rejected.reason


def test_oversize_message_without_its_id_first_is_a_dead_letter_unparsed():
    raw = orjson.dumps({"payload": {"prompt": "x" * 500}, "id": 9, "deadline": FUTURE})
    letter = parse(raw, max_bytes=100)
    assert isinstance(letter, DeadLetter) and "too large" in letter.reason


@pytest.mark.parametrize("obj, reason", [
    ({"id": "a", "deadline": FUTURE + 40 * 86400, "payload": {}}, "deadline too far ahead"),
    ({"id": "a", "deadline": 1e308, "payload": {}}, "deadline too far ahead"),
    ({"id": "a", "deadline": FUTURE, "payload": {}, "endpoint": "/v1/../admin/reset"}, "endpoint not allowed"),
    ({"id": "a", "deadline": FUTURE, "payload": {}, "endpoint": "/../../admin/reset"}, "endpoint not allowed"),
    ({"id": "a", "deadline": FUTURE, "payload": {}, "endpoint": "/v1/load_lora_adapter"}, "endpoint not allowed"),
    ({"id": "a", "deadline": FUTURE, "payload": {}, "endpoint": "/v1/completions?x=1"}, "endpoint not allowed"),
    ({"id": "a", "deadline": FUTURE, "payload": {}, "endpoint": "/v1/completions/"}, "endpoint not allowed"),
    ({"id": "a", "deadline": FUTURE, "payload": {}, "endpoint": "/v1/%2e%2e/x"}, "endpoint not allowed"),
    ({"request_kind": "x", "internal": {"retry_count": 18446744073709551615},
      "data": {"id": "a", "deadline": FUTURE, "payload": {}}}, "retry_count"),
    ({"request_kind": "x", "internal": {"retry_count": -1}, "data": {"id": "a", "deadline": FUTURE, "payload": {}}},
     "retry_count"),
    ({"request_kind": "x", "internal": {"retry_count": "3"}, "data": {"id": "a", "deadline": FUTURE, "payload": {}}},
     "retry_count"),
    ({"request_kind": "x", "internal": [], "data": {"id": "a", "deadline": FUTURE, "payload": {}}}, "retry_count"),
])
def test_out_of_range_fields_are_rejected(obj, reason):
    rejected = parse(obj)
    assert isinstance(rejected, Rejected) and rejected.id == "a", rejected
    assert reason in rejected.reason
    assert orjson.loads(messages.encode_result(messages.rejected_result(rejected)))["id"] == "a"


@pytest.mark.parametrize("id_text", [b"9223372036854775808", b"-9223372036854775809", b"18446744073709551615",
                                     b"1e400", b'"' + b"x" * 513 + b'"'])
def test_ids_out_of_range_are_dead_letters(id_text):
    assert isinstance(parse(b'{"id": %s, "deadline": 1800000000, "payload": {}}' % id_text), DeadLetter)


def test_endpoint_allowlist_per_queue_and_prefixes():
    limits = messages.Limits(endpoints=messages.Endpoints.parse("/v1/completions,/custom/*"),
                             by_queue={"q1": messages.Endpoints.parse(["/only"])})
    def check(queue, endpoint):
        raw = orjson.dumps({"id": "a", "deadline": FUTURE, "payload": {}, "endpoint": endpoint})
        return isinstance(messages.parse_request(raw, queue, NOW, limits), Request)
    assert check("q1", "/only") and not check("q1", "/v1/completions")
    assert check("q2", "/v1/completions") and check("q2", "/custom/a/b")
    assert not check("q2", "/custom/../x") and not check("q2", "/custom/") and not check("q2", "/customx")
    assert not check("q2", "/v1/chat/completions")


@pytest.mark.parametrize("bad", ["v1/x", "/a/../b", "/a?x", "/a/", "../*", "/a b"])
def test_bad_allowlist_entries_are_refused(bad):
    with pytest.raises(ValueError):
        messages.Endpoints.parse([bad])


def test_optional_fields_are_kept():
    request = parse({"id": "a", "deadline": FUTURE, "payload": {"p": 1}, "created": NOW - 5,
                     "metadata": {"team": "x"}, "endpoint": "/v1/embeddings"})
    assert request.metadata == {"team": "x"}
    assert request.endpoint == "/v1/embeddings"
    assert request.created == NOW - 5
    assert request.received_at == NOW and request.attempts == 0


def test_llm_d_async_envelope_is_unwrapped():
    envelope = {"internal": {"retry_count": 2}, "request_kind": "redis",
                "data": {"id": "e1", "deadline": str(int(FUTURE)), "payload": {"prompt": "hi"}}}
    request = parse(envelope)
    assert isinstance(request, Request)
    assert request.id == "e1" and request.attempts == 2 and request.payload == {"prompt": "hi"}


@pytest.mark.parametrize("endpoint, queue_path, gateway_path, payload, expected", [
    ("/v1/x", "/q", "/g", {"prompt": 1}, "/v1/x"),
    (None, "/q", "/g", {"prompt": 1}, "/q"),
    (None, None, "/g", {"prompt": 1}, "/g"),
    (None, None, None, {"messages": []}, "/v1/chat/completions"),
    (None, None, None, {"prompt": "x"}, "/v1/completions"),
    (None, None, None, {"input": "x"}, "/v1/embeddings"),
    (None, None, None, {"model": "m"}, "/v1/completions"),
])
def test_request_path(endpoint, queue_path, gateway_path, payload, expected):
    request = Request("a", FUTURE, payload, "q", NOW, endpoint=endpoint)
    assert messages.request_path(request, queue_path, gateway_path) == expected


def test_state_round_trip_keeps_retry_state():
    request = Request(5, FUTURE, {"prompt": "x"}, "q", NOW, "/v1/completions", {"a": "b"}, NOW - 1,
                      attempts=3, last_error="HTTP 503")
    assert messages.decode_state(messages.encode_state(request), "other") == request


@pytest.mark.parametrize("raw", [b"junk", b"{}", orjson.dumps({"id": True, "deadline": 1, "payload": {},
                                                               "received_at": 1})])
def test_unreadable_state_is_a_dead_letter(raw):
    assert isinstance(messages.decode_state(raw, "q"), DeadLetter)


def test_seed_result_shapes():
    ok = Result("a", "q", True, status_code=200, body=b'{"choices": []}', attempts=2,
                metadata={"k": "v"})
    assert orjson.loads(messages.encode_result(ok)) == {
        "id": "a", "payload": {"choices": []}, "attempts": 2, "status_code": 200,
        "metadata": {"k": "v"}}
    text = Result(3, "q", True, status_code=200, body=b"plain text", attempts=1)
    assert orjson.loads(messages.encode_result(text))["payload"] == "plain text"
    bad = Result(3, "q", False, error="deadline exceeded", attempts=4)
    assert orjson.loads(messages.encode_result(bad)) == {"id": 3, "error": "deadline exceeded",
                                                         "attempts": 4}


def test_llm_d_async_result_shape():
    """Exactly api.ResultMessage: an HTTP answer is its status and raw body (no error
    code, omitempty); every other ending an llm-d-async error code, payload {"error"}."""
    ok = Result("a", "q", True, status_code=200, body=b'{"x": 1}', attempts=1)
    assert orjson.loads(messages.encode_result(ok, "llm-d-async")) == {
        "id": "a", "status_code": 200, "payload": '{"x": 1}'}
    bad = Result("b", "q", False, error="gateway returned HTTP 400: no", status_code=400,
                 body=b"no", attempts=1)
    assert orjson.loads(messages.encode_result(bad, "llm-d-async")) == {"id": "b", "status_code": 400, "payload": "no"}
    late = Result(7, "q", False, error="deadline exceeded (last failure: connect timeout)", token="t1")
    assert orjson.loads(messages.encode_result(late, "llm-d-async")) == {
        "id": "7", "payload": '{"error":"deadline exceeded (last failure: connect timeout)"}',
        "error_code": "DEADLINE_EXCEEDED", "error_message": "deadline exceeded (last failure: connect timeout)",
        "request_token": "t1"}
    request = Request("c", FUTURE, {}, "q", NOW)
    assert orjson.loads(messages.encode_result(messages.cancelled_result(request), "llm-d-async"))["error_code"] \
        == "CANCELLED"
    rejected = messages.parse_request(b'{"id": "d", "deadline": "soon", "payload": {}}', "q", NOW)
    assert orjson.loads(messages.encode_result(messages.rejected_result(rejected), "llm-d-async"))["error_code"] \
        == "INVALID_REQUEST"
    expired = messages.parse_request(b'{"id": "e", "deadline": 1, "payload": {}}', "q", NOW)
    assert orjson.loads(messages.encode_result(messages.rejected_result(expired), "llm-d-async"))["error_code"] \
        == "DEADLINE_EXCEEDED"
    failed = Result("f", "q", False, error="deadline exceeded (last failure: HTTP 503)", status_code=503, body=b"busy")
    assert orjson.loads(messages.encode_result(failed, "llm-d-async")) == {"id": "f", "status_code": 503,
                                                                           "payload": "busy"}
    too_big = Result("g", "q", False, error="response too large (over 10 bytes)", status_code=200)
    assert orjson.loads(messages.encode_result(too_big, "llm-d-async"))["error_code"] == "INFERENCE_ERROR"
