"""The Redis sorted-set retry store of redis-pubsub (score = due time), taken by lease."""
from __future__ import annotations

from importlib import resources
from typing import Iterable, List

import redis

from asyncproc.transports.keys import aux_key


def load_script(name: str) -> str:
    return resources.files("asyncproc.transports").joinpath("lua", name).read_text()


def in_pipeline(script, pipe, keys, args) -> None:
    """EVALSHA on a pipeline without redis-py's SCRIPT EXISTS round trip before it: the
    transport loads its scripts when it connects, and a NOSCRIPT (Redis restarted and
    lost them, or a new master) fails the write, which reconnects and loads them again.
    A raw command: a cluster pipeline routes it by its keys (its evalsha() is refused)."""
    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)


def preload(client, *scripts) -> None:
    for script in scripts:
        client.script_load(script.script)


class RetrySet:
    """Members are whole request states. Taking one moves it to a lease set in the same
    slot; it leaves that only when what replaces it (a result, a new retry) is written, and
    comes back by itself if its holder dies or the reply to the taking is lost."""

    def __init__(self, client: redis.Redis, key: str, prefix: str) -> None:
        self.key = key
        self.leases = aux_key(prefix, key, "leases")
        self._claim = client.register_script(load_script("claim_due.lua"))
        self._client = client

    def claim_due(self, now: float, lease_until: float, limit: int) -> List[bytes]:
        if limit <= 0:
            return []
        return self._claim(keys=[self.key, self.leases], args=[repr(now), repr(lease_until), limit])

    def add(self, pipe, entries) -> None:
        """Queue ZADDs on `pipe` for (member, due) pairs."""
        if entries:
            pipe.zadd(self.key, {member: due for member, due in entries})

    def settle(self, pipe, members: Iterable[bytes]) -> None:
        members = list(members)
        if members:
            pipe.zrem(self.leases, *members)

    def extend(self, pipe, members: Iterable[bytes], until: float) -> None:
        members = list(members)
        if members:
            pipe.zadd(self.leases, {m: until for m in members}, xx=True, gt=True)

    def sizes(self) -> tuple:
        """(entries waiting, entries taken under a lease)."""
        pipe = self._client.pipeline(transaction=False)
        pipe.zcard(self.key)
        pipe.zcard(self.leases)
        waiting, leased = pipe.execute()
        return waiting, leased
