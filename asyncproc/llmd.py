"""llm-d-async's wire rules, as pure functions: which per-request headers go to the gateway
and in what order, the fairness header, where a result goes, and its error codes.

llm-d-async (`api/api.go`, the sorted-set flow and its merge policies) is the contract:
the queue's own headers first, then the request's (they may override the objective),
then `x-llm-d-inference-fairness-id` from the metadata key `userid`, replacing whatever
spelling the caller used. Everything here is outside input: bounded, type-checked, and a
header that must not cross a hop (hop-by-hop, `Host`, `Content-Length`) or that is not a
valid header is refused, never sent, and reported so it can be counted. No I/O.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

FAIRNESS_HEADER = "x-llm-d-inference-fairness-id"
FAIRNESS_METADATA_KEY = "userid"

# Result error codes (api.ErrCode*): results without an HTTP answer carry one of these.
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
CANCELLED = "CANCELLED"
GATE_DROPPED = "GATE_DROPPED"
GATE_ERROR = "GATE_ERROR"
INFERENCE_ERROR = "INFERENCE_ERROR"
INVALID_REQUEST = "INVALID_REQUEST"
ERROR_CODES = frozenset({DEADLINE_EXCEEDED, CANCELLED, GATE_DROPPED, GATE_ERROR, INFERENCE_ERROR,
                         INVALID_REQUEST, "PAYLOAD_UNAVAILABLE"})

#: Redis keys of llm-d-async's cancellation protocol (api.RequestCancellationKey, ...).
CANCEL_KEY_PREFIX = "request-cancel:"
ACTIVE_KEY_PREFIX = "request-active:"

#: Bounds on a request's own headers: more is not a header set, it is an attack.
MAX_HEADERS = 64
MAX_HEADER_NAME = 256
MAX_HEADER_VALUE = 8192
MAX_HEADERS_BYTES = 64 * 1024
#: A request token is llm-d-async's 32 hex characters; anything up to this is accepted.
MAX_TOKEN_CHARS = 256
MAX_QUEUE_NAME_CHARS = 512

#: Headers that describe one connection (RFC 9110 §7.6.1) or the message framing: the
#: HTTP client sets these itself; a producer's value would smuggle or break the request.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"})
REFUSED_REASONS = ("hop-by-hop", "host", "content-length", "invalid")
_TOKEN = re.compile(r"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


def cancel_key(request_id: str) -> str:
    return CANCEL_KEY_PREFIX + request_id


def active_key(request_id: str) -> str:
    return ACTIVE_KEY_PREFIX + request_id


def valid_header_value(value: Any) -> bool:
    """Visible ASCII, space, tab or obs-text (what http.client can send): no CR, LF, NUL."""
    return (isinstance(value, str) and len(value) <= MAX_HEADER_VALUE
            and all(c == "\t" or " " <= c <= "~" or "\x80" <= c <= "\xff" for c in value))


def refusal(name: str, value: Any) -> Optional[str]:
    """Why the request header `name: value` is not sent (one of REFUSED_REASONS), or None."""
    if not isinstance(name, str) or len(name) > MAX_HEADER_NAME or not _TOKEN.match(name):
        return "invalid"
    lower = name.lower()
    if lower in HOP_BY_HOP:
        return "hop-by-hop"
    if lower == "host":
        return "host"
    if lower == "content-length":
        return "content-length"
    if not valid_header_value(value):
        return "invalid"
    return None


def clean_headers(headers: Mapping[str, Any]) -> Tuple[Dict[str, str], Tuple[str, ...]]:
    """(the headers that may be sent, the reason for each one refused). The caller has
    checked the type and overall size (`headers_problem`)."""
    kept: Dict[str, str] = {}
    refused: List[str] = []
    for name, value in headers.items():
        reason = refusal(name, value)
        if reason is None:
            kept[name] = value
        else:
            refused.append(reason)
    return kept, tuple(refused)


def headers_problem(headers: Any) -> Optional[str]:
    """Why a request's `headers` field cannot be used at all (an error result), or None."""
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        return "headers must be an object of string values"
    if len(headers) > MAX_HEADERS:
        return f"headers: more than {MAX_HEADERS}"
    size = sum(len(k) + len(v) for k, v in headers.items())
    if size > MAX_HEADERS_BYTES:
        return f"headers: more than {MAX_HEADERS_BYTES} characters in all"
    return None


def merge_headers(route: Mapping[str, str], own: Optional[Mapping[str, str]],
                  metadata: Optional[Mapping[str, str]], fairness_header: str = FAIRNESS_HEADER,
                  fairness_key: str = FAIRNESS_METADATA_KEY) -> Dict[str, str]:
    """The headers of one gateway request: the route's (queue, objective, credentials),
    then the request's own (`own`, already cleaned; None when the queue does not send
    them), then the fairness header from `metadata[fairness_key]` (empty `fairness_header`:
    none). A later header replaces an earlier one whatever its spelling."""
    out = dict(route)
    if own:
        _put_all(out, own.items())
    if fairness_header and metadata:
        value = metadata.get(fairness_key)
        if value and valid_header_value(value):
            _put_all(out, ((fairness_header, value),))
    return out


def _put_all(into: Dict[str, str], items: Iterable[Tuple[str, str]]) -> None:
    lower = {k.lower(): k for k in into}
    for name, value in items:
        previous = lower.get(name.lower())
        if previous is not None:
            del into[previous]
        into[name] = value
        lower[name.lower()] = name


def token_problem(token: Any) -> Optional[str]:
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not token.isprintable():
        return f"internal.request_token must be a string of at most {MAX_TOKEN_CHARS} characters"
    return None


def queue_name_problem(name: Any, reserved_prefix: str, reserved: Iterable[str]) -> Optional[str]:
    """A result queue named by a message must be a plain name, and none of asyncproc's own
    keys or queues (results LPUSHed there would break them, or the writes of every result)."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_QUEUE_NAME_CHARS or not name.isprintable():
        return f"result_queue_name must be a string of 1 to {MAX_QUEUE_NAME_CHARS} characters"
    if (reserved_prefix and name.startswith(reserved_prefix + ":")) or name in reserved \
            or name.startswith((CANCEL_KEY_PREFIX, ACTIVE_KEY_PREFIX)):
        return "result_queue_name names one of asyncproc's own keys or queues"
    return None


def result_queue(configured: Optional[str], named: Optional[str]) -> Optional[str]:
    """Where a result goes, as llm-d-async decides: the queue's configured result queue,
    else the one the message names, else None (the transport's default)."""
    return configured or named or None


def error_code(ok: bool, status: Optional[int], body: Optional[bytes], error: Optional[str],
               code: Optional[str]) -> Optional[str]:
    """None for an HTTP answer (written as its status and raw body); otherwise the
    llm-d-async error code: `code` when the one who ended the request named it, else
    by its reason (a deadline, or a failure to get an answer at all)."""
    if ok or (status and body is not None):
        return None
    if code in ERROR_CODES:
        return code
    if (error or "").startswith("deadline exceeded"):
        return DEADLINE_EXCEEDED
    return INFERENCE_ERROR
