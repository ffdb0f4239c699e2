"""Isolation: one item's fault costs that item, never the loop and never another item.

`MessageIsolation`: an unexpected exception in one message's step (accept, settle, retry,
dispatch) costs that message an error result (a dead letter when it has no usable id), a
count and one log line; in parsing, a dead letter; in a batch's claim, the claim (the
messages are processed unclaimed). `WriteIsolation`: when a batch write fails while the queue system
still answers, the items are written one at a time, and one refused on its own (over
proto-max-bulk-len, ...) is replaced by an error result (outbox.py: what replaces it).
"""
from __future__ import annotations

import logging
from typing import Callable, List, Optional, Tuple

from asyncproc import messages, metrics, outbox
from asyncproc.messages import DeadLetter, Rejected, Request
from asyncproc.transports import Delivery, Transport, TransportError, Unconfirmed, Writes

log = logging.getLogger("asyncproc.supervisor")


class MessageIsolation:
    def __init__(self, books, metrics_: metrics.Metrics) -> None:
        self.books = books          # answers the message (books.Books)
        self.metrics = metrics_

    def run(self, stage: str, item, delivery: Optional[Delivery], call: Callable, *args) -> None:
        """One message's step: `call(*args)`. `item` is what to answer if it raises: a
        request, an id key the ledger knows, or None (then the delivery's retry state)."""
        try:
            call(*args)
        except Exception as exc:
            if isinstance(item, str):  # an id key (an outcome's): the ledger knows the request
                entry = self.books.ledger.entry(item)
                item = entry.request if entry is not None else None
            if item is None and delivery is not None and delivery.state is not None:
                decoded = messages.decode_state(delivery.state, delivery.queue)
                item = decoded if isinstance(decoded, Request) else None
            self.internal_error(stage, exc, item, delivery)

    def parse(self, delivery: Delivery, now: float, limits):
        """The delivery parsed (messages.parse_request never raises; if it does, one message
        pays: a dead letter)."""
        try:
            return messages.parse_request(delivery.raw, delivery.queue, now, limits)
        except Exception as exc:
            self.metrics.of(self.metrics.internal_errors, delivery.queue, "parse").inc()
            log.error("internal error while parsing a message from %s (%s); dead-lettering it",
                      delivery.queue, type(exc).__name__)
            return DeadLetter(bytes(delivery.raw[:messages.RAW_EXCERPT_BYTES]), "internal error while parsing",
                              delivery.queue, now)

    def claim(self, transport: Transport, pairs: List[tuple]) -> List[bool]:
        """Which of the (parsed, delivery) pairs are ours; TransportError when the claim
        fails. A bug on this batch's ids costs the claim, not the messages: all are ours."""
        try:
            return transport.claim([item.key for item, _ in pairs], [d for _, d in pairs])
        except TransportError:
            raise
        except Exception as exc:
            self.metrics.of(self.metrics.internal_errors, pairs[0][1].queue, "claim").inc()
            log.error("internal error while claiming %d ids (%s); processing them unclaimed",
                      len(pairs), type(exc).__name__)
            return [True] * len(pairs)

    def internal_error(self, stage: str, exc: Exception, item, delivery: Optional[Delivery]) -> None:
        queue = getattr(item, "queue", None) or (delivery.queue if delivery is not None else "")
        self.metrics.of(self.metrics.internal_errors, queue, stage).inc()
        reason = f"internal error while {stage} ({type(exc).__name__})"
        if isinstance(item, (Request, Rejected)) and messages.usable_id(item.id):
            log.error("id=%s: %s; answering it with an error result", item.key, reason, extra={"id": item.id})
            self.books.answer_with_error(item, reason, delivery)
            return
        log.error("%s on a message from %s; dead-lettering it", reason, queue or "the retry set")
        self.books.dead_letter(delivery.raw if delivery is not None else b"", reason, queue, delivery)


class WriteIsolation:
    def __init__(self, metrics_: metrics.Metrics, result_format: str) -> None:
        self.metrics = metrics_
        self.result_format = result_format

    def write_item_by_item(self, transport: Transport, writes: Writes,
                           failure: Exception) -> Tuple[Optional[Exception], Writes]:
        """Writing `writes` failed with `failure`. If the queue system still answers, one
        item may be what it refuses: write the items one at a time and replace each one
        refused on its own by an error result (a dead letter: dropped, logged). Returns
        (None, what was written) when everything is written, else (`failure`, what is still
        to write, the replacements made so far included)."""
        if isinstance(failure, Unconfirmed):  # written, not yet on enough replicas: wait
            return failure, writes
        try:
            transport.ping()
        except TransportError:
            return failure, writes
        fixed = Writes()
        items = outbox.singles(writes)
        for n, single in enumerate(items):
            try:
                try:
                    transport.write(single)
                except Exception:
                    transport.write(single)  # once more: a passing fault is not the item's
            except Exception as exc:
                replacement = outbox.replacement(single, exc, self.result_format)
                try:
                    transport.write(replacement)
                except Exception:
                    # the queue system refuses even a small write: not this item's fault
                    for rest in items[n:]:
                        outbox.extend(fixed, rest)
                    return failure, fixed
                kind = outbox.kind_of(single)
                self.metrics.of(self.metrics.writes_refused, kind).inc()
                log.error("the queue system refused a %s on its own (%s); %s instead", kind,
                          str(exc)[:200], "an error result was written" if kind != "dead letter"
                          else "it was dropped")
                single = replacement
            outbox.extend(fixed, single)
        return None, fixed
