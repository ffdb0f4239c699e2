"""What /readyz, /healthz and /metrics show of the loop: readiness and the last tick on
every tick, the in-flight and held gauges every GAUGE_SECONDS, and the queue system's own
counts (after its tidy-up) every QUEUE_STATS_SECONDS. The clock is passed in."""
from __future__ import annotations

import time
from typing import Optional

from asyncproc import metrics
from asyncproc.ledger import State
from asyncproc.timers import Timer
from asyncproc.transports import Transport

QUEUE_STATS_SECONDS = 5.0
GAUGE_SECONDS = 0.25


class Gauges:
    def __init__(self, metrics_: metrics.Metrics, health: metrics.Health, books, dispatcher, pool,
                 transport: Transport) -> None:
        self.metrics = metrics_
        self.health = health
        self.books = books
        self.dispatcher = dispatcher
        self.pool = pool
        self.transport = transport
        self.gauges = Timer(GAUGE_SECONDS)
        self.stats = Timer(QUEUE_STATS_SECONDS)

    def update(self, now: float, not_running: Optional[str], connected: bool) -> None:
        """`not_running`: the lifecycle state when it is not RUNNING, else None. Raises
        TransportError when the queue system's counts cannot be read."""
        health = self.health
        health.last_tick = time.monotonic()
        alive = self.pool.alive()
        if not_running is not None:
            health.ready, health.reason = False, not_running
        elif not connected:
            health.ready, health.reason = False, "queue system unreachable"
        elif alive == 0:
            health.ready, health.reason = False, "no worker ready"
        else:
            health.ready, health.reason = True, "ready"
        if not self.gauges.every(now):
            return
        m, dispatcher, ledger = self.metrics, self.dispatcher, self.books.ledger
        m.observe(ledger.assigned_by_queue(), dispatcher.routes, ledger.count(State.WAITING),
                  dispatcher.aimd_state.in_flight if dispatcher.aimd_state is not None else None,
                  dispatcher.held, alive, len(self.books.outbox))
        if connected and self.stats.every(now):
            self.transport.tidy(now)
            for name, by_queue in self.transport.stats().items():
                for queue, value in by_queue.items():
                    m.queue_gauges[name].labels(queue).set(value)
