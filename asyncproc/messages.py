"""Request and result values, and the rules that turn raw queue bytes into them.

Pure: no I/O, the clock is passed in. Everything a queue hands us ends as exactly one of
`Request` (dispatch it), `Rejected` (it has an id: answer with an error result) or
`DeadLetter` (no usable id: nothing can be mapped back, keep the raw bytes for a human).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, FrozenSet, Mapping, Optional, Tuple, Union

import orjson

from asyncproc import llmd

#: How much of a message we keep in a dead-letter entry or an error excerpt.
RAW_EXCERPT_BYTES = 4096

#: Path chosen from the payload's shape when nothing else names one (README: Dispatch and retries).
PATH_BY_PAYLOAD_KEY = (
    ("messages", "/v1/chat/completions"),
    ("prompt", "/v1/completions"),
    ("input", "/v1/embeddings"),
)
FALLBACK_PATH = "/v1/completions"

RESULT_FORMATS = ("seed", "llm-d-async")

#: Bounds on what a producer may send; every field that crosses the boundary is checked.
MAX_ID_CHARS = 512
MIN_INT_ID, MAX_INT_ID = -(2 ** 63), 2 ** 63 - 1
MAX_RETRY_COUNT = 1_000_000
DEFAULT_HORIZON = 31 * 86400.0
#: The OpenAI-compatible paths asyncproc is for; a message may name only these (README: Bad input).
DEFAULT_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses",
                     "/v1/rerank", "/v1/score")
#: An oversized message is not parsed; its id is read only from its head, as producers write it.
_HEAD_ID = re.compile(rb'\A\s*\{\s*"id"\s*:\s*("(?:[^"\\\x00-\x1f]|\\.){1,%d}"|-?[0-9]{1,19})\s*[,}]'
                      % MAX_ID_CHARS)

#: The metadata key `asyncproc submit` tags each request with; results echo metadata, so
#: a batch's results can be told apart, and `asyncproc cancel --batch` can name them.
BATCH_KEY = "asyncproc.batch"
CANCELLED = "cancelled"
#: Why a message is rejected, as a code (the results metric's label), beside its reason text.
INVALID = "invalid"
DEADLINE_EXCEEDED = "deadline_exceeded"


@dataclass(frozen=True)
class Endpoints:
    """Which paths a message's `endpoint` may name: exact paths, and `<prefix>/*` for any
    path below a prefix. Never `..`, `.`, empty segments, a query, a fragment or an escape."""

    exact: FrozenSet[str] = frozenset(DEFAULT_ENDPOINTS)
    prefixes: FrozenSet[str] = frozenset()

    @classmethod
    def parse(cls, entries) -> "Endpoints":
        """From a list (or comma-separated string) of paths; ValueError names a bad entry."""
        if isinstance(entries, str):
            entries = [e.strip() for e in entries.split(",") if e.strip()]
        exact, prefixes = set(), set()
        for entry in entries:
            if not isinstance(entry, str):
                raise ValueError(f"not a path: {entry!r}")
            if entry.endswith("/*"):
                if not _safe_path(entry[:-2] + "/x"):
                    raise ValueError(f"not a clean path prefix: {entry!r}")
                prefixes.add(entry[:-1])
            elif _safe_path(entry):
                exact.add(entry)
            else:
                raise ValueError(f"not a clean path: {entry!r}")
        return cls(frozenset(exact), frozenset(prefixes))

    def allows(self, path: str) -> bool:
        if path in self.exact:
            return True
        return bool(self.prefixes) and _safe_path(path) and any(path.startswith(p) for p in self.prefixes)


def _safe_path(path: str) -> bool:
    if not path.startswith("/") or len(path) > 1024 or not path.isprintable():
        return False
    if any(c in path for c in " ?#%\\"):
        return False
    segments = path[1:].split("/")
    return all(seg not in ("", ".", "..") for seg in segments)


@dataclass(frozen=True)
class Limits:
    """What parse_request enforces: size, how far ahead a deadline may be, which endpoints
    (by queue; a queue without its own list gets `endpoints`)."""

    max_bytes: int = 1 << 20
    max_horizon: float = DEFAULT_HORIZON
    endpoints: Endpoints = Endpoints()
    by_queue: Mapping[str, Endpoints] = field(default_factory=dict)
    #: A result queue a message names may not be one of these keys nor start with `prefix:`.
    reserved_prefix: str = "asyncproc"
    reserved_keys: FrozenSet[str] = frozenset()

    def endpoints_of(self, queue: str) -> Endpoints:
        return self.by_queue.get(queue, self.endpoints)


@dataclass  # not frozen: several are made per message, and a frozen one costs 6x to make
class Request:
    """A valid request plus the retry state that travels with it (survives restarts).
    Never changed once made (`after_attempt`, `dataclasses.replace` make another)."""

    id: Union[str, int]
    deadline: float
    payload: dict
    queue: str
    received_at: float
    endpoint: Optional[str] = None
    metadata: Optional[dict] = None
    created: Optional[float] = None
    attempts: int = 0
    last_error: Optional[str] = None
    #: The request's own HTTP headers (llm-d-async's `headers`), refused ones taken out.
    headers: Optional[dict] = field(default=None, repr=False)
    #: llm-d-async's envelope: the result queue it names, and this generation's token
    #: (`request-cancel:<id>` holding it cancels the request).
    reply_to: Optional[str] = None
    token: Optional[str] = field(default=None, repr=False)
    #: Why each refused header was refused (counted once, at intake; not kept for retries).
    refused_headers: Tuple[str, ...] = field(default=(), compare=False, repr=False)

    @cached_property
    def key(self) -> str:
        return id_key(self.id)

    def after_attempt(self, error: Optional[str]) -> "Request":
        # positional, not dataclasses.replace: this runs once per attempt, in the loop
        after = Request(self.id, self.deadline, self.payload, self.queue, self.received_at, self.endpoint,
                        self.metadata, self.created, self.attempts + 1, error, self.headers, self.reply_to,
                        self.token, self.refused_headers)
        if "key" in self.__dict__:  # the same id: its key as made already
            after.__dict__["key"] = self.__dict__["key"]
        return after


@dataclass(frozen=True)
class Rejected:
    """A message with a usable id that cannot be dispatched: it gets an error result."""

    id: Union[str, int]
    queue: str
    reason: str
    metadata: Optional[dict] = None
    attempts: int = 0
    code: str = INVALID      # INVALID or DEADLINE_EXCEEDED
    reply_to: Optional[str] = None
    token: Optional[str] = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return id_key(self.id)


@dataclass
class Unparsed:
    """A plain message (`plain_id`) that arrived with no room to hold it: claimed by its
    id and staged as it came, it is parsed once, when it is taken back."""

    id: Union[str, int]
    queue: str
    received_at: float

    @property
    def key(self) -> str:
        return id_key(self.id)


#: The fields of a plain message: no llm-d-async envelope, no headers of its own.
PLAIN_FIELDS = frozenset({"id", "deadline", "payload", "metadata", "created", "endpoint"})


def plain_id(raw: bytes, max_bytes: int) -> Optional[Union[str, int]]:
    """The usable id of a JSON object of at most `max_bytes` with only PLAIN_FIELDS, else
    None (it is parsed in full: parse_request). Never raises."""
    if not isinstance(raw, bytes) or len(raw) > max_bytes:
        return None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not obj.keys() <= PLAIN_FIELDS:
        return None
    id_value = obj.get("id")
    return id_value if usable_id(id_value) else None


@dataclass(frozen=True)
class DeadLetter:
    """A message nothing can be mapped back to: kept raw (truncated) with why and where."""

    raw: bytes
    reason: str
    queue: str
    received_at: float = 0.0


@dataclass  # not frozen, as Request
class Result:
    """The one answer a request gets. `body` is the gateway's raw response body, if any.
    Never changed once made."""

    id: Union[str, int]
    queue: str
    ok: bool
    error: Optional[str] = None
    status_code: Optional[int] = None
    body: Optional[bytes] = None
    attempts: int = 0
    metadata: Optional[dict] = None
    extra: dict = field(default_factory=dict)
    #: llm-d-async's error code when the one ending the request knows it (llmd.ERROR_CODES).
    code: Optional[str] = None
    #: Where the request asked its result to go, and its generation token (llm-d-async).
    reply_to: Optional[str] = None
    token: Optional[str] = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return id_key(self.id)


@dataclass(frozen=True)
class Cancellations:
    """What `asyncproc cancel` named: batches (by their tag) and single ids (by key)."""

    batches: frozenset = frozenset()
    ids: frozenset = frozenset()

    def covers(self, request: Request) -> bool:
        if request.key in self.ids:
            return True
        return bool(self.batches and request.metadata) and request.metadata.get(BATCH_KEY) in self.batches


def cancelled_result(request: Request) -> Result:
    return result_of(request, False, CANCELLED, code=llmd.CANCELLED)


def result_of(request: Union[Request, "Rejected"], ok: bool, error: Optional[str] = None, *,
              status_code: Optional[int] = None, body: Optional[bytes] = None, attempts: Optional[int] = None,
              code: Optional[str] = None) -> Result:
    """A result for `request`, carrying what routes it (llm-d-async's result queue, token)."""
    return Result(request.id, request.queue, ok, error, status_code, body,
                  request.attempts if attempts is None else attempts, request.metadata, {}, code,
                  request.reply_to, request.token)


def id_key(id_value: Union[str, int]) -> str:
    """A ledger key that keeps `1` and `"1"` apart, as the producer did."""
    return orjson.dumps(id_value).decode()


def usable_id(value: Any) -> bool:
    """A non-empty string of at most MAX_ID_CHARS, or a 64-bit signed integer."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return MIN_INT_ID <= value <= MAX_INT_ID
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS


def parse_deadline(value: Any) -> Optional[float]:
    """Unix seconds as int, float or numeric string; None when it is none of these."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def unwrap_envelope(obj: dict) -> tuple[dict, Optional[int]]:
    """Accept llm-d-async's `{"request_kind", "data": {...}}` envelope beside the bare form.

    Returns the request object and the attempts already made (`internal.retry_count`);
    None when the count is there but not an integer within 0..MAX_RETRY_COUNT.
    """
    if "request_kind" in obj and isinstance(obj.get("data"), dict):
        internal = obj.get("internal")
        if internal is None:
            return obj["data"], 0
        if not isinstance(internal, dict):
            return obj["data"], None
        retries = internal.get("retry_count", 0)
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRY_COUNT:
            return obj["data"], None
        return obj["data"], retries
    return obj, 0


def envelope_routing(envelope: dict, data: dict, limits: "Limits") -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(result queue name, request token, problem) from llm-d-async's envelope: the
    routing its producer resolved (`internal.result_queue_name`, `internal.request_token`),
    else a `"redis"` request's own `result_queue_name`. A bad field is the problem; the
    good ones still route the error result."""
    if envelope is data:
        return None, None, None
    internal = envelope.get("internal")
    internal = internal if isinstance(internal, dict) else {}
    problem = None
    token = internal.get("request_token")
    if token is not None:
        problem = llmd.token_problem(token)
        token = None if problem or not token else token
    reply_to = internal.get("result_queue_name")
    if not reply_to and envelope.get("request_kind") == "redis":
        reply_to = data.get("result_queue_name")
    if reply_to is not None and reply_to != "":
        bad = llmd.queue_name_problem(reply_to, limits.reserved_prefix, limits.reserved_keys)
        if bad:
            problem, reply_to = problem or bad, None
    return reply_to or None, token, problem


def _oversized(raw: bytes, queue: str, now: float, limit: int) -> Union[Rejected, DeadLetter]:
    """Too large to parse: an error result if the id opens the message, else a dead letter."""
    reason = f"message too large: {len(raw)} bytes, limit {limit}"
    match = _HEAD_ID.match(raw[:MAX_ID_CHARS * 6 + 64])
    if match:
        try:
            id_value = orjson.loads(match.group(1))
        except orjson.JSONDecodeError:
            id_value = None
        if usable_id(id_value):
            return Rejected(id_value, queue, reason)
    return DeadLetter(raw[:RAW_EXCERPT_BYTES], reason, queue, now)


def parse_request(
    raw: bytes, queue: str, now: float, limits: Limits = Limits()
) -> Union[Request, Rejected, DeadLetter]:
    """Validate one raw message (README: Message formats, Bad input). Never raises."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raw = str(raw).encode("utf-8", "replace")
    max_bytes = limits.max_bytes
    if len(raw) > max_bytes:
        return _oversized(bytes(raw), queue, now, max_bytes)
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return DeadLetter(raw[:RAW_EXCERPT_BYTES], "not valid JSON", queue, now)
    if not isinstance(obj, dict):
        return DeadLetter(raw[:RAW_EXCERPT_BYTES], "not a JSON object", queue, now)
    envelope = obj
    obj, attempts = unwrap_envelope(obj)
    if "id" not in obj:
        return DeadLetter(raw[:RAW_EXCERPT_BYTES], "id missing", queue, now)
    id_value = obj["id"]
    if not usable_id(id_value):
        return DeadLetter(
            raw[:RAW_EXCERPT_BYTES],
            f"id must be a non-empty string (at most {MAX_ID_CHARS} characters) or a 64-bit integer",
            queue, now,
        )

    metadata = obj.get("metadata")
    good_metadata = metadata if _is_metadata(metadata) else None
    reply_to, token, routing_problem = envelope_routing(envelope, obj, limits)

    def reject(reason: str, code: str = INVALID) -> Rejected:
        return Rejected(id_value, queue, reason, good_metadata, attempts or 0, code, reply_to, token)

    if attempts is None:
        return reject(f"internal.retry_count must be an integer from 0 to {MAX_RETRY_COUNT}")
    if routing_problem:
        return reject(routing_problem)
    if "deadline" not in obj:
        return reject("deadline missing")
    deadline = parse_deadline(obj["deadline"])
    if deadline is None:
        return reject("deadline must be Unix seconds (integer, float or numeric string)")
    payload = obj.get("payload")
    if payload is None:
        if isinstance(envelope.get("internal"), dict) and envelope["internal"].get("payload_ref"):
            return reject("payload missing (llm-d-async's separate payload keys, internal.payload_ref,"
                          " are not supported: submit without WithPayloadKeys)")
        return reject("payload missing")
    if not isinstance(payload, dict):
        return reject("payload must be a JSON object")
    if metadata is not None and good_metadata is None:
        return reject("metadata must be an object of string values")
    headers, refused = obj.get("headers"), ()
    if headers is not None:
        problem = llmd.headers_problem(headers)
        if problem:
            return reject(problem)
        headers, refused = llmd.clean_headers(headers)
    endpoint = obj.get("endpoint")
    if endpoint is not None and not (isinstance(endpoint, str) and endpoint.startswith("/")):
        return reject("endpoint must be a path starting with '/'")
    if endpoint is not None and not limits.endpoints_of(queue).allows(endpoint):
        return reject("endpoint not allowed (see --allowed-endpoints)")
    created = obj.get("created")
    created_at = parse_deadline(created) if created is not None else None
    if created is not None and created_at is None:
        return reject("created must be Unix seconds")
    if deadline <= now:
        return reject("deadline exceeded", DEADLINE_EXCEEDED)
    if deadline > now + limits.max_horizon:
        return reject(f"deadline too far ahead: more than {limits.max_horizon:.0f} s from now"
                      " (--max-deadline-horizon)")
    # positional: this runs once per message (Request's fields, in order)
    return Request(id_value, deadline, payload, queue, now, endpoint, good_metadata, created_at, attempts, None,
                   headers or None, reply_to, token, refused)


def _is_metadata(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def _optional_number(value: Any) -> Optional[float]:
    if value is None:
        return None
    number = parse_deadline(value)
    if number is None:
        raise ValueError("not a number")
    return number


def request_path(request: Request, queue_path: Optional[str], gateway_path: Optional[str]) -> str:
    """README, Dispatch and retries: message endpoint, queue path, gateway URL path, else the payload's shape."""
    for candidate in (request.endpoint, queue_path, gateway_path):
        if candidate:
            return candidate
    for key, path in PATH_BY_PAYLOAD_KEY:
        if key in request.payload:
            return path
    return FALLBACK_PATH


# -- retry-set entries: the whole request state, so a restart loses nothing ------------

def encode_state(request: Request) -> bytes:
    state = {
        "v": 1,
        "id": request.id,
        "deadline": request.deadline,
        "payload": request.payload,
        "queue": request.queue,
        "received_at": request.received_at,
        "endpoint": request.endpoint,
        "metadata": request.metadata,
        "created": request.created,
        "attempts": request.attempts,
        "last_error": request.last_error,
    }
    if request.headers is not None or request.reply_to is not None or request.token is not None:
        state.update(headers=request.headers, reply_to=request.reply_to, token=request.token)  # llm-d-async's
    return orjson.dumps(state)


def decode_state(raw: bytes, queue: str) -> Union[Request, DeadLetter]:
    """Read back a retry-set entry; anything unreadable or out of range becomes a dead
    letter, not a crash (the retry set is in Redis: trust it no more than a message)."""
    try:
        obj = orjson.loads(raw)
        attempts = obj.get("attempts", 0)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 0 <= attempts <= MAX_RETRY_COUNT:
            raise ValueError("attempts")
        for name in ("queue", "endpoint", "last_error"):
            if obj.get(name) is not None and not isinstance(obj[name], str):
                raise ValueError(name)
        metadata = obj.get("metadata")
        if metadata is not None and not _is_metadata(metadata):
            raise ValueError("metadata")
        headers, reply_to, token = obj.get("headers"), obj.get("reply_to"), obj.get("token")
        if headers is not None or reply_to is not None or token is not None:  # llm-d-async's fields
            if not isinstance(reply_to or "", str) or not isinstance(token or "", str):
                raise ValueError("routing")
            if headers is not None and (llmd.headers_problem(headers) or llmd.clean_headers(headers)[1]):
                raise ValueError("headers")
        deadline, received_at = parse_deadline(obj["deadline"]), parse_deadline(obj["received_at"])
        if deadline is None or received_at is None:
            raise ValueError("times")
        request = Request(
            id=obj["id"],
            deadline=deadline,
            payload=obj["payload"],
            queue=obj.get("queue") or queue,
            received_at=received_at,
            endpoint=obj.get("endpoint"),
            metadata=metadata,
            created=_optional_number(obj.get("created")),
            attempts=attempts,
            last_error=obj.get("last_error"),
            headers=headers or None,
            reply_to=reply_to or None,
            token=token or None,
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return DeadLetter(bytes(raw[:RAW_EXCERPT_BYTES]), "unreadable retry-set entry", queue)
    if not usable_id(request.id) or not isinstance(request.payload, dict):
        return DeadLetter(bytes(raw[:RAW_EXCERPT_BYTES]), "unreadable retry-set entry", queue)
    return request


# -- results --------------------------------------------------------------------------

def encode_result(result: Result, fmt: str = "seed") -> bytes:
    """The seed's shape (default) or llm-d-async's (README: Message formats). Never raises:
    a result that cannot be encoded becomes an error result saying so."""
    try:
        if fmt == "llm-d-async":
            return _encode_llmd_result(result)
        return _encode_seed_result(result)
    except (TypeError, ValueError, orjson.JSONEncodeError) as exc:
        fallback = Result(result.id if usable_id(result.id) else str(result.id)[:MAX_ID_CHARS], result.queue,
                          False, f"internal error: result not encodable ({type(exc).__name__})")
        if fmt == "llm-d-async":
            return _encode_llmd_result(fallback)
        return _encode_seed_result(fallback)


def _encode_seed_result(result: Result) -> bytes:
    out: dict[str, Any] = {"id": result.id}
    if result.ok:
        out["payload"] = _body_value(result.body)
    else:
        out["error"] = result.error
    out["attempts"] = result.attempts
    if result.status_code is not None:
        out["status_code"] = result.status_code
    if result.metadata is not None:
        out["metadata"] = result.metadata
    out.update(result.extra)
    return orjson.dumps(out)


def _body_value(body: Optional[bytes]) -> Any:
    """The gateway's JSON response as an object; a non-JSON body as a string."""
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")


def _encode_llmd_result(result: Result) -> bytes:
    """Exactly llm-d-async's api.ResultMessage (its `request_token` too, as its newer
    processor writes it): an HTTP answer, 2xx or not, is its status and raw body; any
    other ending an error code and `{"error": "<message>"}` as the payload. The id is a
    string, as Go's json.Unmarshal into ResultMessage requires."""
    out: dict[str, Any] = {"id": result.id if isinstance(result.id, str) else str(result.id)}
    code = llmd.error_code(result.ok, result.status_code, result.body, result.error, result.code)
    if code is None:
        if result.status_code:
            out["status_code"] = result.status_code
        out["payload"] = (result.body or b"").decode("utf-8", "replace")
    else:
        message = result.error or code.lower()
        out["payload"] = orjson.dumps({"error": message}).decode()
        out["error_code"] = code
        out["error_message"] = message
    if result.token:
        out["request_token"] = result.token
    return orjson.dumps(out)


def encode_dead_letter(letter: DeadLetter) -> bytes:
    return orjson.dumps(
        {
            "raw": letter.raw.decode("utf-8", "replace"),
            "reason": letter.reason,
            "queue": letter.queue,
            "received_at": letter.received_at,
        }
    )


def rejected_result(rejected: Rejected) -> Result:
    code = llmd.DEADLINE_EXCEEDED if rejected.code == DEADLINE_EXCEEDED else llmd.INVALID_REQUEST
    return result_of(rejected, False, rejected.reason, code=code)
