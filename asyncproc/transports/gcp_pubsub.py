"""Requests from Google Cloud Pub/Sub subscriptions; results published to a topic.

Everything runs in the supervisor's loop through the synchronous RPCs (pull with
`return_immediately`, publish, acknowledge, modifyAckDeadline), each with a timeout and no
client-side retry: no background thread, and a failure is a TransportError the supervisor
handles like a Redis outage. Flow control is the pull size: asyncproc pulls at most what it
has room for (`--concurrency` plus the intake buffer), so it never leases more than it will
dispatch soon.

Settling: a result is published (the publish RPC returned its message id) before the
request is acknowledged, so a crash in between repeats work, never loses it. A retry is not
acknowledged: its ack deadline is set to the back-off delay (whole seconds, at most 600), so
Pub/Sub redelivers it when it is due; its state (attempts, last error) waits in a bounded
map keyed by message id and rides on the redelivery. Held messages have their deadline
extended every `--gcp.ack-deadline` / 3 seconds. A redelivery of a message already held
(its lease ran out) only refreshes the ack id we settle it with.
"""
from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, TypeVar

import orjson
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from google.pubsub_v1 import PublisherClient, PubsubMessage, SubscriberClient

from asyncproc import messages
from asyncproc.transports.base import Delivery, Transport, TransportError, Writes
from asyncproc.transports.redis_sortedset import shares

if TYPE_CHECKING:
    from asyncproc.config import GcpConfig

log = logging.getLogger("asyncproc.gcp")

T = TypeVar("T")

RPC_TIMEOUT = 10.0            # seconds, every RPC: the loop never waits longer on Pub/Sub
MAX_PULL = 1000               # messages per pull request (the service's limit)
MAX_PUBLISH = 1000            # messages per publish request (the service's limit)
MAX_PUBLISH_BYTES = 9_000_000  # bytes per publish request (the service allows 10 MB)
MAX_IDS_PER_CALL = 1000       # ack ids per acknowledge / modifyAckDeadline request
MAX_ACK_DEADLINE = 600        # the service's cap, seconds
RETRY_STATE_MAX = 100_000     # retry states kept in memory (oldest dropped first)
IDLE_MIN, IDLE_MAX = 0.1, 1.0  # pull back-off of a subscription that came back empty
ATTRIBUTE_MAX = 1024          # bytes in an attribute value
MAX_MESSAGE_BYTES = 9_900_000  # a message's data; the service refuses more than 10 MB
STALE_RETRY_SECONDS = 2 * MAX_ACK_DEADLINE  # a retry not back this long after due went elsewhere


def guarded(call: Callable[[], T]) -> T:
    """Run a Pub/Sub call; its errors become TransportError (the edge of the transport)."""
    try:
        return call()
    except (gexc.GoogleAPIError, auth_exc.GoogleAuthError) as exc:
        raise TransportError(f"pubsub: {_short(exc)}") from None


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


def make_clients(emulator_host: Optional[str] = None) -> Tuple[PublisherClient, SubscriberClient]:
    """The plain RPC clients (no batching or streaming threads). With an emulator host
    (PUBSUB_EMULATOR_HOST) they talk plaintext gRPC to it without credentials."""
    if not emulator_host:
        return PublisherClient(), SubscriberClient()
    import grpc
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    # As the real service's client: no cap on a reply. gRPC's default (4 MB) is less than one
    # valid message (up to 10 MB), and a pull that would return one failed for as long as it
    # was redelivered, jamming the subscription.
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    return (PublisherClient(transport=PublisherGrpcTransport(
                channel=grpc.insecure_channel(emulator_host, options=options))),
            SubscriberClient(transport=SubscriberGrpcTransport(
                channel=grpc.insecure_channel(emulator_host, options=options))))


def pull(subscriber: SubscriberClient, path: str, limit: int, timeout: float = RPC_TIMEOUT):
    """One synchronous pull that answers at once, empty or not (the loop must not wait)."""
    with warnings.catch_warnings():  # the flag is discouraged, not going away; we need it
        warnings.simplefilter("ignore", DeprecationWarning)
        return subscriber.pull(request={"subscription": path, "max_messages": limit, "return_immediately": True},
                               timeout=timeout, retry=None)


def resource_path(project: str, kind: str, name: str) -> str:
    """`name` as a full resource path (`projects/P/<kind>/N`); full paths pass through."""
    return name if name.startswith("projects/") else f"projects/{project}/{kind}/{name}"


@dataclass
class Lease:
    """A message handed to the supervisor and not yet settled: the ack id to settle it with."""

    subscription: str
    ack_id: str
    touched: float = 0.0  # when it was pulled or last kept alive


