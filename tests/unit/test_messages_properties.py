"""Property tests of everything that turns outside bytes into values and back: whatever a
producer, the retry set or a gateway hands over, these functions return a value and never
raise. Seeds of failures found are kept as regular tests in test_messages.py."""
import math

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncproc import llmd, messages
from asyncproc.messages import DeadLetter, Rejected, Request, Result

NOW = 1_700_000_000.0
LIMITS = messages.Limits(max_bytes=4096)

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 63), max_value=2 ** 64 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
ids = st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1) | st.text(min_size=1, max_size=40)
deadlines = (st.floats(min_value=NOW - 10, max_value=NOW + 40 * 86400)
             | st.text(max_size=12) | st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1) | st.none()
             | st.booleans())
messages_like = st.fixed_dictionaries(
    {},
    optional={"id": ids | json_values, "deadline": deadlines, "payload": json_values,
              "metadata": st.dictionaries(st.text(max_size=5), json_scalars, max_size=3),
              "endpoint": st.sampled_from(["/v1/completions", "/x/../y", "v1", "/v1/embeddings?x"]) | json_scalars,
              "created": deadlines})
header_maps = st.dictionaries(st.sampled_from(["Authorization", "Host", "Connection", "x-a", "bad name", "TE",
                                               "Content-Length", "x-\u00e9"]) | st.text(max_size=6),
                              st.text(max_size=8) | json_scalars, max_size=4) | json_scalars
internals = st.fixed_dictionaries({}, optional={
    "retry_count": json_scalars, "request_token": st.text(max_size=40) | json_scalars,
    "result_queue_name": st.sampled_from(["results", "asyncproc:x", "request-cancel:a", ""]) | json_scalars,
    "payload_ref": st.text(max_size=5)})
envelopes = st.fixed_dictionaries({"request_kind": st.sampled_from(["plain", "redis", "pubsub"]) | st.text(max_size=5),
                                   "data": messages_like.map(dict) | st.fixed_dictionaries(
                                       {"id": ids, "deadline": st.just(NOW + 60), "payload": st.just({})},
                                       optional={"headers": header_maps, "result_queue_name": json_scalars,
                                                 "metadata": st.just({"userid": "u"})})},
                                  optional={"internal": internals | json_values})


def check_parsed(parsed, queue="q"):
    assert isinstance(parsed, (Request, Rejected, DeadLetter))
    if isinstance(parsed, DeadLetter):
        assert isinstance(parsed.raw, bytes) and len(parsed.raw) <= messages.RAW_EXCERPT_BYTES
        messages.encode_dead_letter(parsed)
        return
    assert messages.usable_id(parsed.id) and orjson.loads(parsed.key) == parsed.id
    assert 0 <= parsed.attempts <= messages.MAX_RETRY_COUNT
    if isinstance(parsed, Rejected):
        assert orjson.loads(messages.encode_result(messages.rejected_result(parsed), "seed"))["id"] == parsed.id
        check_llmd_result(messages.encode_result(messages.rejected_result(parsed), "llm-d-async"), parsed.id)
        return
    if parsed.headers is not None:
        assert not llmd.clean_headers(parsed.headers)[1]  # only sendable headers are kept
    assert parsed.token is None or (isinstance(parsed.token, str) and parsed.token)
    assert NOW < parsed.deadline <= NOW + LIMITS.max_horizon
    orjson.dumps(parsed.payload)  # every accepted request can be sent
    assert messages.decode_state(messages.encode_state(parsed), queue) == parsed
    attempted = parsed.after_attempt("HTTP 503")
    assert messages.decode_state(messages.encode_state(attempted), queue) == attempted


@given(st.binary(max_size=300))
def test_any_bytes_parse_to_a_value(raw):
    check_parsed(messages.parse_request(raw, "q", NOW, LIMITS))


@given(messages_like | envelopes)
@settings(max_examples=300)
def test_any_json_object_parses_to_a_value(obj):
    raw = orjson.dumps(obj)
    check_parsed(messages.parse_request(raw, "q", NOW, LIMITS))


