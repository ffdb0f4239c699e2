"""The replayed consumer's parse refuses what Go's json.Unmarshal into api.ResultMessage
(and the producer's id check) would refuse, and accepts what it accepts."""
import pytest

from tests.llmd_replay import GoUnmarshalError, parse_result


@pytest.mark.parametrize("raw", [
    b'{"id": 5, "payload": ""}', b'{"id": "a", "status_code": "200"}', b'{"id": "a", "status_code": 200.5}',
    b'{"id": "a", "status_code": true}', b'{"id": "a", "payload": {"x": 1}}', b'{"id": "a", "error_code": 400}',
    b'["a"]', b'"a"', b"not json", b'{"payload": "x"}', b'{"id": ""}', b'{"id": "a", "request_token": 1}',
    b'{"id": "a", "status_code": 1e30}'
])
def test_what_go_refuses(raw):
    with pytest.raises(GoUnmarshalError):
        parse_result(raw)


def test_what_go_accepts():
    assert parse_result(b'{"id": "a", "status_code": 200, "payload": "{}", "extra": [1]}') == {
        "id": "a", "status_code": 200, "payload": "{}", "error_code": "", "error_message": "", "request_token": ""}
    assert parse_result(b'{"id": "a", "payload": null, "error_code": "CANCELLED"}')["error_code"] == "CANCELLED"


def test_field_names_must_be_spelled_as_go_writes_them():
    """Go would match "ID" case-insensitively; asyncproc must not rely on it."""
    with pytest.raises(GoUnmarshalError):
        parse_result(b'{"ID": "a", "id": "a"}')
