"""Intake, the books' side of reading: what to take from the queue system each tick (what
waits unclaimed, new deliveries, due retries from the retry set) as far as there is room,
and, on a transport that must be drained (pub/sub), overflow staged in the retry set so
memory stays bounded; the leases of what is held kept alive. The books accept what is
read (books.py).

The clock is passed in. The supervisor owns the connection: it hands in how to flush and
whom to tell a TransportError (it reconnects).
"""
from __future__ import annotations

from typing import Callable

from asyncproc import messages, metrics
from asyncproc.books import Books
from asyncproc.timers import Timer
from asyncproc.transports import Transport, TransportError

RECEIVE_BATCH = 2000         # messages read from the transport per tick, at most
RETRY_POLL_SECONDS = 0.1     # how often the retry set is asked for due entries


class Intake:
    def __init__(self, transport: Transport, books: Books, metrics_: metrics.Metrics, capacity: int) -> None:
        self.transport = transport
        self.books = books
        self.metrics = metrics_
        self.capacity = capacity             # held at most: --concurrency + --intake-buffer
        self.retry_poll = Timer()            # set to 0 on (re)connect: ask at once
        self.more_to_read = False            # the last read was a full batch: do not sleep
        self.subscriber_drops = 0            # the transport's count, last seen
        self.lease_renewal = Timer(transport.keep_alive_interval)

    def step(self, now: float, flush: Callable[[], bool], down: Callable[[Exception], None]) -> None:
        """New messages and due retries, as far as there is room (pub/sub: drain it all).
        `flush` writes the outbox and says whether the queue system still answers; `down`
        is told a TransportError."""
        books, transport = self.books, self.transport
        if books.unclaimed:
            if not flush():  # results first: a claim that keeps failing must not hold them back
                return
        try:
            if books.unclaimed:
                books.claim_and_accept(transport, [])
            if transport.must_drain:
                deliveries = transport.receive(RECEIVE_BATCH)
                self.more_to_read = len(deliveries) == RECEIVE_BATCH
                books.accept_new(transport, deliveries, now)
            room = self.capacity - len(books.ledger)
            if room > 0 and self.retry_poll.due(now):
                claimed = transport.claim_due(now, room)
                for delivery in claimed:
                    books.isolation.run("retry", None, delivery, books.accept_retry, delivery, now)
                room -= len(claimed)
                if room > 0 and not transport.must_drain:
                    deliveries = transport.receive(room)
                    books.accept_new(transport, deliveries, now)
                    room -= len(deliveries)
                self.retry_poll.set(now if room <= 0 else now + RETRY_POLL_SECONDS)
        except TransportError as exc:
            down(exc)
        drops = transport.subscriber_drops
        if drops != self.subscriber_drops:
            self.metrics.subscriber_dropped.inc(drops - self.subscriber_drops)
            self.subscriber_drops = drops
        if transport.must_drain:
            self.stage_overflow(now)

    def stage_overflow(self, now: float) -> None:
        """Keep memory bounded: what exceeds capacity waits in Redis, due now. A message
        never dispatched goes back as it came when the transport kept it (`restages`:
        nothing to encode, and its record stays); anything else goes to the retry set."""
        ledger, outbox = self.books.ledger, self.books.outbox
        excess = len(ledger) - self.capacity
        waiting = ledger.waiting_by_queue
        restages = self.transport.restages
        while excess > 0 and waiting:
            queue = max(waiting, key=lambda q: len(waiting[q]))
            if not waiting[queue]:
                return
            entry = ledger.take_last(queue)
            delivery = entry.delivery
            if restages and not entry.dispatched_at and delivery is not None and delivery.state is None:
                outbox.staged.append((delivery, entry.request.received_at))
            else:
                outbox.retries.append((messages.encode_state(entry.request), now, delivery))
            self.metrics.of(self.metrics.staged, queue).inc()
            excess -= 1

    def keep_alive(self, now: float) -> None:
        """Extend the leases of everything held, so no other replica takes it over. Raises
        TransportError."""
        if self.transport.keep_alive_interval is None or not self.lease_renewal.every(now):
            return
        held = self.books.ledger.deliveries()
        if held:
            self.transport.keep_alive(held)