@given(messages_like, st.binary(max_size=20))
def test_truncated_or_padded_messages_parse_to_a_value(obj, tail):
    raw = orjson.dumps(obj)
    check_parsed(messages.parse_request(raw[: len(raw) // 2] + tail, "q", NOW, LIMITS))
    check_parsed(messages.parse_request(raw + b" " * 5000, "q", NOW, LIMITS))


@given(st.binary(max_size=200) | json_values.map(orjson.dumps))
def test_any_retry_set_entry_decodes_to_a_value(raw):
    parsed = messages.decode_state(raw, "q")
    assert isinstance(parsed, (Request, DeadLetter))
    if isinstance(parsed, Request):
        assert messages.decode_state(messages.encode_state(parsed), "q") == parsed


@given(st.dictionaries(st.sampled_from(["id", "deadline", "payload", "queue", "received_at", "attempts",
                                        "metadata", "endpoint", "created", "last_error", "headers", "reply_to",
                                        "token"]), json_values | header_maps))
def test_any_state_shaped_entry_decodes_to_a_value(obj):
    parsed = messages.decode_state(orjson.dumps(obj), "q")
    assert isinstance(parsed, (Request, DeadLetter))
    if isinstance(parsed, Request):
        assert messages.decode_state(messages.encode_state(parsed), "q") == parsed
        assert math.isfinite(parsed.deadline)


@given(ids, st.booleans(), st.one_of(st.none(), st.text(max_size=30)), st.one_of(st.none(), st.integers(100, 599)),
       st.one_of(st.none(), st.binary(max_size=100), json_values.map(orjson.dumps)),
       st.integers(min_value=0, max_value=2 ** 70),
       st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)))
def test_every_result_encodes_in_both_formats(id_value, ok, error, status, body, attempts, metadata):
    result = Result(id_value, "q", ok, error, status, body, attempts, metadata)
    seed = orjson.loads(messages.encode_result(result, "seed"))
    assert seed["id"] == id_value
    if ok and attempts < 2 ** 63:
        assert seed["attempts"] == attempts and seed.get("metadata") == metadata
        assert ("payload" in seed) and "error" not in seed
    out = check_llmd_result(messages.encode_result(result, "llm-d-async"), id_value)
    if ok:
        assert "error_code" not in out and out["payload"] == (body or b"").decode("utf-8", "replace")
    else:
        assert out.get("error_code") in llmd.ERROR_CODES or (status and body is not None)


def check_llmd_result(raw: bytes, id_value) -> dict:
    """What Go's json.Unmarshal into api.ResultMessage accepts: id and payload strings,
    status_code an int, error fields strings; a non-HTTP ending has a known code."""
    out = orjson.loads(raw)
    assert out["id"] == (id_value if isinstance(id_value, str) else str(id_value))
    assert isinstance(out["payload"], str)
    assert isinstance(out.get("status_code", 0), int) and not isinstance(out.get("status_code", 0), bool)
    assert all(isinstance(out.get(k, ""), str) for k in ("error_code", "error_message", "request_token"))
    if "error_code" in out:
        assert out["error_code"] in llmd.ERROR_CODES and "status_code" not in out
        assert set(orjson.loads(out["payload"])) == {"error"}
    return out


@given(st.text(max_size=60) | st.sampled_from(["nan", "inf", "-inf", "1e400", "Wed, 21 Oct 99999 07:28:00 GMT"]))
def test_any_retry_after_header_is_a_finite_delay_or_none(value):
    from asyncproc import retry

    seconds = retry.parse_retry_after(value, NOW)
    assert seconds is None or (math.isfinite(seconds) and seconds >= 0)


@given(st.integers(min_value=0, max_value=999), st.binary(max_size=300), st.one_of(st.none(), st.text(max_size=30)))
def test_any_gateway_answer_classifies(status, body, retry_after):
    from asyncproc import outcomes

    outcome = outcomes.from_response(status, body, retry_after, 0.1)
    assert outcome.kind in outcomes.Kind and isinstance(outcome.describe(), str)
