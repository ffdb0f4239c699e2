"""Adaptive concurrency (AIMD): one limit on everything in flight, learnt from the gateway's
answers (README: adaptive concurrency). Pure: outcomes and the clock are passed in."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional


@dataclass(frozen=True)
class Policy:
    """Additive increase on successes, multiplicative decrease on an overload answer (429
    shed, 503 unavailable) or a slow one, between `floor` and `ceiling`. Until the first
    decrease the limit grows by one per success (slow start: doubling per round trip);
    after, by one per round trip, and `probe` times slower within one request of where
    the gateway was last overloaded (as CUBIC lingers near its last maximum), so a steady
    gateway is rarely overloaded. "Shed" means 429 alone, as in outcomes and metrics."""

    floor: float
    ceiling: float
    decrease: float = 0.8
    latency_target: float = 0.0     # seconds; 0: latency is not a signal
    probe: float = 8.0


@dataclass(frozen=True)
class State:
    limit: float
    slow_start: bool = True
    decreased_at: float = field(default=float("-inf"))
    overloaded_at: float = 0.0      # the limit when the gateway last said "too much"

    @property
    def in_flight(self) -> int:
        return int(self.limit)


#: What says "too much now": 429 (the gateway shed the request) and 503 (unavailable).
OVERLOAD_STATUSES = (429, 503)


def start(policy: Policy) -> State:
    return State(float(policy.floor))


def adapt(state: State, policy: Policy, status: Optional[int], ok: bool, elapsed: float,
          dispatched_at: float, now: float) -> State:
    """The limit after one outcome. A signal about a request dispatched before the last
    decrease says nothing new (it was sent under the old limit), so it does not decrease again."""
    overloaded = status in OVERLOAD_STATUSES
    slow = ok and policy.latency_target > 0 and elapsed > policy.latency_target
    if overloaded or slow:
        if dispatched_at <= state.decreased_at:
            return state
        return State(max(policy.floor, state.limit * policy.decrease), False, now, state.limit)
    if not ok:
        return state  # other failures say nothing about capacity
    step = 1.0 if state.slow_start else 1.0 / max(state.limit, 1.0)
    if not state.slow_start and abs(state.limit - state.overloaded_at) < 1.0:
        step /= policy.probe
    return replace(state, limit=min(policy.ceiling, state.limit + step))
