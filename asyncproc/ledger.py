"""The in-flight ledger: every request the supervisor holds, and where it is.

Invariants it keeps:
- waiting requests leave their queue in arrival order, or earliest deadline first;
- one entry per id at a time, so an id is dispatched once and answered once;
- a request is waiting (per queue, in its dispatch order), assigned to one worker, or
  settling (its outcome is in; the result or retry is not yet written);
- an id is forgotten only when what settles it has been written (`forget`);
- what a dead worker held waits again: first in line under arrival order, in its place by
  deadline under deadline order (`release_worker`);
- on drain, `unfinished()` names everything that must be put back.
Pure bookkeeping: no I/O.
"""
from __future__ import annotations

import bisect
import enum
import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple, Union

from asyncproc.messages import Request


class State(enum.Enum):
    WAITING = "waiting"
    ASSIGNED = "assigned"
    SETTLING = "settling"


@dataclass
class Entry:
    request: Request
    delivery: Any = None   # the transport's handle, settled when the request is
    state: State = State.WAITING
    worker: Optional[int] = None
    dispatched_at: float = 0.0


class ByDeadline:
    """A queue's waiting ids, earliest deadline first (ties in arrival order). The deque
    operations the ledger uses; a sorted list, as a queue holds at most --concurrency +
    --intake-buffer ids and most operations are at its ends."""

    def __init__(self, deadline_of: Callable[[str], float]) -> None:
        self.deadline_of = deadline_of
        self.items: List[Tuple[float, int, str]] = []
        self.serial = itertools.count()

    def append(self, key: str) -> None:
        bisect.insort(self.items, (self.deadline_of(key), next(self.serial), key))

    appendleft = append  # released work takes its place by deadline

    def popleft(self) -> str:
        return self.items.pop(0)[2]

    def pop(self) -> str:
        return self.items.pop()[2]

    def remove(self, key: str) -> None:
        for i, item in enumerate(self.items):
            if item[2] == key:
                del self.items[i]
                return
        raise ValueError(key)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return (item[2] for item in self.items)


ORDERS = ("arrival", "deadline")


