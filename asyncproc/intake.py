"""Intake, the books' side of reading: what to take from the queue system each tick (what
waits unclaimed, new deliveries, due retries from the retry set) as far as there is room,
and, on a transport that must be drained (pub/sub), overflow staged in the retry set so
memory stays bounded; the leases of what is held kept alive. The books accept what is
read (books.py).

The clock is passed in. The supervisor owns the connection: it hands in how to flush and
whom to tell a TransportError (it reconnects).
"""
from __future__ import annotations

import heapq
import math
from typing import Callable, List, Set

from asyncproc import messages, metrics
from asyncproc.books import Books
from asyncproc.timers import Backoff, Timer
from asyncproc.transports import Transport, TransportError

RECEIVE_BATCH = 2000         # messages read from the transport per tick, at most
RETRY_POLL_SECONDS = 0.1     # how often the queues and the retry set are asked while that finds work,
IDLE_POLL_SECONDS = 1.0      # and at most this long apart (doubling) while it finds nothing
OWN_DUE_MAX = 10_000         # due times of our own retries remembered, at most (one per RETRY_POLL_SECONDS)


class Intake:
    def __init__(self, transport: Transport, books: Books, metrics_: metrics.Metrics, capacity: int) -> None:
        self.transport = transport
        self.books = books
        self.metrics = metrics_
        self.capacity = capacity             # held at most: --concurrency + --intake-buffer
        self.retry_poll = Timer()            # when to ask next (poll_now on (re)connect)
        self.poll_wait = Backoff(RETRY_POLL_SECONDS, IDLE_POLL_SECONDS)
        self.own_due: List[float] = []       # heap: when retries this process wrote fall due
        self._own_slots: Set[float] = set()
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
                room = self.capacity - len(books.ledger) if transport.restages else None
                books.accept_new(transport, deliveries, now, room)
            room = self.capacity - len(books.ledger)
            if room > 0 and self.retry_poll.due(now):
                claimed = transport.claim_due(now, room)
                for delivery in claimed:
                    books.isolation.run("retry", None, delivery, books.accept_retry, delivery, now)
                room -= len(claimed)
                found = bool(claimed)
                if room > 0 and not transport.must_drain:
                    deliveries = transport.receive(room)
                    books.accept_new(transport, deliveries, now)
                    room -= len(deliveries)
                    found = found or bool(deliveries)
                self.retry_poll.set(now if room <= 0 else self.next_poll(now, found))
        except TransportError as exc:
            down(exc)
        drops = transport.subscriber_drops
        if drops != self.subscriber_drops:
            self.metrics.subscriber_dropped.inc(drops - self.subscriber_drops)
            self.subscriber_drops = drops
        if transport.must_drain:
            self.stage_overflow(now)
        self.expect_own(now)

    def poll_now(self) -> None:
        """Ask at once, and every RETRY_POLL_SECONDS while that finds work ((re)connected)."""
        self.retry_poll.set(0.0)
        self.poll_wait.reset()

    def next_poll(self, now: float, found: bool) -> float:
        """When to ask next: RETRY_POLL_SECONDS from now while asking finds work, backing off
        while it does not, but never after a retry this process wrote falls due."""
        at = now + self.poll_wait.after(found)
        own = self.own_due
        while own and own[0] <= now:
            self._own_slots.discard(heapq.heappop(own))
        return min(at, own[0]) if own else at

    def expect_own(self, now: float) -> None:
        """Retries this process is about to write are asked for when due, and staged overflow
        at once, however far polling has backed off. Due times are kept to the next
        RETRY_POLL_SECONDS step, OWN_DUE_MAX at most: past that, a retry of ours is found
        like another replica's, IDLE_POLL_SECONDS late at most."""
        outbox = self.books.outbox
        if outbox.staged:
            self.retry_poll.set(min(self.retry_poll.at, now))
        for _, due, _ in outbox.retries:
            slot = math.ceil(due / RETRY_POLL_SECONDS) * RETRY_POLL_SECONDS
            if slot not in self._own_slots and len(self.own_due) < OWN_DUE_MAX:
                self._own_slots.add(slot)
                heapq.heappush(self.own_due, slot)
        if self.own_due and self.own_due[0] < self.retry_poll.at:
            self.retry_poll.set(max(self.own_due[0], now))

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