class GcpPubSub(Transport):
    must_drain = False

    def __init__(self, gcp: GcpConfig, subscriptions: Sequence[str], result_format: str = "seed") -> None:
        self.project = gcp.project
        self.subscriptions: Dict[str, str] = {
            q: resource_path(self.project, "subscriptions", q) for q in subscriptions}
        self.result_topic = resource_path(self.project, "topics", gcp.result_topic)
        self.dead_letter_topic = (resource_path(self.project, "topics", gcp.dead_letter_topic)
                                  if gcp.dead_letter_topic else None)
        self.ack_deadline = int(gcp.ack_deadline)
        self.result_format = result_format
        self.keep_alive_interval = self.ack_deadline / 3
        self._publisher: Optional[PublisherClient] = None
        self._subscriber: Optional[SubscriberClient] = None
        self._held: Dict[Tuple[str, str], Lease] = {}    # (queue, message id) -> lease
        #: (queue, message id) -> (request state, due): retries waiting for their redelivery
        self._waiting: "OrderedDict[Tuple[str, str], Tuple[bytes, float]]" = OrderedDict()
        self._idle: Dict[str, Tuple[float, float]] = {}  # queue -> (skip pulls until, back-off)
        self._published: Set[Tuple[str, Tuple[str, str]]] = set()  # within a write being retried
        self._settled: Set[str] = set()                  # ack ids settled within that write
        self._turn = 0

    # -- connection --------------------------------------------------------------------
    def connect(self) -> None:
        def run() -> None:
            if self._subscriber is None:
                self._publisher, self._subscriber = make_clients(os.environ.get("PUBSUB_EMULATOR_HOST"))
            for queue, path in self.subscriptions.items():
                try:
                    self._subscriber.get_subscription(subscription=path, timeout=RPC_TIMEOUT, retry=None)
                except gexc.NotFound:
                    raise TransportError(f"pubsub: subscription {path} (queue {queue}) does not exist") from None
                except gexc.PermissionDenied:
                    pass  # roles/pubsub.subscriber may not read it; pulling will tell

        guarded(run)

    # -- intake ------------------------------------------------------------------------
    def receive(self, limit: int) -> List[Delivery]:
        out: List[Delivery] = []
        now = time.time()
        self._turn += 1
        for queue, share in shares(list(self.subscriptions), limit, self._turn):
            skip_until, _ = self._idle.get(queue, (0.0, 0.0))
            if share <= 0 or now < skip_until:
                continue
            path = self.subscriptions[queue]
            try:
                reply = guarded(lambda p=path, n=share: pull(self._subscriber, p, min(n, MAX_PULL)))
            except TransportError as exc:
                if not out:
                    raise
                # what was pulled already is held: hand it over; the next pull reports the error
                log.warning("pulling from %s failed: %s", queue, exc)
                break
            received = list(reply.received_messages)
            if not received:
                backoff = min(max(self._idle.get(queue, (0.0, 0.0))[1] * 2, IDLE_MIN), IDLE_MAX)
                self._idle[queue] = (now + backoff, backoff)
                continue
            self._idle.pop(queue, None)
            out.extend(self._take(queue, path, received, now))
        return out

    def _take(self, queue: str, path: str, received, now: float) -> List[Delivery]:
        out: List[Delivery] = []
        leased: List[str] = []
        later: Dict[int, List[str]] = {}
        for item in received:
            key = (queue, item.message.message_id)
            held = self._held.get(key)
            if held is not None:  # redelivered while we hold it: settle with the newest ack id
                held.ack_id = item.ack_id
                leased.append(item.ack_id)
                continue
            waiting = self._waiting.get(key)
            if waiting is not None and waiting[1] - now > 1.0:  # back early (a delay past 600 s)
                later.setdefault(_seconds(waiting[1] - now), []).append(item.ack_id)
                continue
            self._waiting.pop(key, None)
            self._held[key] = Lease(path, item.ack_id, now)
            leased.append(item.ack_id)
            out.append(Delivery(item.message.data, queue, token=key,
                                state=waiting[0] if waiting is not None else None))
        try:  # our lease, whatever the subscription's ack deadline; keep_alive extends it
            self._modack(path, leased, self.ack_deadline)
            for seconds, ack_ids in later.items():
                self._modack(path, ack_ids, seconds)
        except TransportError as exc:  # what was pulled is ours now: keep_alive retries this
            log.warning("could not extend the leases of %d messages just pulled: %s", len(leased), exc)
        return out

    def claim_due(self, now: float, limit: int) -> List[Delivery]:
        return []  # Pub/Sub redelivers due retries; receive() takes them

    # -- settling ----------------------------------------------------------------------
    def write(self, writes: Writes) -> None:
        """Publish results and dead letters, then acknowledge; retries get a deadline instead.

        Safe to call again with the same (or a longer) Writes after a TransportError: what
        was published or settled in an earlier call is not repeated.
        """
        now = time.time()
        self._publish(self.result_topic, [
            (("r", _mark(delivery, key)), self._fit(key, raw, delivery), self._attributes(delivery))
            for key, raw, delivery in writes.results])
        if self.dead_letter_topic:
            self._publish(self.dead_letter_topic, [
                (("d", _mark(delivery, str(n))), entry, self._attributes(delivery))
                for n, (entry, delivery) in enumerate(writes.dead_letters)])
        done = [d for _, _, d in writes.results] + writes.drops
        modacks: List[Tuple[Optional[Delivery], int]] = []
        if self.dead_letter_topic:
            done += [d for _, d in writes.dead_letters]
        else:  # nowhere to put it: leave it to the subscription's dead-letter policy
            for _, delivery in writes.dead_letters:
                modacks.append((delivery, MAX_ACK_DEADLINE))
        for state, due, delivery in writes.retries:
            if delivery is not None and delivery.token is not None:
                self._remember(delivery.token, state, due)
                modacks.append((delivery, _seconds(due - now)))
        self._ack(done)
        for seconds, deliveries in _group(modacks).items():
            for path, ack_ids in self._ack_ids(deliveries).items():
                self._modack(path, [a for a in ack_ids if a not in self._settled], seconds)
                self._settled.update(ack_ids)
            for delivery in deliveries:
                self._held.pop(delivery.token, None)
        self._published.clear()
        self._settled.clear()

    def _fit(self, key: str, raw: bytes, delivery: Optional[Delivery]) -> bytes:
        """A result Pub/Sub would refuse (over 10 MB) would block every write after it: it
        becomes an error result saying so."""
        if len(raw) <= MAX_MESSAGE_BYTES:
            return raw
        log.warning("id=%s result of %d bytes is too large for Pub/Sub; publishing an error instead", key, len(raw))
        return messages.encode_result(messages.Result(
            orjson.loads(key), delivery.queue if delivery else "", False,
            f"result too large for Pub/Sub ({len(raw)} bytes)"), self.result_format)

    def _attributes(self, delivery: Optional[Delivery]) -> Dict[str, str]:
        if delivery is None or delivery.token is None:
            return {}
        return {"queue": delivery.queue[:ATTRIBUTE_MAX], "request_message_id": delivery.token[1]}

    def _publish(self, topic: str, items: List[Tuple[tuple, bytes, Dict[str, str]]]) -> None:
        """Publish what this write has not published yet, in requests within the service's limits."""
        todo = [item for item in items if item[0] not in self._published]
        while todo:
            batch, size = [], 0
            for item in todo:
                if batch and (len(batch) >= MAX_PUBLISH or size + len(item[1]) > MAX_PUBLISH_BYTES):
                    break
                batch.append(item)
                size += len(item[1])
            guarded(lambda b=batch: self._publisher.publish(
                topic=topic, messages=[PubsubMessage(data=raw, attributes=attrs) for _, raw, attrs in b],
                timeout=RPC_TIMEOUT, retry=None))
            self._published.update(mark for mark, _, _ in batch)
            todo = todo[len(batch):]

    def _ack(self, deliveries: List[Delivery]) -> None:
        for path, ack_ids in self._ack_ids(deliveries).items():
            todo = [a for a in ack_ids if a not in self._settled]
            for chunk in _chunks(todo, MAX_IDS_PER_CALL):
                self._call_for_ids(lambda c=chunk, p=path: self._subscriber.acknowledge(
                    request={"subscription": p, "ack_ids": c}, timeout=RPC_TIMEOUT, retry=None), chunk)
                self._settled.update(chunk)
        for delivery in deliveries:
            if delivery is not None:
                self._held.pop(delivery.token, None)

    def _modack(self, path: str, ack_ids: List[str], seconds: int) -> None:
        for chunk in _chunks(ack_ids, MAX_IDS_PER_CALL):
            self._call_for_ids(lambda c=chunk: self._subscriber.modify_ack_deadline(
                request={"subscription": path, "ack_ids": c, "ack_deadline_seconds": seconds},
                timeout=RPC_TIMEOUT, retry=None), chunk)

    def _call_for_ids(self, call: Callable[[], object], ack_ids: List[str]) -> None:
        """An ack-id RPC. With exactly-once delivery the service names the ack ids it refused:
        a permanent refusal (the lease was lost, so Pub/Sub delivers the message again) is
        logged and passed over; a transient one fails the write, which is tried again."""
        try:
            call()
        except gexc.GoogleAPICallError as exc:
            failures = _ack_failures(exc)
            if failures is None:
                raise TransportError(f"pubsub: {_short(exc)}") from None
            transient = [a for a, why in failures.items() if not why.startswith("PERMANENT_")]
            if transient:
                raise TransportError(f"pubsub: {len(transient)} ack ids refused for now "
                                     f"({failures[transient[0]]})") from None
            log.warning("Pub/Sub refused %d of %d ack ids for good (%s): their leases had run"
                        " out; those messages will be delivered again", len(failures), len(ack_ids),
                        next(iter(failures.values()), ""))
        except (gexc.GoogleAPIError, auth_exc.GoogleAuthError) as exc:
            raise TransportError(f"pubsub: {_short(exc)}") from None

    def _ack_ids(self, deliveries: Iterable[Optional[Delivery]]) -> Dict[str, List[str]]:
        by_path: Dict[str, List[str]] = {}
        for delivery in deliveries:
            lease = self._held.get(delivery.token) if delivery is not None and delivery.token else None
            if lease is not None:
                by_path.setdefault(lease.subscription, []).append(lease.ack_id)
        return by_path

    def _remember(self, token: Tuple[str, str], state: bytes, due: float) -> None:
        self._waiting[token] = (state, due)
        self._waiting.move_to_end(token)
        while len(self._waiting) > RETRY_STATE_MAX:
            self._waiting.popitem(last=False)  # its redelivery starts counting attempts again

    def keep_alive(self, deliveries: List[Delivery]) -> None:
        now = time.time()
        for delivery in deliveries:
            lease = self._held.get(delivery.token)
            if lease is not None:
                lease.touched = now
        for path, ack_ids in self._ack_ids(deliveries).items():
            self._modack(path, ack_ids, self.ack_deadline)

    def tidy(self, now: float) -> None:
        """Forget retry state and leases that have lapsed."""
        for token in [t for t, (_, due) in self._waiting.items() if due < now - STALE_RETRY_SECONDS]:
            del self._waiting[token]
        # A lease nobody has kept alive for two ack deadlines has run out at Pub/Sub: forget
        # it, so that the redelivery is taken as new work (the supervisor holds every
        # delivery it was given until it settles it; this is the belt to those braces).
        for token in [t for t, lease in self._held.items() if lease.touched < now - 2 * self.ack_deadline]:
            log.warning("forgetting message %s of %s: held but not kept alive", token[1], token[0])
            del self._held[token]

    def stats(self) -> Dict[str, Dict[str, float]]:
        leased = {q: 0.0 for q in self.subscriptions}
        waiting = {q: 0.0 for q in self.subscriptions}
        for queue, _ in self._held:
            leased[queue] = leased.get(queue, 0.0) + 1
        for queue, _ in self._waiting:
            waiting[queue] = waiting.get(queue, 0.0) + 1
        return {"leased": leased, "retry_set": waiting}

    def ping(self) -> None:
        self.connect()

    def close(self) -> None:
        for client in (self._subscriber, self._publisher):
            if client is not None:
                try:
                    client.transport.close()
                except Exception:  # closing is best effort; the process is going away
                    pass


def _mark(delivery: Optional[Delivery], fallback: str) -> Tuple[str, str]:
    if delivery is not None and delivery.token is not None:
        return delivery.token
    return ("", fallback)


def _seconds(delay: float) -> int:
    """An ack deadline for a delay: whole seconds, rounded up so a retry is never early."""
    if delay <= 0:
        return 0
    return min(max(int(math.ceil(delay)), 1), MAX_ACK_DEADLINE)


def _group(pairs: List[Tuple[Optional[Delivery], int]]) -> Dict[int, List[Delivery]]:
    grouped: Dict[int, List[Delivery]] = {}
    for delivery, seconds in pairs:
        if delivery is not None and delivery.token is not None:
            grouped.setdefault(seconds, []).append(delivery)
    return grouped


def _chunks(items: List[str], size: int) -> Iterable[List[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _ack_failures(exc: gexc.GoogleAPICallError) -> Optional[Dict[str, str]]:
    """ack id -> reason, when the error is exactly-once delivery's per-ack-id refusal."""
    if getattr(exc, "reason", None) != "EXACTLY_ONCE_ACKID_FAILURE":
        return None
    metadata = getattr(exc, "metadata", None)
    return dict(metadata) if metadata else None

