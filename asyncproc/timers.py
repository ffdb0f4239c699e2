"""When periodic work is due next: one small value instead of a `*_at` field per task. The
clock is passed in (the supervisor's), so tests drive it with a fake one."""
from __future__ import annotations

from typing import Optional


class Timer:
    """A moment to act at; `every` makes it periodic."""

    def __init__(self, interval: Optional[float] = None, at: float = 0.0) -> None:
        self.interval = interval
        self.at = at

    def due(self, now: float) -> bool:
        return now >= self.at

    def every(self, now: float, interval: Optional[float] = None) -> bool:
        """Due now? If so, due again `interval` (or the timer's own) seconds from now."""
        if now < self.at:
            return False
        self.at = now + (self.interval if interval is None else interval)
        return True

    def set(self, at: float) -> None:
        self.at = at

    def after(self, now: float, seconds: float) -> None:
        self.at = now + seconds


class Backoff:
    """How long until asking again: `base` while asking finds something, doubling up to
    `most` while it keeps finding nothing, so an idle asyncproc asks its queues about once a
    second instead of ten times (README: Retries)."""

    def __init__(self, base: float, most: float) -> None:
        self.base = base
        self.most = most
        self.current = base

    def after(self, found: bool) -> float:
        """Seconds to the next ask, after one that found something (or nothing)."""
        if found:
            self.current = self.base
            return self.base
        seconds = self.current
        self.current = min(self.current * 2, self.most)
        return seconds

    def reset(self) -> None:
        self.current = self.base


class BatchWindow:
    """How long to let outcomes gather before acting on them (README: Performance): a small
    share of the mean attempt latency, so a freed slot waits at most that share longer, while
    thousands of slow requests in flight are handled a batch per wake-up (per Redis round
    trip in the supervisor, per pipe write in a worker) instead of one each. 0 below a
    millisecond: an instant gateway's outcomes are not held at all."""

    #: The window is at most this share of the mean attempt latency...
    SHARE = 0.01
    #: ...and never longer than this (10,000 in flight at a mean 20 s: 123-132 µs of CPU a
    #: message with 0.2 s against 126-154 with 0.1, and 260-290 µs with 0.1 against 410-435
    #: with 0.02 before other work; README: Performance).
    MAX = 0.25
    #: Weight of the newest outcome in the mean attempt latency.
    SMOOTHING = 0.05

    def __init__(self) -> None:
        self.mean_latency = 0.0   # seconds an attempt takes, smoothed over recent outcomes

    def learn(self, elapsed: float) -> None:
        self.mean_latency += self.SMOOTHING * (elapsed - self.mean_latency)

    def seconds(self) -> float:
        window = min(self.SHARE * self.mean_latency, self.MAX)
        return window if window >= 0.001 else 0.0
