"""Cancellation of what is held, waiting or in flight: which requests a cancellation
covers and what becomes of each. Pure; the supervisor does the reading and the sending.

Two sources name cancelled requests: `asyncproc cancel` (ids and batches, read as one
sorted set) and llm-d-async's producer (`request-cancel:<id>` holding the request's
token, read for the held requests that carry a token, in one pipelined read). A waiting
request is answered `cancelled` without dispatch; one in flight is aborted by the worker
holding it (its connection closed) and answered `cancelled` when the worker reports back,
unless an answer from the gateway came first. Either way it is never retried.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AbstractSet, Dict, Iterable, List, Tuple

from asyncproc.ledger import Entry, State
from asyncproc.messages import Cancellations, Request
from asyncproc.outcomes import Kind, Outcome


def marker_query(request: Request) -> Tuple[str, str]:
    """(request id, token) to look up in llm-d-async's `request-cancel:<id>`."""
    return (request.id if isinstance(request.id, str) else str(request.id), request.token or "")


def with_tokens(requests: Iterable[Request]) -> List[Request]:
    return [r for r in requests if r.token]


@dataclass
class Plan:
    withdraw: List[Entry] = field(default_factory=list)        # waiting: answer without dispatch
    abort: Dict[int, List[str]] = field(default_factory=dict)  # worker index -> keys to abort


def plan(entries: Iterable[Entry], named: Cancellations, marked: AbstractSet[str],
         aborting: AbstractSet[str]) -> Plan:
    """What to do with each held entry a cancellation covers (`marked`: keys whose
    llm-d-async marker holds their token; `aborting`: keys already being aborted)."""
    out = Plan()
    for entry in entries:
        request = entry.request
        if not (request.key in marked or named.covers(request)):
            continue
        if entry.state is State.WAITING:
            out.withdraw.append(entry)
        elif entry.state is State.ASSIGNED and request.key not in aborting and entry.worker is not None:
            out.abort.setdefault(entry.worker, []).append(request.key)
    return out


def answer_of_aborted(outcome: Outcome) -> bool:
    """For a request whose attempt was being aborted: does the gateway's answer stand
    (it came first, as a final answer), or is the request answered `cancelled`?"""
    return outcome.status is not None and outcome.kind in (Kind.OK, Kind.FATAL)
