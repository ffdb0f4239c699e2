"""The books: the ledger of held requests, the outbox of writes not yet made, and the
cancellations in force. Deliveries are accepted here, outcomes settled, unfinished work put
back, and what is written forgotten; what is read each tick, claimed, and staged as overflow
is intake.py's.

The one owner of "publish before acknowledge" (README: delivery guarantees): a delivery is
settled in the same write as what replaces it (result, retry, dead letter), and the ledger
forgets an id only after that write succeeded. A message's or a write's fault costs only
that item (isolation.py). The clock is passed in; the transport is handed to the call
that uses it (flush).
"""
from __future__ import annotations

import dataclasses
import logging
import random
from typing import Callable, Dict, List, Optional

import orjson

from asyncproc import cancelwatch, llmd, messages, metrics, retry, tracing
from asyncproc.config import Settings
from asyncproc.isolation import MessageIsolation, WriteIsolation
from asyncproc.ledger import Entry, Ledger
from asyncproc.messages import DeadLetter, Rejected, Request, Result
from asyncproc.outcomes import Kind, Outcome
from asyncproc.transports import Delivery, ResultRoute, Transport, Writes

log = logging.getLogger("asyncproc.supervisor")


class Books:
    def __init__(self, settings: Settings, metrics_: metrics.Metrics, clock: Callable[[], float],
                 rng: random.Random) -> None:
        self.settings = settings
        self.metrics = metrics_
        self.clock = clock
        self.rng = rng
        self.ledger = Ledger(settings.dispatch.order)
        self.outbox = Writes()
        self.outbox_keys: List[str] = []     # ledger keys to forget once the outbox is written
        self.settle_later: List[Delivery] = []   # their replacement written; settled by the next write
        self.cancelled = messages.Cancellations()
        self.limits = settings.message_limits()
        self.aborting: set = set()           # keys whose in-flight attempt is being aborted (cancelled)
        self.preempting: set = set()         # keys whose in-flight attempt is being aborted (preempted)
        self.marked: set = set()             # keys found cancelled by llm-d-async's marker (intake.py fills it)
        self.result_queues = {q.name: q.result_queue for q in settings.request_queues if q.result_queue}
        self.tracing: tracing.Off = tracing.Off()   # the Supervisor hands in the Dispatcher's
        self.isolation = MessageIsolation(self, metrics_)
        self.write_isolation = WriteIsolation(metrics_, settings.messages.result_format)

    # -- intake (read and claimed by intake.py) ----------------------------------------------
    def accept_retry(self, delivery: Delivery, now: float) -> None:
        """A due retry, a put-back request, or work abandoned by a holder that died."""
        if delivery.state is not None:
            parsed = messages.decode_state(delivery.state, delivery.queue)
        elif delivery.received is not None:  # staged as it came: parsed as it was then
            parsed = self.isolation.parse(delivery, delivery.received, self.limits)
            if isinstance(parsed, Request) and parsed.refused_headers:
                parsed = dataclasses.replace(parsed, refused_headers=())  # counted when first taken in
        else:
            parsed = self.isolation.parse(delivery, now, self.limits)
        if isinstance(parsed, Request) and parsed.deadline <= now:
            if not self.ledger.holds(parsed.key):
                self.finish(parsed, messages.result_of(parsed, False, retry.deadline_exceeded(parsed.last_error)),
                            delivery, retry.DEADLINE)
            else:
                self.outbox.drops.append(delivery)
            return
        self.accept(parsed, delivery)

    def accept(self, parsed, delivery: Optional[Delivery] = None) -> None:
        if isinstance(parsed, DeadLetter):
            self.metrics.of(self.metrics.bad_messages, parsed.queue, "dead-letter").inc()
            self.metrics.of(self.metrics.dead_letters, parsed.queue).inc()
            log.warning("dead-lettering a message from %s: %s", parsed.queue or "retry set",
                        parsed.reason)
            self.outbox.dead_letters.append((messages.encode_dead_letter(parsed), delivery))
        elif isinstance(parsed, Rejected):
            if self.ledger.holds(parsed.key):
                self._duplicate(parsed.key, parsed.queue, delivery)
                return
            self.metrics.of(self.metrics.bad_messages, parsed.queue, "error-result").inc()
            log.warning("id=%s rejected: %s", parsed.key, parsed.reason, extra={"id": parsed.id})
            self.queue_result(messages.rejected_result(parsed), delivery)
            self.metrics.of(self.metrics.results, parsed.queue, parsed.code).inc()
        elif (self.cancelled.covers(parsed) or parsed.key in self.marked) and not self.ledger.holds(parsed.key):
            log.info("id=%s cancelled", parsed.key, extra={"id": parsed.id})
            self.finish(parsed, messages.cancelled_result(parsed), delivery, messages.CANCELLED)
        elif not self.ledger.admit(parsed, delivery):
            self._duplicate(parsed.key, parsed.queue, delivery)
        else:
            for reason in parsed.refused_headers:  # counted once, when it is taken in
                self.metrics.of(self.metrics.headers_refused, parsed.queue, reason).inc()
            self.tracing.received(parsed)

    def _duplicate(self, key: str, queue: str, delivery: Optional[Delivery]) -> None:
        self.metrics.of(self.metrics.skipped, queue, "in-flight").inc()
        if delivery is not None and delivery.token is not None:
            self.outbox.drops.append(delivery)
        log.warning("id=%s is already being processed; duplicate delivery ignored", key)

    # -- outcomes ----------------------------------------------------------------------------
    def conclude(self, entry: Entry, outcome: Outcome, now: float) -> None:
        """A settled entry's outcome: a retry at its due time, or its result."""
        before = entry.request
        request = before.after_attempt(None if outcome.kind is Kind.OK else outcome.describe())
        decision = retry.decide(outcome, request.attempts, request.deadline, now,
                                self.settings.retry.backoff, self.rng, self.settings.retry.max_attempts,
                                last_error=before.last_error)
        key = request.key
        if isinstance(decision, retry.RetryAt):
            self.metrics.of(self.metrics.retries, request.queue, outcome.kind.value).inc()
            log.debug("id=%s attempt %d failed (%s); retry in %.2fs", key, request.attempts,
                      outcome.describe(), decision.due - now, extra={"id": request.id})
            self.outbox.retries.append((messages.encode_state(request), decision.due, entry.delivery))
            self.outbox_keys.append(key)
            return
        attempts = request.attempts if outcome.kind is not Kind.EXPIRED else before.attempts
        result = messages.result_of(request, decision.ok, decision.reason, status_code=outcome.status,
                                    body=outcome.body, attempts=attempts,
                                    code=llmd.CANCELLED if decision.code == retry.CANCELLED else None)
        if not decision.ok:
            log.warning("id=%s failed after %d attempts: %s", key, attempts, decision.reason,
                        extra={"id": request.id})
        self.finish(request, result, entry.delivery, decision.code)

    def finish(self, request: Request, result: Result, delivery: Optional[Delivery], code: str) -> None:
        self.queue_result(result, delivery)
        self.tracing.finished(request, result, code)
        self.metrics.of(self.metrics.results, request.queue, code).inc()
        self.metrics.of(self.metrics.end_to_end, request.queue).observe(
            max(self.clock() - (request.created or request.received_at), 0.0))
        if self.ledger.holds(request.key):
            self.outbox_keys.append(request.key)

    def queue_result(self, result: Result, delivery: Optional[Delivery]) -> None:
        """Encode a result into the outbox; one larger than --max-result-bytes becomes an
        error result naming its size (on every transport: Redis and its subscribers have
        limits of their own)."""
        raw = messages.encode_result(result, self.settings.messages.result_format)
        limit = self.settings.messages.max_result_bytes
        if len(raw) > limit:
            log.warning("id=%s: result of %d bytes is over --max-result-bytes (%d); writing an error"
                        " result instead", result.key, len(raw), limit, extra={"id": result.id})
            raw = messages.encode_result(Result(
                result.id, result.queue, False, f"result too large: {len(raw)} bytes, limit {limit}",
                status_code=result.status_code, attempts=result.attempts, metadata=result.metadata,
                token=result.token), self.settings.messages.result_format)
        self.outbox.results.append((result.key, raw, delivery))
        destination = llmd.result_queue(self.result_queues.get(result.queue), result.reply_to)
        if destination or result.token:  # llm-d-async: where it goes, which marker it releases
            self.outbox.routes[result.key] = ResultRoute(
                destination, str(result.id) if result.token else None, result.token)

    def cancel(self, batches, ids, marked=frozenset(), held: Optional[List[Entry]] = None) -> Dict[int, List[str]]:
        """Cancellations in force (`asyncproc cancel`'s; `marked`: keys whose llm-d-async
        marker holds their token): waiting requests they cover are answered now; those in
        flight are returned by worker, to be aborted there (answered when the worker
        reports, never retried). Later arrivals are answered at intake."""
        if batches != self.cancelled.batches or ids != self.cancelled.ids:
            self.cancelled = messages.Cancellations(batches, ids)
        if not (self.cancelled.batches or self.cancelled.ids or marked):
            return {}
        held = self.ledger.unfinished() if held is None else held
        todo = cancelwatch.plan(held, self.cancelled, marked, self.aborting)
        for entry in todo.withdraw:
            self.ledger.withdraw(entry.request.key)
            self.finish(entry.request, messages.cancelled_result(entry.request), entry.delivery, messages.CANCELLED)
        if todo.withdraw:
            log.info("cancelled %d waiting requests: %s", len(todo.withdraw),
                     " ".join(e.request.key for e in todo.withdraw[:20]))
        return todo.abort

    def aborted(self, key: str, outcome: Outcome) -> Outcome:
        """The outcome of an attempt being aborted (its request cancelled in flight): the
        gateway's answer if it came first, else CANCELLED (never retried)."""
        if key not in self.aborting:
            return outcome
        self.aborting.discard(key)
        if cancelwatch.answer_of_aborted(outcome):
            return outcome
        return Outcome(Kind.CANCELLED, error="cancelled", elapsed=outcome.elapsed)

    def preempted(self, key: str, outcome: Outcome) -> bool:
        """Was this attempt preempted (aborted to free its pool slot for online requests)?
        If so the request waits again, first in line, the attempt not counted (no back-off,
        --max-attempts untouched, its deadline as before). A gateway's answer that came
        first stands, and a cancellation in force wins over a preemption."""
        if key not in self.preempting:
            return False
        self.preempting.discard(key)
        if key in self.aborting or outcome.kind is not Kind.CANCELLED:
            return False
        return self.ledger.requeue(key) is not None

    # -- answers for isolation.MessageIsolation ----------------------------------------------
    def answer_with_error(self, item, reason: str, delivery: Optional[Delivery]) -> None:
        """Answer a request (or a rejected message) with an error result; the ledger lets go
        of it once that is written."""
        key = item.key
        if self.ledger.holds(key):
            entry = self.ledger.withdraw(key) or self.ledger.settle(key) or self.ledger.entry(key)
            delivery = delivery or entry.delivery
            self.outbox_keys.append(key)
        self.queue_result(messages.result_of(item, False, reason), delivery)

    def dead_letter(self, raw: bytes, reason: str, queue: str, delivery: Optional[Delivery]) -> None:
        self.outbox.dead_letters.append((messages.encode_dead_letter(
            DeadLetter(bytes(raw[:messages.RAW_EXCERPT_BYTES]), reason, queue, self.clock())), delivery))

    # -- drain -------------------------------------------------------------------------------
    def put_back(self, entries: List[Entry], now: float) -> None:
        """Unfinished work goes to the retry set, due now, so a restarted asyncproc finishes it.

        The ledger lets go at once: intake has stopped, and a late outcome for a request put
        back is ignored (it will be dispatched again: at-least-once).
        """
        for entry in entries:
            self.outbox.retries.append((messages.encode_state(entry.request), now, entry.delivery))
            self.ledger.forget(entry.request.key)
        if entries:
            log.info("putting back %d unfinished requests", len(entries))

    def log_unwritten(self, why: str = "") -> None:
        """The outbox is given up: the ids of its results and put-backs, logged as lost."""
        lost = [k for k, _, _ in self.outbox.results] + [orjson.loads(raw).get("id") for raw, _, _ in self.outbox.retries]
        log.error(why + "%d results and put-backs not written (ids: %s)", len(lost), " ".join(map(str, lost[:100])))

    # -- writing -----------------------------------------------------------------------------
    def flush(self, transport: Transport) -> Optional[Exception]:
        """Write the outbox, then forget what it settled. None when everything is written;
        the failure when the queue system is unreachable (the outbox keeps what is unwritten).
        On a transport that `settles_later`, the deliveries of the results and dead letters
        written are settled by the next flush (as drops): one round trip a flush."""
        if not self.outbox and not self.settle_later:
            return None
        self.outbox.drops.extend(self.settle_later)
        self.settle_later = []
        written = self.outbox
        try:
            transport.write(written)
        except Exception as exc:  # TransportError, or a transport's bug on one item
            failure, written = self.write_isolation.write_item_by_item(transport, written, exc)
            if failure is not None:
                self.outbox = written
                return failure
        for key in self.outbox_keys:
            self.ledger.forget(key)
        if transport.settles_later:
            self.settle_later = [d for d in ([d for _, _, d in written.results] + [d for _, d in written.dead_letters])
                                 if d is not None and d.token is not None]
        self.outbox, self.outbox_keys = Writes(), []
        return None

    def unwritten(self) -> bool:
        """Anything left to write: the outbox, or deliveries to settle."""
        return bool(self.outbox or self.settle_later)
