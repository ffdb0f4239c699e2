"""The whole queue interface, both sides: what the supervisor consumes (Transport) and what
producers ask (Producer). Queue errors become TransportError (or ProducerError) here."""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Tuple

import orjson

from asyncproc import redact


class TransportError(Exception):
    """The queue system is unreachable or refused an operation; the caller retries later."""


class Unconfirmed(TransportError):
    """Written, but fewer replicas than asked confirmed it (--redis.wait-replicas): no item
    is at fault, so the whole write waits and is repeated (repeats are deduplicated)."""


@dataclass  # not frozen, as messages.Request: one or two are made per message
class Delivery:
    """One message as the queue handed it over.

    `raw` is the request message as the producer wrote it; `state`, when set, is the full
    request state asyncproc stored with a retry (attempts, last error), which wins over
    `raw`. `token` is what the transport needs to settle it (None: nothing to settle).
    `received`, when set, is when a staged message was first received (it is handed back
    as it came, and its time in Redis counts as waiting).
    """

    raw: bytes
    queue: str
    token: Any = None
    state: Optional[bytes] = None
    received: Optional[float] = None


@dataclass(frozen=True)
class ResultRoute:
    """Where one result goes and what writing it closes (llm-d-async): `queue` instead of
    the transport's result queue (None: that one); `request_id` and `token` name the
    generation whose `request-active:<id>` marker is released once the result is written."""

    queue: Optional[str] = None
    request_id: Optional[str] = None
    token: Optional[str] = None


@dataclass
class Writes:
    """Everything one flush writes. Each item names the delivery it settles, if any.

    `drops` settle without writing.
    `results`: (id key, encoded result, delivery); `retries`: (encoded request state, due
    time, delivery); `dead_letters`: (encoded dead-letter entry, delivery); `staged`:
    (delivery, when it was received), overflow handed back to a transport that keeps what it
    received (`Transport.restages`), for claim_due to hand out again. A delivery is
    settled only after what replaces it is written, so a crash in between repeats work
    (results stay deduplicated), never loses it. Writing the same Writes twice is safe.
    """

    results: List[Tuple[str, bytes, Optional[Delivery]]] = field(default_factory=list)
    retries: List[Tuple[bytes, float, Optional[Delivery]]] = field(default_factory=list)
    dead_letters: List[Tuple[bytes, Optional[Delivery]]] = field(default_factory=list)
    #: deliveries settled with nothing to write (a duplicate of an id already held)
    drops: List[Delivery] = field(default_factory=list)
    #: (delivery, when received): overflow put back as it came (`Transport.restages` only)
    staged: List[Tuple[Delivery, float]] = field(default_factory=list)
    #: per result (by id key), where it goes and what it closes; absent: the defaults
    routes: Dict[str, ResultRoute] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.results or self.retries or self.dead_letters or self.drops or self.staged)

    def __len__(self) -> int:
        return len(self.results) + len(self.retries) + len(self.dead_letters) + len(self.drops) + len(self.staged)


