"""Intake in-process (intake.py, and the isolation of its parse and claim): what the
end-to-end tests see only with real processes, or not at all."""
import orjson
import pytest

from asyncproc import messages
from asyncproc.intake import IDLE_POLL_SECONDS, OWN_DUE_MAX, RETRY_POLL_SECONDS, Intake
from asyncproc.outcomes import Kind, Outcome
from asyncproc.transports.base import Delivery
from asyncproc.transports.memory import Memory
from tests.inprocess.fakes import Rig, answers_after


def answered(rig, ids):
    return lambda: set(ids) <= set(rig.transport.result_ids())


def test_subscriber_drops_are_counted_as_the_transport_reports_them():
    rig = Rig()
    rig.transport.subscriber_drops = 2
    rig.sup.tick()
    rig.transport.subscriber_drops = 5
    rig.sup.tick()
    rig.sup.tick()
    assert rig.metric(rig.sup.metrics.subscriber_dropped) == 5


def test_a_bug_in_the_claim_costs_the_claim_not_the_messages():
    rig = Rig()

    def claim(keys, deliveries=None):
        raise ValueError("a bug on these ids")

    rig.transport.claim = claim
    rig.requests(["a", "b"])
    rig.run_until(answered(rig, ["a", "b"]))
    assert sorted(rig.transport.result_ids()) == ["a", "b"]
    assert rig.metric(rig.sup.metrics.internal_errors, "batch-queue", "claim") == 1


def test_a_bug_in_parsing_costs_that_message_a_dead_letter(monkeypatch):
    rig = Rig()

    def parse_request(raw, queue, now, limits):
        if b'"bad"' in raw:
            raise TypeError("a bug on this message")
        return real(raw, queue, now, limits)

    real = messages.parse_request
    monkeypatch.setattr(messages, "parse_request", parse_request)
    rig.requests(["bad", "good"])
    rig.run_until(lambda: rig.transport.dead_letters and answered(rig, ["good"])())
    (letter,) = [orjson.loads(raw) for raw in rig.transport.dead_letters]
    assert letter["reason"] == "internal error while parsing" and b'"bad"' in letter["raw"].encode()
    assert rig.transport.result_ids() == ["good"]
    assert rig.metric(rig.sup.metrics.internal_errors, "batch-queue", "parse") == 1



def test_the_leases_of_what_is_held_are_kept_alive_every_interval(monkeypatch):
    monkeypatch.setattr(Memory, "keep_alive_interval", 2.0)
    rig = Rig(gateway=answers_after(7))
    renewed = []
    rig.transport.keep_alive = lambda held: renewed.append((rig.clock(), sorted(d.token for d in held)))
    rig.requests(["a", "b"])
    rig.run_until(answered(rig, ["a", "b"]))
    start = rig.clock()
    rig.run_until(lambda: rig.clock() >= start + 5)
    assert len(renewed) >= 3 and all(tokens == [1, 2] for _, tokens in renewed)
    assert all(later - earlier >= 2.0 for (earlier, _), (later, _) in zip(renewed, renewed[1:]))
    assert renewed[-1][0] < start  # nothing held: nothing to renew


def recording_polls(rig):
    """The fake clock's time at each receive (each time the queues are asked)."""
    asked = []
    receive = rig.transport.receive

    def recorded(limit):
        asked.append(rig.clock())
        return receive(limit)

    rig.transport.receive = recorded
    return asked


def test_an_idle_intake_asks_less_often_and_at_its_pace_again_once_work_comes():
    rig = Rig()
    asked = recording_polls(rig)
    start = rig.clock()
    rig.run_until(lambda: rig.clock() >= start + 20)
    gaps = [b - a for a, b in zip(asked, asked[1:])]
    assert gaps[0] == pytest.approx(RETRY_POLL_SECONDS) and max(gaps) <= IDLE_POLL_SECONDS + 1e-6
    assert gaps[-5:] == pytest.approx([IDLE_POLL_SECONDS] * 5)
    assert len(asked) < 30    # 200 at a steady 0.1 s
    produced = rig.clock()
    rig.requests(["a"])
    rig.run_until(answered(rig, ["a"]))
    assert rig.clock() - produced <= IDLE_POLL_SECONDS + 0.1
    rig.requests(["b"])   # found work: asked at the steady pace again
    produced = rig.clock()
    rig.run_until(answered(rig, ["b"]))
    assert rig.clock() - produced <= RETRY_POLL_SECONDS + 0.1