class Ledger:
    def __init__(self, order: str = "arrival") -> None:
        if order not in ORDERS:
            raise ValueError(f"unknown dispatch order {order!r}")
        self.order = order
        self._entries: Dict[str, Entry] = {}
        self._waiting: Dict[str, Union[Deque[str], ByDeadline]] = {}
        self._by_worker: Dict[int, set] = {}
        self._assigned_in: Dict[str, int] = {}   # queue -> requests assigned to workers
        self._tokened: Dict[str, None] = {}      # keys of held requests with a cancel token
        # Since `assigned_since` was last asked: the first assignment's time and the
        # earliest deadline assigned (upkeep bounds when any of them can be overdue).
        self._fresh: Optional[Tuple[float, float]] = None

    # -- intake --------------------------------------------------------------------
    def admit(self, request: Request, delivery: Any = None) -> bool:
        """Hold a new request; False if its id is already held (a duplicate delivery)."""
        key = request.key
        if key in self._entries:
            return False
        self._entries[key] = Entry(request, delivery)
        self._queue(request.queue).append(key)
        if request.token:
            self._tokened[key] = None
        return True

    def _queue(self, name: str):
        waiting = self._waiting.get(name)
        if waiting is None:
            if self.order == "deadline":
                waiting = ByDeadline(lambda key: self._entries[key].request.deadline)
            else:
                waiting = deque()
            self._waiting[name] = waiting
        return waiting

    def holds(self, key: str) -> bool:
        return key in self._entries

    def entry(self, key: str) -> Optional[Entry]:
        return self._entries.get(key)

    # -- dispatch ------------------------------------------------------------------
    @property
    def waiting_by_queue(self) -> Dict[str, Union[Deque[str], ByDeadline]]:
        return self._waiting

    def take(self, queue: str) -> Request:
        """The next waiting request of `queue` (the caller assigns it at once)."""
        key = self._waiting[queue].popleft()
        return self._entries[key].request

    def take_last(self, queue: str) -> Entry:
        """The newest waiting request of `queue`, to stage it elsewhere; it is forgotten."""
        key = self._waiting[queue].pop()
        self._tokened.pop(key, None)
        return self._entries.pop(key)

    def withdraw(self, key: str) -> Optional[Entry]:
        """Take a waiting request out of line, to answer it without dispatch (cancelled);
        it stays held (settling) until its result is written."""
        entry = self._entries.get(key)
        if entry is None or entry.state is not State.WAITING:
            return None
        self._waiting[entry.request.queue].remove(key)
        entry.state = State.SETTLING
        return entry

    def assign(self, key: str, worker: int, now: float) -> None:
        entry = self._entries[key]
        entry.state, entry.worker, entry.dispatched_at = State.ASSIGNED, worker, now
        self._by_worker.setdefault(worker, set()).add(key)
        self._count_assigned(entry, 1)
        fresh, deadline = self._fresh, entry.request.deadline
        if fresh is None:
            self._fresh = (now, deadline)
        elif deadline < fresh[1]:
            self._fresh = (fresh[0], deadline)

    def assigned_since(self) -> Optional[Tuple[float, float]]:
        """(the earliest dispatch time, the earliest deadline) of what was assigned since the
        last call, or None; every such attempt ends no sooner than the earlier of that time
        plus its budget and that deadline."""
        fresh, self._fresh = self._fresh, None
        return fresh

    def settle(self, key: str, request: Optional[Request] = None) -> Optional[Entry]:
        """The outcome for `key` is in; None if it was not assigned (a stale report)."""
        entry = self._entries.get(key)
        if entry is None or entry.state is not State.ASSIGNED:
            return None
        self._by_worker.get(entry.worker, set()).discard(key)
        self._count_assigned(entry, -1)
        entry.state, entry.worker = State.SETTLING, None
        if request is not None:
            entry.request = request
        return entry

    def requeue(self, key: str) -> Optional[Entry]:
        """A settled attempt that does not count (preempted): the request waits again,
        first in line under arrival order, in its place by deadline under deadline order."""
        entry = self._entries.get(key)
        if entry is None or entry.state is not State.SETTLING:
            return None
        entry.state = State.WAITING
        self._queue(entry.request.queue).appendleft(key)
        return entry

    def forget(self, key: str) -> None:
        """What settles `key` has been written: it may be admitted again later."""
        entry = self._entries.pop(key, None)
        self._tokened.pop(key, None)
        if entry is not None and entry.state is State.WAITING:
            waiting = self._waiting.get(entry.request.queue)
            if waiting is not None:
                try:
                    waiting.remove(key)
                except ValueError:
                    pass
        if entry is not None and entry.worker is not None:
            self._by_worker.get(entry.worker, set()).discard(key)
        if entry is not None and entry.state is State.ASSIGNED:
            self._count_assigned(entry, -1)

    # -- faults and drain ------------------------------------------------------------
    def assigned_count(self, worker: int) -> int:
        return len(self._by_worker.get(worker, ()))

    def release_worker(self, worker: int) -> List[Request]:
        """A worker died: what it held waits again, first in line."""
        keys = self._by_worker.pop(worker, set())
        released = []
        for key in sorted(keys, key=lambda k: self._entries[k].dispatched_at, reverse=True):
            entry = self._entries[key]
            self._count_assigned(entry, -1)
            entry.state, entry.worker = State.WAITING, None
            self._queue(entry.request.queue).appendleft(key)
            released.append(entry.request)
        return released

    def _count_assigned(self, entry: Entry, step: int) -> None:
        queue = entry.request.queue
        self._assigned_in[queue] = self._assigned_in.get(queue, 0) + step

    def assigned_in(self, queue: str) -> int:
        """Requests of `queue` at workers now (kept as a count: dispatch asks every tick)."""
        return self._assigned_in.get(queue, 0)

    def unfinished(self, states: Iterable[State] = (State.WAITING, State.ASSIGNED)) -> List[Entry]:
        wanted = set(states)
        return [e for e in self._entries.values() if e.state in wanted]

    def assigned(self) -> List[Entry]:
        """The entries at workers (from the per-worker index: no walk over what waits)."""
        entries = self._entries
        return [entries[key] for keys in self._by_worker.values() for key in keys]

    def deliveries(self) -> List[Any]:
        """The transport handles of everything held, to keep their leases alive."""
        return [e.delivery for e in self._entries.values() if e.delivery is not None]

    # -- counts ----------------------------------------------------------------------
    def count(self, state: State) -> int:
        if state is State.WAITING:
            return sum(len(q) for q in self._waiting.values())
        if state is State.ASSIGNED:
            return sum(len(s) for s in self._by_worker.values())
        return sum(1 for e in self._entries.values() if e.state is state)

    def assigned_by_queue(self) -> Dict[str, int]:
        """Requests at workers per queue (the in-flight gauge), from the kept counts."""
        return dict(self._assigned_in)

    def tokened(self) -> List[Request]:
        """The held (waiting or assigned) requests that carry an llm-d-async cancel token,
        from an index kept at admission: the cancel watch reads only these, so it costs
        nothing per held request that has none."""
        out = []
        for key in self._tokened:
            entry = self._entries.get(key)
            if entry is not None and entry.state is not State.SETTLING:
                out.append(entry.request)
        return out

    def __len__(self) -> int:
        return len(self._entries)
