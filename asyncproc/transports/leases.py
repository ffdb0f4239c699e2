"""Leased work in Redis: claimed messages carry an expiry, so a holder's death returns them.

Three keys in one hash slot per request queue: the ready sorted set (the queue itself for
redis-sortedset), a lease sorted set (member -> lease expiry, or the due time of a retry:
a retry is a lease that runs out when the retry is due) and a state hash (member -> the
request state written with a retry, so attempts survive any restart).
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import redis

from asyncproc.transports.keys import aux_key
from asyncproc.transports.retryset import load_script


class LeaseSet:
    def __init__(self, client: redis.Redis, prefix: str, queue: str, ready_key: Optional[str]) -> None:
        self.queue = queue
        self.ready = ready_key or aux_key(prefix, queue, "ready")
        self.leases = aux_key(prefix, queue, "leases")
        self.state = aux_key(prefix, queue, "state")
        self._claim = client.register_script(load_script("lease_claim.lua"))

    def claim(self, client, now: float, lease_until: float, limit: int,
              take_new: bool) -> List[Tuple[bytes, Optional[bytes]]]:
        """(member, state or None) pairs: due leases first, then (take_new) new requests."""
        if limit <= 0:
            return []
        flat = self._claim(keys=[self.ready, self.leases, self.state],
                           args=[repr(now), repr(lease_until), limit, "1" if take_new else "0"],
                           client=client)
        return [(flat[i], flat[i + 1] or None) for i in range(0, len(flat), 2)]

    def retry(self, pipe, member: bytes, state: bytes, due: float) -> None:
        """Queue on `pipe`: hold `member` until `due`, with its state."""
        pipe.zadd(self.leases, {member: due})
        pipe.hset(self.state, member, state)

    def settle(self, pipe, members: Iterable[bytes]) -> None:
        members = list(members)
        if members:
            pipe.zrem(self.leases, *members)
            pipe.hdel(self.state, *members)

    def extend(self, pipe, members: Iterable[bytes], until: float) -> None:
        """Push live leases forward; never shortens one (a retry waiting for its time)."""
        members = list(members)
        if members:
            pipe.zadd(self.leases, {m: until for m in members}, xx=True, gt=True)