def test_a_retry_this_process_writes_is_taken_when_due_not_a_backoff_later():
    """Polls have backed off to a second; the retry of a 503 is still taken at its due time."""
    attempts = []

    def gateway(assignment, now):
        attempts.append(now)
        if len(attempts) == 1:
            return Outcome(Kind.RETRY, 503, b"busy", elapsed=0.05), 0.05
        return Outcome(Kind.OK, 200, b"{}", elapsed=0.05), 0.05

    rig = Rig("--retry-policy", "fixed", "--retry-base-delay", "2.3", gateway=gateway)
    start = rig.clock()
    rig.run_until(lambda: rig.clock() >= start + 10)   # polls backed off
    rig.requests(["a"])
    rig.run_until(answered(rig, ["a"]))
    assert len(attempts) == 2
    # due 2.3 s after the 503 came back (0.05 s after the attempt), asked for within one step
    assert 2.35 <= attempts[1] - attempts[0] <= 2.35 + RETRY_POLL_SECONDS + 1e-6


def test_the_due_times_of_our_own_retries_kept_are_bounded():
    """One per RETRY_POLL_SECONDS step, OWN_DUE_MAX at most, however many retries are written."""
    rig = Rig()
    intake, now = rig.sup.inbound, rig.clock()
    rig.sup.books.outbox.retries.extend((b"{}", now + 5 + i * 0.01, None) for i in range(1000))
    intake.expect_own(now)
    assert len(intake.own_due) == 101   # 5.00 s to 14.99 s ahead, in 0.1 s steps
    rig.sup.books.outbox.retries[:] = [(b"{}", now + 20 + i * 0.2, None) for i in range(3 * OWN_DUE_MAX)]
    intake.expect_own(now)
    assert len(intake.own_due) == OWN_DUE_MAX
    rig.sup.books.outbox.retries.clear()


class Restaging(Memory):
    """Pub/sub's shape: it must be drained, and overflow goes back as it came."""

    must_drain = True
    restages = True

    def __init__(self):
        super().__init__(("batch-queue",))
        self.claimed = []

    def claim(self, keys, deliveries=None):
        self.claimed.extend(keys)
        return [True] * len(keys)


def test_plain_overflow_is_claimed_by_its_id_staged_as_it_came_and_parsed_once_when_taken_back(monkeypatch):
    rig = Rig("--concurrency", "1", "--intake-buffer", "1", workers=1, start=False)
    transport = Restaging()
    parsed = []
    real = messages.parse_request
    monkeypatch.setattr(messages, "parse_request", lambda raw, *a: parsed.append(orjson.loads(raw)["id"]) or real(raw, *a))
    now = rig.clock()

    def message(id_value, **fields):
        return orjson.dumps({"id": id_value, "deadline": now + 600, "payload": {"prompt": "p"}, **fields})

    raws = [message("room"), message("plain"), message("headed", headers={"X-A": "1"}),
            orjson.dumps({"id": "no-deadline", "payload": {}}), message("room"), message("plain-2")]
    deliveries = [Delivery(raw, "batch-queue", token=n) for n, raw in enumerate(raws)]
    books = rig.sup.books
    Intake(transport, books, rig.sup.metrics, capacity=2).accept_new(deliveries, now, room=1)

    assert transport.claimed == ['"room"', '"plain"', '"headed"', '"no-deadline"', '"room"', '"plain-2"']
    assert parsed == ["room", "headed", "room"]   # beyond the room, only what is not plain (and a duplicate)
    assert [d.token for d, _ in books.outbox.staged] == [1, 3, 5] and {at for _, at in books.outbox.staged} == {now}
    assert books.ledger.holds('"room"') and books.ledger.holds('"headed"') and books.outbox.drops == [deliveries[4]]
    assert rig.metric(rig.sup.metrics.staged, "batch-queue") == 3
    assert rig.metric(rig.sup.metrics.received, "batch-queue") == 6

    # taken back (claim_due hands them out with when they were received): parsed now, once
    for delivery, at in books.outbox.staged:
        books.accept_retry(Delivery(delivery.raw, "batch-queue", token=delivery.token, received=at), now + 1)
    assert parsed == ["room", "headed", "room", "plain", "no-deadline", "plain-2"]
    assert books.ledger.holds('"plain"') and books.ledger.holds('"plain-2"')
    (key, raw, _), = books.outbox.results
    assert key == '"no-deadline"' and orjson.loads(raw)["error"] == "deadline missing"
