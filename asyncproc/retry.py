"""Back-off policies and the retry decision (README: Dispatch and retries). Pure: clock and random source passed in."""
from __future__ import annotations

import email.utils
import math
import random
from dataclasses import dataclass
from typing import Optional, Union

from asyncproc.messages import DEADLINE_EXCEEDED
from asyncproc.outcomes import Kind, Outcome

POLICIES = ("exponential", "fixed")
DEADLINE = DEADLINE_EXCEEDED  # the results metric's code, as for a message that arrives late
CANCELLED = "cancelled"


@dataclass(frozen=True)
class Backoff:
    """`exponential`: full jitter, uniform in [0, min(cap, base * 2**(n-1))]; `fixed`: base."""

    policy: str = "exponential"
    base: float = 1.0
    cap: float = 60.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        if self.policy == "fixed":
            return self.base
        ceiling = min(self.cap, self.base * (2 ** min(max(attempt - 1, 0), 62)))
        return rng.uniform(0.0, ceiling)


@dataclass  # RetryAt and Finish: one per attempt; not frozen, as messages.Request
class RetryAt:
    due: float


@dataclass
class Finish:
    """End the request: `ok` with the outcome's body, or an error with `reason`.

    `code` names the kind of ending for metrics: success, gateway_error,
    deadline_exceeded or max_attempts.
    """

    ok: bool
    reason: Optional[str] = None
    code: str = "success"


Decision = Union[RetryAt, Finish]


def parse_retry_after(value: Optional[str], now: float) -> Optional[float]:
    """Seconds to wait from a `Retry-After` header (delta seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()[:100]  # a gateway's header: anything may come
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            seconds = when.timestamp() - now if when is not None else None
        except (TypeError, ValueError, IndexError, OverflowError, OSError):
            return None
    if seconds is None or not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


def decide(
    outcome: Outcome,
    attempts: int,
    deadline: float,
    now: float,
    backoff: Backoff,
    rng: random.Random,
    max_attempts: int = 0,
    last_error: Optional[str] = None,
) -> Decision:
    """What follows an attempt. `attempts` counts the attempts made, this one included;
    `last_error` is the previous attempt's failure, reported when this one never started."""
    if outcome.kind is Kind.OK:
        return Finish(True)
    if outcome.kind is Kind.FATAL:
        return Finish(False, outcome.describe(), "gateway_error")
    if outcome.kind is Kind.EXPIRED:
        return Finish(False, deadline_exceeded(last_error), DEADLINE)
    if outcome.kind is Kind.CANCELLED:
        return Finish(False, "cancelled", CANCELLED)
    if now >= deadline:
        return Finish(False, deadline_exceeded(outcome.describe()), DEADLINE)
    if max_attempts and attempts >= max_attempts:
        return Finish(False, f"max attempts ({max_attempts}) reached (last failure: {outcome.describe()})",
                      "max_attempts")
    delay = backoff.delay(attempts, rng)
    asked = parse_retry_after(outcome.retry_after, now)
    if asked is not None:
        delay = max(delay, asked)
    due = now + delay
    if due >= deadline:
        return Finish(False, deadline_exceeded(outcome.describe()), DEADLINE)
    return RetryAt(due)


def deadline_exceeded(last_failure: Optional[str]) -> str:
    if not last_failure:
        return "deadline exceeded"
    return f"deadline exceeded (last failure: {last_failure})"
