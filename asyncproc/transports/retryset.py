"""The Redis sorted-set retry store the Redis transports share (score = due time)."""
from __future__ import annotations

from importlib import resources
from typing import List

import redis


def load_script(name: str) -> str:
    return resources.files("asyncproc.transports").joinpath("lua", name).read_text()


def in_pipeline(script, pipe, keys, args) -> None:
    """EVALSHA on a pipeline without redis-py's SCRIPT EXISTS round trip before it: the
    transport loads its scripts when it connects, and a NOSCRIPT (Redis restarted and
    lost them) fails the write, which reconnects and loads them again."""
    pipe.evalsha(script.sha, len(keys), *keys, *args)


def preload(client, *scripts) -> None:
    for script in scripts:
        client.script_load(script.script)


class RetrySet:
    def __init__(self, client: redis.Redis, key: str) -> None:
        self.key = key
        self._claim = client.register_script(load_script("claim_due.lua"))
        self._client = client

    def claim_due(self, now: float, limit: int) -> List[bytes]:
        if limit <= 0:
            return []
        return self._claim(keys=[self.key], args=[repr(now), limit])

    def add(self, pipe, entries) -> None:
        """Queue ZADDs on `pipe` for (member, due) pairs."""
        if entries:
            pipe.zadd(self.key, {member: due for member, due in entries})

    def size(self) -> int:
        return self._client.zcard(self.key)
