"""Taking a failed write apart: one item at a time, and what replaces an item the queue
system refuses on its own (a result over its size limit, ...), so that one bad item never
holds back the others. Pure: values in, values out."""
from __future__ import annotations

import dataclasses
from typing import List

import orjson

from asyncproc import messages
from asyncproc.messages import Request, Result
from asyncproc.transports.base import Writes

REASON_CHARS = 200


def singles(writes: Writes) -> List[Writes]:
    """Every item of `writes` as a Writes of its own, in the order a flush writes them."""
    return ([Writes(results=[item], routes=_route_of(writes, item[0])) for item in writes.results]
            + [Writes(retries=[item]) for item in writes.retries]
            + [Writes(dead_letters=[item]) for item in writes.dead_letters]
            + [Writes(drops=[item]) for item in writes.drops]
            + [Writes(staged=[item]) for item in writes.staged])


def _route_of(writes: Writes, key: str) -> dict:
    route = writes.routes.get(key)
    return {key: route} if route is not None else {}


def extend(into: Writes, other: Writes) -> None:
    into.routes.update(other.routes)
    into.results.extend(other.results)
    into.retries.extend(other.retries)
    into.dead_letters.extend(other.dead_letters)
    into.drops.extend(other.drops)
    into.staged.extend(other.staged)


def kind_of(single: Writes) -> str:
    if single.results:
        return "result"
    if single.retries:
        return "retry"
    if single.dead_letters:
        return "dead letter"
    if single.staged:
        return "staging"
    return "acknowledgement"


def replacement(single: Writes, exc: Exception, fmt: str) -> Writes:
    """What to write instead of an item refused on its own: a small error result for its
    id (a result or a retry), nothing but the settling for a dead letter. An acknowledgement
    or a staging has no replacement: it is itself (a refusal there is not about the item;
    a staged message unwritten keeps its record, taken back once its lease runs out)."""
    reason = f"refused by the queue system: {str(exc)[:REASON_CHARS]}"
    if single.results:
        key, raw, delivery = single.results[0]
        route = single.routes.get(key)
        result = Result(orjson.loads(key), delivery.queue if delivery is not None else "", False,
                        f"result of {len(raw)} bytes {reason}", token=route.token if route else None)
        # to the default result queue: the one the request named may be what refused it
        routes = {key: dataclasses.replace(route, queue=None)} if route is not None else {}
        return Writes(results=[(key, messages.encode_result(result, fmt), delivery)], routes=routes)
    if single.retries:
        state, _, delivery = single.retries[0]
        request = messages.decode_state(state, delivery.queue if delivery is not None else "")
        if isinstance(request, Request):
            result = Result(request.id, request.queue, False, f"retry {reason}", attempts=request.attempts,
                            metadata=request.metadata)
            return Writes(results=[(request.key, messages.encode_result(result, fmt), delivery)])
        return Writes(drops=[delivery] if delivery is not None else [])
    if single.dead_letters:
        _, delivery = single.dead_letters[0]
        return Writes(drops=[delivery] if delivery is not None else [])
    return single
