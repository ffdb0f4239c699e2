"""What one dispatch attempt came to, and how an HTTP status is classified (README: Dispatch and retries).

Pure values: the worker builds an `Outcome`, sends it over its pipe, and the supervisor's
retry policy decides what to do with it.
"""
from __future__ import annotations

import enum
from typing import Dict, NamedTuple, Optional

from asyncproc import redact

#: Statuses that mean "try again later" besides 429 (shed).
RETRYABLE_STATUSES = frozenset({408, 425, 500, 502, 503, 504})
SHED_STATUS = 429
BODY_EXCERPT_CHARS = 200
#: --max-response-bytes' default: a larger gateway response is an error result.
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class Kind(str, enum.Enum):
    OK = "ok"          # 2xx: the body is the result
    SHED = "shed"      # 429: the gateway has no room now; retry
    RETRY = "retry"    # transient failure: status above, connection error, timeout
    FATAL = "fatal"    # the request itself is wrong: no retry
    EXPIRED = "expired"  # the deadline passed before the attempt could start
    CANCELLED = "cancelled"  # the request was cancelled: its attempt aborted or never started


class Outcome(NamedTuple):
    """A tuple, because thousands a second cross a pipe (pickling a tuple is cheapest)."""

    kind: Kind
    status: Optional[int] = None
    body: Optional[bytes] = None
    error: Optional[str] = None
    retry_after: Optional[str] = None
    elapsed: float = 0.0

    def describe(self) -> str:
        """A short reason for logs and error results."""
        if self.error:
            return self.error
        if self.status is not None:
            return f"HTTP {self.status}"
        return self.kind.value


def classify(status: int) -> Kind:
    if 200 <= status < 300:
        return Kind.OK
    if status == SHED_STATUS:
        return Kind.SHED
    if status in RETRYABLE_STATUSES:
        return Kind.RETRY
    return Kind.FATAL


def from_response(status: int, body: bytes, retry_after: Optional[str], elapsed: float) -> Outcome:
    kind = classify(status)
    error = None
    if kind is Kind.FATAL:
        # Outside text: bounded, control characters escaped (it goes into results and logs).
        excerpt = redact.excerpt(body or b"", BODY_EXCERPT_CHARS)
        error = f"gateway returned HTTP {status}: {excerpt}".rstrip(": ")
    elif kind is not Kind.OK:
        error = f"HTTP {status}"
    return Outcome(kind, status, body, error, retry_after, elapsed)


def connection_failure(reason: str, elapsed: float) -> Outcome:
    """Connection errors and timeouts are retried (README: Dispatch and retries)."""
    return Outcome(Kind.RETRY, None, None, reason, None, elapsed)


def too_large(status: Optional[int], limit: int, elapsed: float) -> Outcome:
    """A response over --max-response-bytes: final (the same request would get it again)."""
    return Outcome(Kind.FATAL, status, None, f"response too large (over {limit} bytes)", None, elapsed)


def expired() -> Outcome:
    return Outcome(Kind.EXPIRED, error="deadline exceeded before dispatch")


def cancelled(elapsed: float = 0.0) -> Outcome:
    return Outcome(Kind.CANCELLED, error="cancelled", elapsed=elapsed)


#: Across the pipe an Outcome travels as a plain tuple, its kind as its value (`to_wire`),
#: and an Assignment as `tuple(assignment)`: pickling a NamedTuple or an Enum member calls
#: back into Python for each one, and thousands a second cross.
KINDS = {kind.value: kind for kind in Kind}


def to_wire(outcome: Outcome) -> tuple:
    return (outcome.kind.value, outcome.status, outcome.body, outcome.error, outcome.retry_after, outcome.elapsed)


def from_wire(wire: tuple) -> Outcome:
    return Outcome(KINDS[wire[0]], wire[1], wire[2], wire[3], wire[4], wire[5])


class Assignment(NamedTuple):
    """One attempt handed to a worker: everything it needs, nothing it must look up."""

    key: str
    origin: str          # scheme://host:port of the gateway
    path: str
    body: bytes
    headers: Dict[str, str]
    deadline: float
    connect_timeout: float
    request_timeout: float
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
