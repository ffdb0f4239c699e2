"""What a cancellation does to each held request: pure."""
from asyncproc import cancelwatch, messages
from asyncproc.ledger import Ledger
from asyncproc.messages import Cancellations, Request
from asyncproc.outcomes import Kind, Outcome

NOW = 1_700_000_000.0


def held():
    """a1 in flight on worker 0, a2 and a3 on worker 1; w1 and w2 waiting."""
    ledger = Ledger()
    for rid, token, worker in (("a1", "t", 0), ("a2", None, 1), ("a3", "t", 1)):
        ledger.admit(Request(rid, NOW + 60, {}, "q", NOW, token=token))
        ledger.assign(ledger.take("q").key, worker, NOW)
    for rid, token in (("w1", "t"), ("w2", None)):
        ledger.admit(Request(rid, NOW + 60, {}, "q", NOW, token=token))
    return ledger


def key(rid):
    return messages.id_key(rid)


def test_waiting_are_withdrawn_in_flight_aborted_once():
    ledger = held()
    entries = ledger.unfinished()
    named = Cancellations(ids=frozenset({key("w2"), key("a2")}))
    plan = cancelwatch.plan(entries, named, {key("w1"), key("a1"), key("a3")}, aborting={key("a3")})
    assert sorted(e.request.id for e in plan.withdraw) == ["w1", "w2"]
    assert plan.abort == {0: [key("a1")], 1: [key("a2")]}


def test_only_requests_with_a_token_are_looked_up():
    requests = [Request("a", NOW + 60, {}, "q", NOW, token="t"), Request(5, NOW + 60, {}, "q", NOW, token="u"),
                Request("b", NOW + 60, {}, "q", NOW)]
    assert [cancelwatch.marker_query(r) for r in cancelwatch.with_tokens(requests)] == [("a", "t"), ("5", "u")]


def test_an_answer_that_came_first_stands_anything_else_is_cancelled():
    assert cancelwatch.answer_of_aborted(Outcome(Kind.OK, 200, b"{}"))
    assert cancelwatch.answer_of_aborted(Outcome(Kind.FATAL, 400, b"no"))
    assert not cancelwatch.answer_of_aborted(Outcome(Kind.RETRY, 503, b""))
    assert not cancelwatch.answer_of_aborted(Outcome(Kind.RETRY, None, None, "connection error"))
    assert not cancelwatch.answer_of_aborted(Outcome(Kind.CANCELLED))
