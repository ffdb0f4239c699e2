"""Preemption by the vllm gate (`"preempt": true`), driven in this process: the memory
transport, a fake pool of workers, a fake clock and a fake vLLM pod whose metrics page
shows asyncproc's attempts in flight as running. When online requests wait at the pod, the
newest attempts are aborted (as many as wait), and their requests wait again: attempted
once more, answered exactly once, the aborted attempt not counted."""
import json

from asyncproc import outcomes
from asyncproc.ledger import State
from asyncproc.outcomes import Kind, Outcome
from tests.inprocess.fakes import vllm_pod_rig

SERVICE = 0.2


def pod_rig(*args, gate_extra=None, deadline_aware=False):
    """A pod of 8 slots with `pod["online"]` online requests running and `pod["waiting"]`
    waiting; each batch attempt takes 0.2 s. Returns (rig, pod)."""
    def served(job, now):
        if deadline_aware and now >= job.deadline:
            return outcomes.expired(), 0.0
        return Outcome(Kind.OK, 200, json.dumps({"echo": job.key}).encode(), elapsed=SERVICE), SERVICE

    gate = {"capacity": 8, "interval": 0.1, "beta": 0, "preempt": True, **(gate_extra or {})}
    return vllm_pod_rig(gate, "--concurrency", "8", "--intake-buffer", "100", *args, gateway=served)


def sends_of(rig, key):
    return sum(1 for job in rig.pool.sent if job.key == key)


def answered_once_with_payload(rig, ids):
    written = rig.transport.result_ids()
    assert sorted(written, key=str) == sorted(ids, key=str), "each id answered exactly once"
    results = rig.results()
    for i in ids:
        assert results[i]["payload"] == {"echo": str(i)}, results[i]


def in_flight_keys(rig):
    return {e.request.key: e.dispatched_at for e in rig.sup.ledger.assigned()}


def test_an_online_request_waiting_takes_the_newest_attempts_slot_and_that_request_is_attempted_again():
    rig, pod = pod_rig("--max-attempts", "1")
    ids = list(range(40))
    rig.requests(ids)
    rig.run_until(lambda: len(rig.transport.result_ids()) >= 8 and rig.pool.in_flight() == 4)
    flying = in_flight_keys(rig)
    newest = {k for k, at in flying.items() if at == max(flying.values())}
    pod["waiting"] = 1
    rig.run_until(lambda: rig.pool.preempted)
    (key,) = rig.pool.preempted
    assert key in newest
    pod["waiting"], pod["online"] = 0, 5   # vLLM gave the freed slot to the online request
    rig.run_until(lambda: set(ids) <= set(rig.transport.result_ids()))
    answered_once_with_payload(rig, ids)
    assert rig.pool.preempted == [key], "one online request waited: one attempt aborted"
    assert rig.metric(rig.sup.metrics.preempted, "batch-queue") == 1
    assert sends_of(rig, key) == 2 and all(sends_of(rig, i) == 1 for i in map(str, ids) if i != key)
    results = rig.results()
    assert all(r["attempts"] == 1 for r in results.values()), "the aborted attempt is not counted"
    assert rig.metric(rig.sup.metrics.aborted, "batch-queue") == 0   # not a cancellation
    first_dispatches = [s.value for m in rig.sup.metrics.residence.collect() for s in m.samples
                        if s.name.endswith("_count")]
    assert first_dispatches == [len(ids)], "the second dispatch is not a first one"
    assert rig.sup.books.preempting == set()


def test_without_preempt_waiting_online_requests_only_close_the_gate():
    rig, pod = pod_rig(gate_extra={"preempt": False})
    ids = list(range(20))
    rig.requests(ids)
    rig.run_until(lambda: rig.pool.in_flight() == 4)
    pod["waiting"] = 2
    rig.run_until(lambda: rig.pool.in_flight() == 0)
    assert rig.pool.preempted == [] and rig.metric(rig.sup.metrics.preempted, "batch-queue") == 0
    pod["waiting"] = 0
    rig.run_until(lambda: set(ids) <= set(rig.transport.result_ids()))
    answered_once_with_payload(rig, ids)
    assert len(rig.pool.sent) == len(ids)


def test_as_many_attempts_are_aborted_as_online_requests_wait_and_batch_steps_aside_while_they_do():
    """Two online requests keep waiting (at another pod of the pool, say): each reading taken
    after the last abort aborts at most as many as wait, less those on their way; batch is
    out of the pool until they stop waiting; then everything is answered once."""
    rig, pod = pod_rig()
    ids = list(range(30))
    rig.requests(ids)
    rig.run_until(lambda: rig.pool.in_flight() == 4)
    pod["waiting"] = 2
    rig.run_until(lambda: rig.pool.preempted)
    assert len(rig.pool.preempted) == 2
    rig.run_until(lambda: rig.pool.in_flight() == 0)
    held, until = len(rig.pool.sent), rig.clock() + 2
    rig.run_until(lambda: rig.clock() >= until)
    assert len(rig.pool.sent) == held, "closed while online requests wait"
    assert len(rig.pool.preempted) == len(set(rig.pool.preempted)) <= 4
    pod["waiting"] = 0
    rig.run_until(lambda: set(ids) <= set(rig.transport.result_ids()))
    answered_once_with_payload(rig, ids)
    assert rig.metric(rig.sup.metrics.preempted, "batch-queue") == len(rig.pool.preempted)


def test_a_preempted_request_keeps_its_deadline():
    rig, pod = pod_rig(deadline_aware=True)
    rig.request("late", deadline_in=1.0)
    rig.run_until(lambda: rig.pool.in_flight() == 1)
    pod["waiting"] = 1
    rig.run_until(lambda: rig.pool.preempted)
    rig.run_until(lambda: rig.sup.ledger.count(State.WAITING) == 1)
    until = rig.clock() + 2   # online requests wait past its deadline
    rig.run_until(lambda: rig.clock() >= until)
    pod["waiting"] = 0
    rig.run_until(lambda: "late" in rig.transport.result_ids())
    assert rig.transport.result_ids() == ["late"]
    assert rig.results()["late"]["error"].startswith("deadline exceeded")


def test_a_cancellation_wins_over_a_preemption():
    rig, pod = pod_rig()
    rig.request("c")
    rig.run_until(lambda: rig.pool.in_flight() == 1)
    (key,) = in_flight_keys(rig)
    rig.sup.books.aborting.add(key)   # a cancellation's abort crossed the preemption's
    pod["waiting"] = 1
    rig.run_until(lambda: "c" in rig.transport.result_ids())
    assert rig.pool.preempted == [key] and rig.results()["c"]["error"] == "cancelled"
    assert sends_of(rig, key) == 1 and rig.metric(rig.sup.metrics.preempted, "batch-queue") == 0
