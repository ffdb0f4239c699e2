"""The whole queue interface the supervisor sees. Queue errors become TransportError here."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple


class TransportError(Exception):
    """The queue system is unreachable or refused an operation; the caller retries later."""


@dataclass(frozen=True)
class Delivery:
    """One raw message as the queue handed it over. `token` is what `ack` needs, if anything."""

    raw: bytes
    queue: str
    token: Any = None
    from_retry_set: bool = False


@dataclass
class Writes:
    """Everything one flush writes, in one round trip where the transport can.

    `results` are (id key, encoded result); `retries` are (encoded request state, due time);
    `dead_letters` are encoded dead-letter entries; `acks` are settled deliveries.
    Written before they are acked, so a crash in between repeats work, never loses it.
    """

    results: List[Tuple[str, bytes]] = field(default_factory=list)
    retries: List[Tuple[bytes, float]] = field(default_factory=list)
    dead_letters: List[bytes] = field(default_factory=list)
    acks: List[Delivery] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.results or self.retries or self.dead_letters or self.acks)

    def extend(self, other: "Writes") -> None:
        self.results.extend(other.results)
        self.retries.extend(other.retries)
        self.dead_letters.extend(other.dead_letters)
        self.acks.extend(other.acks)


class Transport(abc.ABC):
    @abc.abstractmethod
    def connect(self) -> None:
        """(Re)establish connections and subscriptions. Raises TransportError."""

    @abc.abstractmethod
    def receive(self, limit: int) -> List[Delivery]:
        """New request messages, at most `limit`, without blocking."""

    @abc.abstractmethod
    def claim_due(self, now: float, limit: int) -> List[Delivery]:
        """Retry-set entries due by `now`, removed from the set atomically."""

    def claim(self, keys: List[str]) -> List[bool]:
        """For each id key: is it ours to process? (Replicas sharing a queue, redeliveries.)"""
        return [True] * len(keys)

    @abc.abstractmethod
    def write(self, writes: Writes) -> None:
        """Publish results, schedule retries, store dead letters, then ack. All or nothing."""

    @abc.abstractmethod
    def retry_set_size(self) -> int:
        ...

    @abc.abstractmethod
    def ping(self) -> None:
        ...

    def fileno(self) -> Optional[int]:
        """A socket that becomes readable when messages arrive, for the supervisor's wait."""
        return None

    def close(self) -> None:
        pass
