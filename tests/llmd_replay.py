"""llm-d-async's producer and consumer, replayed command for command in Python (written
from its Go source, `producer/redis_sortedset_producer.go` and `api/api.go`), so tests talk
to asyncproc exactly as llm-d-batch-gateway's async dispatch does.

Submit (v0.9.0): the tagged envelope with a fresh `request_token`, then DEL of
`request-cancel:<id>`, SET of `request-active:<id>` to the token with the time to the
deadline as TTL, ZADD of the envelope scored by the deadline. The newer producer does the
same in one script and adds `enqueue_seq` to the envelope and a fraction to the score:
`newest=True` writes that shape. Cancel: its Lua script (copy the active token to the
cancel key). Results: BRPOP of the result list, then what Go's json.Unmarshal into
api.ResultMessage accepts (anything else is an error, as there).
"""
from __future__ import annotations

import math
import secrets
import time
from typing import Dict, List, Optional

import orjson
import redis

CANCEL_TTL = 7 * 24 * 3600
MARK_CANCELLED = """
local active = redis.call("GET", KEYS[1])
if not active then
  return 0
end
redis.call("SET", KEYS[2], active, "EX", ARGV[1])
return 1
"""
GO_INT_MAX = 2 ** 63 - 1
FIELDS = ("id", "status_code", "payload", "error_code", "error_message", "request_token")


class GoUnmarshalError(ValueError):
    """What json.Unmarshal into api.ResultMessage (and the producer's parse) would return."""


def go_string(doc: dict, name: str) -> str:
    value = doc.get(name)
    if value is None:  # absent or null: the zero value
        return ""
    if not isinstance(value, str):
        raise GoUnmarshalError(f"json: cannot unmarshal {type(value).__name__} into Go struct field"
                               f" ResultMessage.{name} of type string")
    return value


def parse_result(raw: bytes) -> Dict:
    """api.ResultMessage from a result, as the Go consumer reads it: a JSON object whose
    id, payload, error_code, error_message (and the newer request_token) are strings or
    null, status_code an integer that fits an int; a result without an id is refused
    (`result missing 'id' field`). Unknown fields are ignored, as in Go."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise GoUnmarshalError(f"invalid character: {exc}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise GoUnmarshalError(f"json: cannot unmarshal {type(doc).__name__} into Go value of type ResultMessage")
    # Go matches field names case-insensitively; asyncproc must write them exactly, so a
    # differently spelled duplicate is a bug here, not a feature to rely on.
    spelled = [k for k in doc if k.lower() in FIELDS and k not in FIELDS]
    if spelled:
        raise GoUnmarshalError(f"field names not as api.ResultMessage spells them: {sorted(spelled)}")
    status = doc.get("status_code")
    if status is None:
        status = 0
    elif isinstance(status, bool) or not isinstance(status, (int, float)) or \
            (isinstance(status, float) and (not math.isfinite(status) or status != int(status))) or \
            abs(int(status)) > GO_INT_MAX:
        raise GoUnmarshalError(f"json: cannot unmarshal {status!r} into Go struct field ResultMessage.status_code"
                               " of type int")
    out = {"id": go_string(doc, "id"), "status_code": int(status), "payload": go_string(doc, "payload"),
           "error_code": go_string(doc, "error_code"), "error_message": go_string(doc, "error_message"),
           "request_token": go_string(doc, "request_token")}
    if out["id"] == "":
        raise GoUnmarshalError("result missing 'id' field")
    return out


class Producer:
    """RedisSortedSetProducer: submit, cancel, and the consumer's result loop."""

    def __init__(self, client: redis.Redis, request_queue: str = "request-sortedset",
                 result_queue: str = "result-list") -> None:
        self.client = client
        self.request_queue = request_queue
        self.result_queue = result_queue
        self.tokens: Dict[str, str] = {}
        self._cancel = client.register_script(MARK_CANCELLED)

    def submit(self, request: dict, kind: str = "plain", result_queue: Optional[str] = None,
               newest: bool = False) -> str:
        """SubmitRequest: `request` is a RequestMessage (a RedisRequest's fields too with
        kind "redis"; its own result_queue_name then overrides the producer's)."""
        rid, deadline = request["id"], int(request["deadline"])
        ttl_ms = int((deadline - time.time()) * 1000)
        if ttl_ms <= 0:
            raise ValueError("deadline has already expired")
        token = secrets.token_hex(16)
        self.tokens[rid] = token
        internal = {"request_queue_name": self.request_queue,
                    "result_queue_name": (request.get("result_queue_name") if kind == "redis" else None)
                    or result_queue or self.result_queue,
                    "request_token": token}
        score: float = deadline
        if newest:
            seq = self.client.incr(f"request-seq:{self.request_queue}:{deadline}")
            internal["enqueue_seq"] = seq
            score = deadline + min(seq, 2097151) / 2097152
        member = orjson.dumps({"internal": internal, "request_kind": kind, "data": request})
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(f"request-cancel:{rid}")
        pipe.set(f"request-active:{rid}", token, px=max(ttl_ms, 1))
        pipe.zadd(self.request_queue, {member: score})
        pipe.execute()
        return token

    def cancel(self, ids: List[str], cluster: bool = False) -> None:
        """CancelRequests: one script call per id; on a cluster (the newer producer's
        single-key writes, the two markers being in different slots) GET then SET."""
        for rid in ids:
            if not rid:
                continue
            if cluster:
                active = self.client.get(f"request-active:{rid}")
                if active is not None:
                    self.client.set(f"request-cancel:{rid}", active, ex=CANCEL_TTL)
            else:
                self._cancel(keys=[f"request-active:{rid}", f"request-cancel:{rid}"], args=[CANCEL_TTL])

    def get_result(self, timeout: float = 30.0, queue: Optional[str] = None) -> Dict:
        """GetResult: BRPOP with one-second waits until a result arrives, then the parse."""
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            popped = self.client.brpop([queue or self.result_queue], timeout=1)
            if popped is not None:
                return parse_result(popped[1])
        raise TimeoutError(f"no result in {queue or self.result_queue} within {timeout}s")

    def get_results(self, count: int, timeout: float = 60.0, queue: Optional[str] = None) -> List[Dict]:
        give_up = time.monotonic() + timeout
        return [self.get_result(max(give_up - time.monotonic(), 0.1), queue) for _ in range(count)]


def message(rid: str, payload: Optional[dict] = None, deadline_in: float = 600, **fields) -> dict:
    """A RequestMessage as Go marshals it (created and deadline integer seconds)."""
    now = int(time.time())
    out = {"id": rid, "created": now, "deadline": now + int(deadline_in),
           "payload": payload if payload is not None else {"model": "m", "prompt": f"p-{rid}"}}
    out.update(fields)
    return out
