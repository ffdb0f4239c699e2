"""JSONL in and out of batches: both input formats, both output formats, resume, bad lines."""
import argparse

import orjson
import pytest

from asyncproc import messages
from asyncproc.ledger import Ledger
from asyncproc.tools import batch

NOW = 1_800_000_000.0


@pytest.mark.parametrize("text, seconds", [("24h", 86400), ("30m", 1800), ("90s", 90), ("2d", 172800),
                                           ("45", 45), ("1.5h", 5400)])
def test_completion_window(text, seconds):
    assert batch.parse_window(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "0", "-1h", "1w", "tomorrow"])
def test_bad_completion_window(text):
    with pytest.raises(argparse.ArgumentTypeError):
        batch.parse_window(text)


def test_openai_line_becomes_a_request():
    line = orjson.dumps({"custom_id": "r-1", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}})
    request, fmt = batch.parse_line(line, NOW, 3600)
    assert fmt == "openai"
    assert request == {"id": "r-1", "deadline": NOW + 3600, "endpoint": "/v1/chat/completions",
                       "payload": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}


def test_own_format_keeps_its_fields_and_gets_a_deadline_when_it_has_none():
    request, fmt = batch.parse_line(b'{"id": 7, "payload": {"prompt": "x"}, "metadata": {"a": "b"}}', NOW, 60)
    assert fmt == "asyncproc" and request == {"id": 7, "payload": {"prompt": "x"}, "metadata": {"a": "b"},
                                              "deadline": NOW + 60}
    request, _ = batch.parse_line(b'{"id": "x", "deadline": "123", "payload": {}}', NOW, 60)
    assert request["deadline"] == "123"


@pytest.mark.parametrize("line, reason", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"payload": {}}', "needs an id"),
    (b'{"id": "", "payload": {}}', "needs an id"),
    (b'{"id": "a", "payload": []}', "payload must be a JSON object"),
    (b'{"id": "a", "payload": {}, "deadline": "soon"}', "deadline must be Unix seconds"),
    (b'{"id": "a", "payload": {}, "metadata": {"n": 1}}', "metadata must be an object of string values"),
    (b'{"id": "a", "payload": {}, "endpoint": "v1/x"}', "endpoint must be a path"),
    (b'{"custom_id": "", "url": "/v1/x", "body": {}}', "custom_id must be a non-empty string"),
    (b'{"custom_id": "c", "method": "GET", "url": "/v1/x", "body": {}}', "method must be POST"),
    (b'{"custom_id": "c", "url": "https://api/v1/x", "body": {}}', "url must be a path"),
    (b'{"custom_id": "c", "url": "/v1/x", "body": "hi"}', "body must be a JSON object"),
])
def test_bad_lines_say_why(line, reason):
    with pytest.raises(batch.InputError, match=reason):
        batch.parse_line(line, NOW, 60)


def test_read_input_numbers_bad_lines_and_repeated_ids(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x"}}\n'
                     b"\n"
                     b"garbage\n"
                     b'{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "y"}}\n'
                     b'{"id": "b", "payload": {"prompt": "z"}}\n')
    found = batch.read_input(str(path), NOW, 60)
    assert [r["id"] for r in found.requests] == ["a", "b"]
    assert found.formats == {"openai", "asyncproc"}
    assert [n for n, _ in found.errors] == [3, 4]
    assert "repeats line 1" in found.errors[1][1]


def test_read_output_cuts_a_torn_last_line_and_knows_both_formats(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "batch_req_1", "custom_id": "a", "response": null, "error": null}\n'
                     b'{"id": 5, "payload": {}}\n'
                     b'{"id": "c", "payl')
    assert batch.read_output(str(path)) == {'"a"', "5"}
    assert path.read_bytes().endswith(b'{"id": 5, "payload": {}}\n')
    assert batch.read_output(str(tmp_path / "missing.jsonl")) == set()


def tagged(result):
    return {**result, "metadata": {messages.BATCH_KEY: "b1", **result.get("metadata", {})}}


def test_openai_output_of_a_success_and_a_failure():
    ok = orjson.loads(batch.format_result(tagged({"id": "a", "payload": {"x": 1}, "attempts": 1,
                                                  "status_code": 200}), "openai"))
    assert ok["custom_id"] == "a" and ok["error"] is None and ok["id"].startswith("batch_req_")
    assert ok["response"]["status_code"] == 200 and ok["response"]["body"] == {"x": 1}
    assert ok["response"]["request_id"].startswith("req_")
    failed = orjson.loads(batch.format_result({"id": "b", "error": "cancelled", "attempts": 0}, "openai"))
    assert failed["response"] is None and failed["error"] == {"code": "cancelled", "message": "cancelled"}
    late = orjson.loads(batch.format_result(
        {"id": "c", "error": "deadline exceeded (last failure: HTTP 503)", "status_code": 503}, "openai"))
    assert late["error"]["code"] == "expired" and late["response"]["status_code"] == 503


def test_llm_d_async_results_convert_too():
    raw = {"id": "a", "status_code": 200, "payload": '{"x": 1}', "error_code": "", "error_message": ""}
    line = orjson.loads(batch.format_result(raw, "openai"))
    assert line["response"]["body"] == {"x": 1} and line["error"] is None
    raw = {"id": "b", "status_code": 400, "payload": "bad", "error_code": "400", "error_message": "HTTP 400"}
    assert orjson.loads(batch.format_result(raw, "openai"))["error"]["message"] == "HTTP 400"


def test_asyncproc_output_drops_only_the_batch_tag():
    assert orjson.loads(batch.format_result(tagged({"id": "a", "payload": {}}), "asyncproc")) == {"id": "a", "payload": {}}
    kept = orjson.loads(batch.format_result(tagged({"id": "a", "payload": {}, "metadata": {"k": "v"}}), "asyncproc"))
    assert kept["metadata"] == {"k": "v"}


def request(id_value, batch_id=None):
    metadata = {messages.BATCH_KEY: batch_id} if batch_id else None
    return messages.Request(id_value, NOW + 60, {}, "q", NOW, metadata=metadata)


def test_cancellations_cover_batches_and_ids():
    cancelled = messages.Cancellations(frozenset({"b1"}), frozenset({messages.id_key(7)}))
    assert cancelled.covers(request("x", "b1")) and cancelled.covers(request(7))
    assert not cancelled.covers(request("x", "b2")) and not cancelled.covers(request("7"))
    assert not messages.Cancellations().covers(request("x", "b1"))


def test_a_withdrawn_request_is_held_but_never_dispatched():
    ledger = Ledger()
    ledger.admit(request("a"))
    ledger.admit(request("b"))
    entry = ledger.withdraw('"a"')
    assert entry.request.id == "a" and ledger.holds('"a"')
    assert ledger.take("q").id == "b" and not ledger.waiting_by_queue["q"]
    ledger.assign('"b"', 0, NOW)
    assert ledger.withdraw('"b"') is None  # not waiting any more
