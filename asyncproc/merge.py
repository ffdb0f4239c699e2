"""Request merge policies: which queue's message goes next (README: Merge policies and per-queue limits). Pure.

A policy is called with the queues that have a request waiting *and* room to dispatch it
(gates and in-flight limits are applied before), the random source and the clock.
"""
from __future__ import annotations

import random
from typing import Callable, Dict, Mapping, Optional, Sized

POLICIES = ("random-robin", "priority", "weighted")

Pick = Callable[..., Optional[str]]


def random_robin(pending: Mapping[str, Sized], rng: random.Random, now: float = 0.0) -> Optional[str]:
    """The seed's policy: a uniformly random queue among those with messages waiting."""
    candidates = [name for name, waiting in pending.items() if len(waiting)]
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    return rng.choice(candidates)


class Weighted:
    """Each dispatch goes to a queue with messages waiting with probability proportional to
    its weight, so shares follow the weights while all queues are busy."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        self.weights = dict(weights)

    def __call__(self, pending: Mapping[str, Sized], rng: random.Random, now: float = 0.0) -> Optional[str]:
        candidates = [name for name, waiting in pending.items() if len(waiting)]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        return rng.choices(candidates, [self.weights.get(n, 1.0) for n in candidates])[0]


class Priority:
    """Strict order of priority (higher first; random among equals). With `aging` seconds, a
    queue waiting unserved gains one level per `aging` seconds, so none starves forever."""

    def __init__(self, priorities: Mapping[str, int], aging: float = 0.0) -> None:
        self.priorities = dict(priorities)
        self.aging = aging
        self.since: Dict[str, float] = {}   # queue -> when it last was served or began to wait

    def __call__(self, pending: Mapping[str, Sized], rng: random.Random, now: float = 0.0) -> Optional[str]:
        candidates = [name for name, waiting in pending.items() if len(waiting)]
        for name in list(self.since):
            if name not in pending or not len(pending[name]):
                del self.since[name]
        if not candidates:
            return None
        for name in candidates:
            self.since.setdefault(name, now)

        def level(name: str) -> float:
            base = float(self.priorities.get(name, 0))
            if self.aging > 0:
                base += (now - self.since[name]) / self.aging
            return base

        top = max(level(n) for n in candidates)
        best = [n for n in candidates if level(n) >= top - 1e-9]
        chosen = best[0] if len(best) == 1 else rng.choice(best)
        self.since[chosen] = now
        return chosen


def policy(name: str, weights: Optional[Mapping[str, float]] = None,
           priorities: Optional[Mapping[str, int]] = None, aging: float = 0.0) -> Pick:
    if name == "random-robin":
        return random_robin
    if name == "weighted":
        return Weighted(weights or {})
    if name == "priority":
        return Priority(priorities or {}, aging)
    raise ValueError(f"unknown request merge policy {name!r}")
