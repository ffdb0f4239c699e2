from asyncproc.ledger import Ledger, State
from asyncproc.messages import Request


def req(i, queue="q"):
    return Request(i, 2e9, {"prompt": str(i)}, queue, 1.0)


def test_deliveries_travel_with_entries():
    ledger = Ledger()
    ledger.admit(req("a"), delivery="token-a")
    ledger.admit(req("b"))
    assert ledger.deliveries() == ["token-a"]
    assert ledger.settle(req("a").key) is None  # not assigned yet
    r = ledger.take("q")
    ledger.assign(r.key, 0, 1.0)
    assert ledger.settle(r.key).delivery == "token-a"


def test_one_entry_per_id():
    ledger = Ledger()
    assert ledger.admit(req("a"))
    assert not ledger.admit(req("a", queue="other"))
    assert ledger.admit(req(1)) and ledger.admit(req("1"))  # 1 and "1" are different ids
    assert len(ledger) == 3


def test_life_of_a_request():
    ledger = Ledger()
    ledger.admit(req("a"))
    request = ledger.take("q")
    ledger.assign(request.key, 0, 10.0)
    assert ledger.count(State.ASSIGNED) == 1 and ledger.assigned_count(0) == 1
    entry = ledger.settle(request.key)
    assert entry.state is State.SETTLING
    assert ledger.settle(request.key) is None  # a second report is stale
    assert not ledger.admit(req("a"))  # still held until its result is written
    ledger.forget(request.key)
    assert len(ledger) == 0 and ledger.admit(req("a"))


def test_dead_worker_work_goes_back_first_in_line():
    ledger = Ledger()
    for i in range(4):
        ledger.admit(req(i))
    for t, worker in [(1.0, 0), (2.0, 1), (3.0, 0)]:
        r = ledger.take("q")
        ledger.assign(r.key, worker, t)
    released = ledger.release_worker(0)
    assert sorted(r.id for r in released) == [0, 2]
    assert [ledger.take("q").id for _ in range(3)] == [0, 2, 3]
    assert ledger.settle(req(1).key) is not None  # worker 1's work is untouched


def test_unfinished_and_take_last():
    ledger = Ledger()
    for i in range(3):
        ledger.admit(req(i))
    r = ledger.take("q")
    ledger.assign(r.key, 0, 1.0)
    assert ledger.take_last("q").request.id == 2
    assert sorted(x.request.id for x in ledger.unfinished()) == [0, 1]
    assert [x.request.id for x in ledger.unfinished([State.WAITING])] == [1]
    ledger.forget(req(1).key)
    assert ledger.count(State.WAITING) == 0


def test_assigned_per_queue_follows_every_transition():
    ledger = Ledger()
    for i, queue in enumerate(["a", "a", "a", "b"]):
        ledger.admit(req(i, queue))
    keys = []
    for queue, worker in (("a", 0), ("a", 1), ("a", 1), ("b", 1)):
        request = ledger.take(queue)
        ledger.assign(request.key, worker, 1.0)
        keys.append(request.key)
    assert (ledger.assigned_in("a"), ledger.assigned_in("b"), ledger.assigned_in("c")) == (3, 1, 0)
    ledger.settle(keys[0])
    assert ledger.assigned_in("a") == 2
    ledger.forget(keys[0])                       # settled already: no second decrement
    assert ledger.assigned_in("a") == 2
    ledger.release_worker(1)                     # a worker died: its requests wait again
    assert (ledger.assigned_in("a"), ledger.assigned_in("b")) == (0, 0)
    request = ledger.take("b")
    ledger.assign(request.key, 0, 2.0)
    ledger.forget(request.key)                   # put back at drain while assigned
    assert ledger.assigned_in("b") == 0


def test_deadline_order_inside_a_queue():
    ledger = Ledger("deadline")
    for rid, deadline in (("late", 3e9), ("soon", 1e9), ("mid", 2e9), ("mid-too", 2e9), ("other", 0.5e9)):
        ledger.admit(Request(rid, deadline, {}, "other" if rid == "other" else "q", 1.0))
    assert len(ledger.waiting_by_queue["q"]) == 4
    assert ledger.take_last("q").request.id == "late"          # staging takes the latest deadline
    first = ledger.take("q")
    assert first.id == "soon"
    ledger.assign(first.key, 0, 1.0)
    ledger.forget(ledger.take("q").key)                        # mid: ties go in arrival order
    ledger.release_worker(0)                                   # soon comes back, in its place
    assert [ledger.take("q").id for _ in range(2)] == ["soon", "mid-too"]
    assert ledger.take("other").id == "other"


def test_unknown_order():
    import pytest

    with pytest.raises(ValueError):
        Ledger("random")


def test_tokened_and_assigned_counts_are_kept_not_walked():
    """The cancel watch reads only the held requests with an llm-d-async token, waiting or
    at a worker; the in-flight gauge reads the kept per-queue counts."""
    from dataclasses import replace

    ledger = Ledger()
    for i, token in enumerate(["t0", None, "t2", "t3"]):
        ledger.admit(replace(req(f"r{i}", queue="q" if i < 3 else "p"), token=token))
    assert [r.id for r in ledger.tokened()] == ["r0", "r2", "r3"]
    for queue in ("q", "q", "p"):
        ledger.assign(ledger.take(queue).key, 0, 1.0)        # r0, r1 at worker 0 from q; r3 from p
    assert ledger.assigned_by_queue() == {"q": 2, "p": 1}
    assert sorted(e.request.id for e in ledger.assigned()) == ["r0", "r1", "r3"]
    ledger.settle(req("r0").key)                               # settling: no longer watched
    assert [r.id for r in ledger.tokened()] == ["r2", "r3"]
    ledger.forget(req("r0").key)
    ledger.forget(req("r3").key)                               # forgotten while assigned
    assert [r.id for r in ledger.tokened()] == ["r2"]
    assert ledger.assigned_by_queue() == {"q": 1, "p": 0}
    staged = ledger.take_last("q")                             # r2 staged elsewhere: forgotten
    assert staged.request.id == "r2" and ledger.tokened() == []
