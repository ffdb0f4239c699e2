"""The supervisor's link to the queue system: whether it answers, when to connect again,
and saying so once per outage. The back-off grows from RECONNECT_MIN to RECONNECT_MAX
until a write succeeds again: a successful connect alone resets nothing (README: What
asyncproc promises under faults). The clock is passed in."""
from __future__ import annotations

import logging
from typing import Callable

from asyncproc import metrics, redact
from asyncproc.timers import Timer
from asyncproc.transports import Transport, TransportError

log = logging.getLogger("asyncproc.supervisor")

RECONNECT_MIN, RECONNECT_MAX = 0.2, 10.0


class Link:
    def __init__(self, transport: Transport, metrics_: metrics.Metrics, clock: Callable[[], float],
                 on_connect: Callable[[], None]) -> None:
        self.transport = transport
        self.metrics = metrics_
        self.clock = clock
        self.on_connect = on_connect         # what to do afresh once connected (ask for due retries)
        self.connected = False               # the queue system answers (until a call fails)
        self.connected_once = False
        self.outage = False                  # logged as unreachable, no write has succeeded since
        self.reconnect = Timer()
        self.delay = RECONNECT_MIN

    def down(self, exc: Exception) -> None:
        """Stop using the queue system until the next reconnect, backing off further."""
        self.metrics.transport_errors.inc()
        if not self.outage:  # once per outage; at start-up, say why the first connect failed
            if self.connected_once:
                log.error("queue system unreachable: %s; reconnecting", exc)
            else:
                text = str(exc)
                why = redact.cause(text)
                log.error("cannot connect to the queue system: %s; retrying",
                          text if why in text else f"{why}: {text}")
            self.outage = True
        self.connected = False
        self.reconnect.after(self.clock(), self.delay)
        self.delay = min(self.delay * 2, RECONNECT_MAX)

    def connect(self) -> None:
        try:
            self.transport.connect()
        except TransportError as exc:
            self.down(exc)
            return
        self.connected = self.connected_once = True
        self.on_connect()

    def connect_if_due(self, now: float) -> None:
        if not self.connected and self.reconnect.due(now):
            self.connect()

    def written(self) -> None:
        """A write went through (or nothing was left to write): the outage is over."""
        if self.outage:
            log.info("queue system reachable again")
            self.outage = False
        self.delay = RECONNECT_MIN