class Transport(abc.ABC):
    #: True when receive() must drain everything (pub/sub); False when the queue keeps what
    #: is not taken, so asyncproc takes only what it has room for.
    must_drain: bool = False
    #: True when write() takes Writes.staged: the transport kept each message as it was
    #: received, so overflow goes back as it came instead of into the retry set (pub/sub).
    restages: bool = False
    #: True when write() leaves the deliveries of the results and dead letters it writes
    #: unsettled: the books hand them to the next write, as drops. A result is still written
    #: before its request is settled, and a flush costs one round trip instead of two.
    settles_later: bool = False
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

    def claim(self, keys: List[str], deliveries: List[Delivery]) -> List[bool]:
        """For each id key (of the delivery beside it): is it ours to process? (Replicas
        sharing a queue, redeliveries.) A transport that keeps nothing by itself records
        the delivery here, so that Redis has it before we depend on our memory."""
        return [True] * len(keys)

    @abc.abstractmethod
    def write(self, writes: Writes) -> None:
        """Write results, retries and dead letters, and settle their deliveries (but see
        `settles_later`)."""

    def keep_alive(self, deliveries: List[Delivery]) -> None:
        """Tell the queue these deliveries are still being worked on (extend leases)."""

    def cancellations(self, now: float) -> Tuple[FrozenSet[str], FrozenSet[str]]:
        """(batch ids, id keys) that `asyncproc cancel` named and that have not lapsed."""
        return frozenset(), frozenset()

    def cancelled_tokens(self, pairs: List[Tuple[str, str]]) -> List[bool]:
        """For each (request id, token): has llm-d-async's producer cancelled that request
        generation (`request-cancel:<id>` holds the token)? One read for all of them."""
        return [False] * len(pairs)

    def tidy(self, now: float) -> None:
        """Forget local state that has lapsed (called every few seconds, before stats())."""

    @abc.abstractmethod
    def stats(self) -> Dict[str, Dict[str, float]]:
        """Gauges by name, each by queue: retry_set, depth, leased, oldest_age_seconds. No
        side effects (forgetting lapsed state is tidy()'s)."""

    @abc.abstractmethod
    def ping(self) -> None:
        ...

    def fileno(self) -> Optional[int]:
        """A socket that becomes readable when messages arrive, for the supervisor's wait."""
        return None

    def close(self) -> None:
        pass


# -- the producer's side: what asyncproc.client and the batch commands ask a transport ------
class ResultReader:
    """Decoded result objects as they arrive; poll() never blocks longer than asked."""

    def poll(self, timeout: float) -> List[dict]:
        raise NotImplementedError

    def wait(self, timeout: Optional[float] = None, idle: float = 0.5) -> Iterator[dict]:
        """Results until `timeout` seconds pass (None: forever)."""
        end = None if timeout is None else time.monotonic() + timeout
        while end is None or time.monotonic() < end:
            yield from self.poll(idle)

    def __enter__(self) -> "ResultReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    @staticmethod
    def decode(raw: bytes) -> Optional[dict]:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        return value if isinstance(value, dict) and "id" in value else None


class ProducerError(Exception):
    """Something the user asked cannot be done (one line, no traceback)."""


class Producer(abc.ABC):
    """Submit requests, read results, cancel, look: one queue system, seen from outside."""

    #: Results wait (a list, a stream, a batch's own subscription) instead of being
    #: published once to whoever listens.
    persisted: bool = True
    #: Results can be read without taking them (for status).
    counts_results: bool = False
    #: Results are read per batch (a batch must be named to read them).
    results_per_batch: bool = False
    #: What a failed call raises, and where it went (for the one-line error).
    errors: tuple = ()
    where: str = ""

    def run(self, call):
        """`call()`, its queue-system errors as one ProducerError line (credentials redacted)."""
        try:
            return call()
        except self.errors as exc:
            text = redact.scrub(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise ProducerError(f"{self.where}: {redact.cause(text)}: {text}") from None

    @abc.abstractmethod
    def submit(self, requests: List[dict], forget: bool = False) -> int:
        """Put request messages (tagged already) on the request queue; returns how many."""

    def open_batch(self, batch: str, total: int) -> None:
        """Called before a batch's requests are submitted (its results can then not be missed)."""

    @abc.abstractmethod
    def record_batch(self, batch: str, count: int, total: Optional[int]) -> None:
        """Remember the batch for status: its total grows by `count`, or is `total`."""

    @abc.abstractmethod
    def results(self, from_start: bool = True, batch: Optional[str] = None, total: int = 0) -> ResultReader:
        ...

    @abc.abstractmethod
    def cancel(self, members: Dict[str, float], batch: Optional[str], now: float) -> None:
        """Record cancellations (`id:<key>` or `batch:<tag>`, each with when it lapses)."""

    def finish_batch(self, batch: str) -> None:
        """Every result of `batch` is out of the queues: drop what only served to read them."""

    @abc.abstractmethod
    def batch(self, batch: str) -> Dict[str, str]:
        ...

    @abc.abstractmethod
    def batch_ids(self) -> List[str]:
        ...

    @abc.abstractmethod
    def queue_stats(self) -> Dict[str, Dict[str, float]]:
        ...

    def close(self) -> None:
        pass
