"""llm-d-async's wire rules: header order and refusals, fairness, result routing."""
import orjson
import pytest

from asyncproc import llmd, messages
from asyncproc.messages import Rejected, Request

NOW = 1_700_000_000.0
ROUTE = {"Content-Type": "application/json", "x-gateway-inference-objective": "queue-obj",
         "Authorization": "Bearer route"}


def envelope(data, kind="redis", **internal):
    return orjson.dumps({"internal": internal, "request_kind": kind, "data": data})


def data(**extra):
    return {"id": "r1", "created": NOW, "deadline": NOW + 60, "payload": {"prompt": "x"}, **extra}


@pytest.mark.parametrize("name,reason", [
    ("Connection", "hop-by-hop"), ("keep-alive", "hop-by-hop"), ("Transfer-Encoding", "hop-by-hop"),
    ("TE", "hop-by-hop"), ("Upgrade", "hop-by-hop"), ("Proxy-Authorization", "hop-by-hop"),
    ("Host", "host"), ("content-length", "content-length"), ("bad name", "invalid"), ("", "invalid"),
    ("x" * 300, "invalid"),
])
def test_headers_that_must_not_cross_a_hop_are_refused(name, reason):
    assert llmd.refusal(name, "v") == reason
    kept, refused = llmd.clean_headers({name: "v", "x-ok": "1"})
    assert kept == {"x-ok": "1"} and refused == (reason,)


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "nul\x00", "\u20ac", "x" * 9000])
def test_header_values_that_cannot_be_sent_are_refused(value):
    assert llmd.refusal("x-a", value) == "invalid"


def test_request_headers_follow_the_route_and_fairness_follows_them():
    own = {"authorization": "Bearer user", "X-Gateway-Inference-Objective": "mine",
           "X-LLM-D-Inference-Fairness-ID": "spoofed"}
    out = llmd.merge_headers(ROUTE, own, {"userid": "tenant-a"})
    assert out == {"Content-Type": "application/json", "authorization": "Bearer user",
                   "X-Gateway-Inference-Objective": "mine", "x-llm-d-inference-fairness-id": "tenant-a"}
    assert llmd.merge_headers(ROUTE, None, {"userid": "t"}, fairness_header="")["Authorization"] == "Bearer route"
    assert "x-llm-d-inference-fairness-id" not in llmd.merge_headers(ROUTE, {}, {"other": "t"})
    assert llmd.merge_headers(ROUTE, {}, {"team": "t"}, fairness_key="team")["x-llm-d-inference-fairness-id"] == "t"
    assert "x-llm-d-inference-fairness-id" not in llmd.merge_headers(ROUTE, {}, {"userid": "a\r\nb"})


def test_envelope_fields_are_parsed_and_checked():
    parsed = messages.parse_request(envelope(data(headers={"Authorization": "Bearer u", "Host": "evil"},
                                                  result_queue_name="data-results"),
                                             request_token="ab12", retry_count=1), "q", NOW)
    assert isinstance(parsed, Request)
    assert parsed.headers == {"Authorization": "Bearer u"} and parsed.refused_headers == ("host",)
    assert parsed.reply_to == "data-results" and parsed.token == "ab12" and parsed.attempts == 1
    assert "Bearer" not in repr(parsed) and "ab12" not in repr(parsed)
    assert messages.decode_state(messages.encode_state(parsed), "q") == parsed
    internal_wins = messages.parse_request(envelope(data(result_queue_name="data"), result_queue_name="internal"),
                                           "q", NOW)
    assert internal_wins.reply_to == "internal"
    plain = messages.parse_request(envelope(data(result_queue_name="ignored"), kind="plain"), "q", NOW)
    assert plain.reply_to is None


@pytest.mark.parametrize("fields,internal,reason", [
    ({"headers": ["a"]}, {}, "headers must be an object"),
    ({"headers": {"a": 1}}, {}, "headers must be an object"),
    ({"headers": {f"x-{i}": "v" for i in range(65)}}, {}, "headers: more than 64"),
    ({}, {"request_token": 5}, "internal.request_token"),
    ({}, {"result_queue_name": "asyncproc:cancelled"}, "asyncproc's own keys"),
    ({}, {"result_queue_name": "request-active:r1"}, "asyncproc's own keys"),
    ({}, {"result_queue_name": 7}, "result_queue_name must be"),
])
def test_bad_envelope_fields_get_an_invalid_request_result(fields, internal, reason):
    parsed = messages.parse_request(envelope(data(**fields), **{"request_token": "tok", **internal}), "q", NOW)
    assert isinstance(parsed, Rejected) and reason in parsed.reason and parsed.code == messages.INVALID
    result = orjson.loads(messages.encode_result(messages.rejected_result(parsed), "llm-d-async"))
    assert result["error_code"] == "INVALID_REQUEST" and result["id"] == "r1"


def test_payload_keys_are_refused_by_name():
    parsed = messages.parse_request(envelope({"id": "p", "deadline": NOW + 60}, payload_ref="request-payload:p:t"),
                                    "q", NOW)
    assert isinstance(parsed, Rejected) and "payload_ref" in parsed.reason


def test_result_queue_choice():
    assert llmd.result_queue("configured", "named") == "configured"
    assert llmd.result_queue(None, "named") == "named"
    assert llmd.result_queue(None, None) is None
