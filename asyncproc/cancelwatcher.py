"""The cancellation watch: reads from the transport which held requests are cancelled and
has it carried out (cancelwatch.py holds the plan). The books answer the waiting ones; the
workers holding the ones in flight are asked to abort them.

A failed read raises TransportError: the supervisor owns reconnecting.
"""
from __future__ import annotations

import logging
from typing import Dict, List

from asyncproc import cancelwatch, messages, metrics
from asyncproc.books import Books
from asyncproc.config import Settings
from asyncproc.messages import Request
from asyncproc.outcomes import Assignment
from asyncproc.timers import Timer
from asyncproc.transports import Transport

log = logging.getLogger("asyncproc.supervisor")


class CancelWatcher:
    def __init__(self, settings: Settings, transport: Transport, books: Books, pool,
                 metrics_: metrics.Metrics) -> None:
        self.transport = transport
        self.books = books
        self.pool = pool
        self.metrics = metrics_
        self.poll = Timer(settings.operations.cancel_poll_interval)

    def refresh(self, now: float) -> None:
        """Every --cancel-poll-interval: read what `asyncproc cancel` named and, in one
        pipelined read, llm-d-async's markers of the held requests with a token. The books
        answer the waiting ones covered; in-flight ones are aborted by their workers."""
        if not self.poll.every(now):
            return
        tokened = self.books.ledger.tokened()
        batches, ids = self.transport.cancellations(now)
        hits = self.transport.cancelled_tokens([cancelwatch.marker_query(r) for r in tokened]) if tokened else []
        self.metrics.cancel_reads.inc()
        self.metrics.cancel_watched.set(len(tokened))
        marked = {r.key for r, hit in zip(tokened, hits) if hit}
        abort = self.books.cancel(batches, ids, marked)  # the held requests are scanned only if covered
        handles = {h.index: h for h in self.pool.handles}
        for index, keys in abort.items():
            handle = handles.get(index)
            if handle is not None and self.pool.send_cancel(handle, keys):
                self.books.aborting.update(keys)
                log.info("aborting %d cancelled requests in flight on worker %d: %s", len(keys), index,
                         " ".join(keys[:20]))

    def before_send(self, requests: List[Request],
                    sends: Dict[int, List[Assignment]]) -> Dict[int, List[Assignment]]:
        """llm-d-async checks a request's cancel marker just before dispatch: so do we, one
        read for the batch; what is cancelled is answered and left out of `sends`."""
        marked = self.transport.cancelled_tokens([cancelwatch.marker_query(r) for r in requests])
        gone = {r.key for r, hit in zip(requests, marked) if hit}
        if not gone:
            return sends
        ledger = self.books.ledger
        for key in gone:
            entry = ledger.settle(key)
            if entry is not None:
                log.info("id=%s cancelled before dispatch", key, extra={"id": entry.request.id})
                self.books.finish(entry.request, messages.cancelled_result(entry.request), entry.delivery,
                                  messages.CANCELLED)
        return {i: kept for i, jobs in sends.items() if (kept := [j for j in jobs if j.key not in gone])}
