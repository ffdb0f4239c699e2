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
