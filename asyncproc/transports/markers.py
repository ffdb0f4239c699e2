"""llm-d-async's per-request markers in Redis: `request-cancel:<id>` holding a request's
token cancels that generation; `request-active:<id>` is released (only if it still holds
that token) once its result is written. One key per command, so it works on a cluster."""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import redis

from asyncproc import llmd
from asyncproc.transports.base import ResultRoute
from asyncproc.transports.retryset import in_pipeline, load_script, preload


class Markers:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._release = client.register_script(load_script("delete_if_holds.lua"))

    def preload(self, client: redis.Redis) -> None:
        preload(client, self._release)

    def release(self, pipe, routes: Iterable[Optional[ResultRoute]]) -> None:
        """Queue on `pipe`, after the results: delete each answered generation's markers."""
        for route in routes:
            if route is not None and route.token and route.request_id:
                for key in (llmd.active_key(route.request_id), llmd.cancel_key(route.request_id)):
                    in_pipeline(self._release, pipe, [key], [route.token])

    def cancelled(self, pairs: Sequence[Tuple[str, str]]) -> List[bool]:
        """For each (request id, token): does `request-cancel:<id>` hold that token? One
        pipelined read for all of them."""
        if not pairs:
            return []
        pipe = self._client.pipeline(transaction=False)
        for request_id, _ in pairs:
            pipe.get(llmd.cancel_key(request_id))
        values = pipe.execute()
        return [value is not None and value == token.encode() for value, (_, token) in zip(values, pairs)]
