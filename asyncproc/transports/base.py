"""The whole queue interface the supervisor sees. Queue errors become TransportError here."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Tuple


class TransportError(Exception):
    """The queue system is unreachable or refused an operation; the caller retries later."""


class Unconfirmed(TransportError):
    """Written, but fewer replicas than asked confirmed it (--redis.wait-replicas): no item
    is at fault, so the whole write waits and is repeated (repeats are deduplicated)."""


@dataclass(frozen=True)
class Delivery:
    """One message as the queue handed it over.

    `raw` is the request message as the producer wrote it; `state`, when set, is the full
    request state asyncproc stored with a retry (attempts, last error), which wins over
    `raw`. `token` is what the transport needs to settle it (None: nothing to settle).
    """

    raw: bytes
    queue: str
    token: Any = None
    state: Optional[bytes] = None


@dataclass
class Writes:
    """Everything one flush writes. Each item names the delivery it settles, if any.

    `drops` settle without writing.
    `results`: (id key, encoded result, delivery); `retries`: (encoded request state, due
    time, delivery); `dead_letters`: (encoded dead-letter entry, delivery). A delivery is
    settled only after what replaces it is written, so a crash in between repeats work
    (results stay deduplicated), never loses it. Writing the same Writes twice is safe.
    """

    results: List[Tuple[str, bytes, Optional[Delivery]]] = field(default_factory=list)
    retries: List[Tuple[bytes, float, Optional[Delivery]]] = field(default_factory=list)
    dead_letters: List[Tuple[bytes, Optional[Delivery]]] = field(default_factory=list)
    #: deliveries settled with nothing to write (a duplicate of an id already held)
    drops: List[Delivery] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.results or self.retries or self.dead_letters or self.drops)

    def __len__(self) -> int:
        return len(self.results) + len(self.retries) + len(self.dead_letters) + len(self.drops)


class Transport(abc.ABC):
    #: True when receive() must drain everything (pub/sub); False when the queue keeps what
    #: is not taken, so asyncproc takes only what it has room for.
    must_drain: bool = False
    #: How often held deliveries need keep_alive(), in seconds (None: never).
    keep_alive_interval: Optional[float] = None
    #: Times the queue system closed our subscription on its own (pub/sub's buffer limit).
    subscriber_drops: int = 0

    @abc.abstractmethod
    def connect(self) -> None:
        """(Re)establish connections and subscriptions. Raises TransportError."""

    @abc.abstractmethod
    def receive(self, limit: int) -> List[Delivery]:
        """New request messages, at most `limit`, without blocking."""

    @abc.abstractmethod
    def claim_due(self, now: float, limit: int) -> List[Delivery]:
        """Retries due by `now` (and work abandoned by dead holders), claimed atomically."""

    def claim(self, keys: List[str], deliveries: Optional[List[Delivery]] = None) -> List[bool]:
        """For each id key (of the delivery beside it): is it ours to process? (Replicas
        sharing a queue, redeliveries.) A transport that keeps nothing by itself records
        the delivery here, so that Redis has it before we depend on our memory."""
        return [True] * len(keys)

    @abc.abstractmethod
    def write(self, writes: Writes) -> None:
        """Write results, retries and dead letters, and settle their deliveries."""

    def keep_alive(self, deliveries: List[Delivery]) -> None:
        """Tell the queue these deliveries are still being worked on (extend leases)."""

    def cancellations(self, now: float) -> Tuple[FrozenSet[str], FrozenSet[str]]:
        """(batch ids, id keys) that `asyncproc cancel` named and that have not lapsed."""
        return frozenset(), frozenset()

    @abc.abstractmethod
    def stats(self) -> Dict[str, Dict[str, float]]:
        """Gauges by name, each by queue: retry_set, depth, leased, oldest_age_seconds."""

    @abc.abstractmethod
    def ping(self) -> None:
        ...

    def fileno(self) -> Optional[int]:
        """A socket that becomes readable when messages arrive, for the supervisor's wait."""
        return None

    def close(self) -> None:
        pass
