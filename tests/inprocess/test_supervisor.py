"""The supervisor's parts driven in this process: the memory transport, a fake pool and a
fake clock. Dispatch, gates, adaptive concurrency, retries, drain, outages, cancellation
and a bug in the loop, each in milliseconds and without wall-clock windows."""
import json
import logging
import signal

from asyncproc.ledger import State
from asyncproc.outcomes import Kind, Outcome
from asyncproc.supervisor import RECONNECT_MIN, Lifecycle
from tests.inprocess.fakes import Rig, answers_after, vllm_pod_rig


def answered(rig, ids):
    return lambda: set(ids) <= set(rig.transport.result_ids())


def exactly_once(rig, ids):
    written = rig.transport.result_ids()
    assert sorted(written, key=str) == sorted(ids, key=str), "each id answered exactly once"


def test_every_request_is_answered_once_within_concurrency():
    rig = Rig("--concurrency", "8")
    ids = list(range(100))
    rig.requests(ids)
    rig.run_until(answered(rig, ids))
    exactly_once(rig, ids)
    assert all(r["payload"] == {"ok": True} and r["attempts"] == 1 for r in rig.results().values())
    assert rig.pool.max_in_flight == 8
    assert len(rig.transport.settled) == 100 and not rig.sup.ledger


def test_a_retried_request_succeeds_with_its_attempts_counted():
    calls = {}

    def flaky(job, now):
        calls[job.key] = calls.get(job.key, 0) + 1
        if calls[job.key] < 3:
            return Outcome(Kind.RETRY, 503, b"", "HTTP 503", elapsed=0.01), 0.01
        return Outcome(Kind.OK, 200, b'"done"', elapsed=0.01), 0.01

    rig = Rig("--retry-base-delay", "0.5", gateway=flaky)
    rig.request("r")
    rig.run_until(answered(rig, ["r"]))
    result = rig.results()["r"]
    assert result["payload"] == "done" and result["attempts"] == 3
    assert rig.metric(rig.sup.metrics.retries, "batch-queue", "retry") == 2


def test_retries_stop_at_the_deadline():
    def down(job, now):
        return Outcome(Kind.RETRY, None, None, "connection refused", elapsed=0.01), 0.01

    rig = Rig("--retry-base-delay", "1", "--retry-max-delay", "2", gateway=down)
    start = rig.clock()
    rig.request("late", deadline_in=20)
    rig.run_until(answered(rig, ["late"]))
    result = rig.results()["late"]
    assert "deadline exceeded" in result["error"] and result["attempts"] > 3
    assert rig.clock() - start <= 22


def test_a_closed_gate_holds_everything_back_and_says_why():
    rig = Rig("--gate", json.dumps({"type": "constant", "budget": 0}))
    for i in range(5):
        rig.request(i)
    rig.run_until(lambda: rig.sup.ledger.count(State.WAITING) == 5, seconds=5)
    rig.clock.advance(1)
    rig.sup.tick()
    assert rig.pool.sent == [] and rig.transport.result_ids() == []
    assert rig.metric(rig.sup.metrics.held_back, "batch-queue", "gate") == 5


def test_a_half_open_gate_halves_what_is_in_flight():
    rig = Rig("--concurrency", "8", "--gate", json.dumps({"type": "constant", "budget": 0.5}))
    ids = list(range(40))
    rig.requests(ids)
    rig.run_until(answered(rig, ids))
    assert rig.pool.max_in_flight == 4
    exactly_once(rig, ids)


def test_adaptive_concurrency_finds_the_gateways_capacity():
    capacity = 5
    rig = Rig("--concurrency", "32", "--adaptive-concurrency", "true", "--retry-base-delay", "0.1")
    rig.serve_at_most(capacity, 0.2)
    ids = list(range(300))
    rig.requests(ids)
    rig.run_until(answered(rig, ids))
    exactly_once(rig, ids)
    limit = rig.sup.dispatcher.aimd_state.in_flight
    assert 1 <= limit <= 2 * capacity, limit
    assert rig.metric(rig.sup.metrics.shed, "batch-queue") < 100  # it learnt: most went through


def test_drain_finishes_in_flight_and_puts_back_the_rest():
    rig = Rig("--concurrency", "4", "--intake-buffer", "16", "--shutdown-grace-period", "30", gateway=answers_after(5))
    ids = list(range(20))
    rig.requests(ids)
    rig.run_until(lambda: rig.pool.in_flight() == 4)
    rig.signal(signal.SIGTERM)
    rig.run_until(lambda: rig.sup.state is Lifecycle.STOPPED)
    put_back = rig.put_back()
    assert len(rig.transport.result_ids()) == 4 and len(put_back) == 16
    assert set(rig.transport.result_ids()) | put_back == set(ids)


def test_a_drain_out_of_time_puts_back_what_is_in_flight():
    rig = Rig("--concurrency", "2", "--shutdown-grace-period", "3", gateway=answers_after(1000))
    rig.request("a")
    rig.request("b")
    rig.run_until(lambda: rig.pool.in_flight() == 2)
    start = rig.clock()
    rig.signal(signal.SIGINT)
    rig.run_until(lambda: rig.sup.state is Lifecycle.STOPPED)
    assert 3 <= rig.clock() - start < 5
    assert rig.put_back() == {"a", "b"}
    assert rig.transport.result_ids() == []


def test_an_outage_keeps_results_until_the_queue_system_is_back():
    rig = Rig()
    rig.request("x")
    rig.run_until(lambda: rig.pool.in_flight() == 1)
    rig.transport.down = True
    rig.run_until(lambda: rig.sup.link.outage and rig.sup.books.outbox)
    rig.run_until(lambda: rig.sup.link.delay > 4 * RECONNECT_MIN)  # it backs off while down
    assert rig.transport.result_ids() == [] and not rig.sup.health.ready
    rig.transport.down = False
    rig.run_until(answered(rig, ["x"]))
    exactly_once(rig, ["x"])
    assert not rig.sup.link.outage and rig.sup.link.delay == RECONNECT_MIN


def test_cancelling_answers_waiting_requests_and_aborts_dispatched_ones():
    rig = Rig("--concurrency", "1", "--intake-buffer", "4", workers=1, gateway=answers_after(10))
    rig.requests(("a", "b", "c"))
    rig.run_until(lambda: rig.pool.in_flight() == 1 and rig.sup.ledger.count(State.WAITING) == 2)
    cancelled_at = rig.clock()
    rig.transport.cancel(ids=["a", "b", "c"])
    rig.run_until(answered(rig, ["a", "b", "c"]))
    assert rig.clock() - cancelled_at < 2  # not the dispatched one's 10 s
    results = rig.results()
    assert all(results[i]["error"] == "cancelled" for i in "abc")
    assert len(rig.pool.sent) == 1  # the waiting ones never dispatched, the aborted one never retried


def test_a_dead_worker_s_requests_are_dispatched_again():
    rig = Rig("--concurrency", "4", gateway=answers_after(2))
    ids = list(range(8))
    rig.requests(ids)
    rig.run_until(lambda: rig.pool.in_flight() == 4)
    rig.pool.handles[0].dead = True
    rig.run_until(answered(rig, ids))
    exactly_once(rig, ids)
    assert rig.pool.restarts == 1 and rig.metric(rig.sup.metrics.worker_restarts) == 1


def test_a_bug_in_the_loop_puts_back_flushes_and_exits_non_zero():
    rig = Rig("--concurrency", "2", start=False)
    for i in range(5):
        rig.request(i)
    original = rig.pool.send_jobs

    def send_then_fail(handle, jobs):
        rig.pool.fail = RuntimeError("a bug")
        return original(handle, jobs)

    rig.pool.send_jobs = send_then_fail
    assert rig.sup.run() == 1
    put_back = rig.put_back()
    queued = {json.loads(raw)["id"] for raw in rig.transport.queues["batch-queue"]}
    assert len(put_back) == 4 and put_back | queued == set(range(5))  # capacity 4: one never taken
    assert rig.sup.state is Lifecycle.STOPPED and not rig.sup.books.outbox


def test_what_the_queue_system_never_takes_at_stop_is_logged_by_id(caplog):
    rig = Rig(gateway=answers_after(1))
    rig.requests(["a", "b"])
    rig.run_until(lambda: rig.pool.in_flight() == 2)
    rig.transport.down = True
    rig.signal()
    with caplog.at_level(logging.ERROR, "asyncproc.supervisor"):
        rig.run_until(lambda: rig.sup.state is Lifecycle.STOPPED)
    (line,) = [r.getMessage() for r in caplog.records if "not written" in r.getMessage()]
    assert line == 'queue system unreachable at stop: 2 results and put-backs not written (ids: "a" "b")'


def test_after_a_bug_in_the_loop_what_cannot_be_put_back_is_logged_by_id(caplog):
    rig = Rig("--concurrency", "2", start=False)
    rig.requests(range(3))

    def fail(handle, jobs):
        rig.transport.down = True
        raise RuntimeError("a bug")

    rig.pool.send_jobs = fail
    with caplog.at_level(logging.ERROR, "asyncproc.supervisor"):
        assert rig.sup.run() == 1
    (line,) = [r.getMessage() for r in caplog.records if "not written" in r.getMessage()]
    assert line.startswith("3 results and put-backs not written (ids: ")

def test_a_second_sigint_stops_at_once_and_still_puts_back():
    rig = Rig("--concurrency", "4", "--intake-buffer", "16", "--shutdown-grace-period", "60", gateway=answers_after(5))
    ids = list(range(20))
    rig.requests(ids)
    rig.run_until(lambda: rig.pool.in_flight() == 4)
    began = rig.clock()
    rig.signal(signal.SIGINT)
    rig.sup.tick()
    assert rig.sup.state is Lifecycle.DRAINING and not rig.sup.health.ready
    rig.signal(signal.SIGINT)
    rig.run_until(lambda: rig.sup.state is Lifecycle.STOPPED)
    assert rig.clock() - began < 5  # not the 60 s grace, nor the 5 s requests
    assert rig.put_back() == set(ids)
    assert rig.transport.result_ids() == []


def test_adaptive_concurrency_keeps_about_what_the_gateway_serves():
    """The gateway serves 6 at once and sheds the rest; 32 may be in flight, but the limit
    learns to stay near 6, with few sheds."""
    n, capacity = 300, 6
    limits = []
    rig = Rig("--concurrency", "32", "--adaptive-concurrency", "true", "--retry-base-delay", "0.05",
              "--retry-max-delay", "0.2", "--intake-buffer", "300")
    rig.serve_at_most(capacity, 0.1, lambda: limits.append(rig.sup.dispatcher.aimd_state.in_flight))
    assert rig.sup.dispatcher.aimd_state.in_flight == 1
    ids = list(range(n))
    rig.requests(ids)
    rig.run_until(answered(rig, ids))
    exactly_once(rig, ids)
    later = limits[len(limits) // 3:]
    assert 0.6 * capacity <= sum(later) / len(later) <= 1.4 * capacity, limits
    assert rig.metric(rig.sup.metrics.shed, "batch-queue") <= 0.1 * n


def test_priority_merge_and_a_per_queue_in_flight_limit(tmp_path):
    """urgent goes first; bulk never has more than its max_in_flight (1) at the gateway."""
    queues = tmp_path / "queues.json"
    queues.write_text(json.dumps({"queues": [
        {"name": "urgent", "priority": 1}, {"name": "bulk", "priority": 0, "max_in_flight": 1}]}))
    rig, bulk_peak = None, [0]

    def gateway(job, now):
        if job.key.startswith('"b'):
            bulk = sum(1 for h in rig.pool.handles for _, key, _ in h.pending if key.startswith('"b'))
            bulk_peak[0] = max(bulk_peak[0], bulk + 1)
        return Outcome(Kind.OK, 200, b"{}", elapsed=0.05), 0.05

    rig = Rig("--concurrency", "4", "--queues-file", str(queues), "--request-merge-policy", "priority",
              "--intake-buffer", "100", gateway=gateway, start=False)
    for i in range(30):
        rig.request(f"b{i}", queue="bulk")
        rig.request(f"u{i}", queue="urgent")
    rig.sup.start()
    rig.run_until(lambda: rig.sup.ledger.count(State.WAITING) < 60 and rig.metric(
        rig.sup.metrics.held_back, "bulk", "queue_limit") > 0, seconds=5)
    ids = [f"b{i}" for i in range(30)] + [f"u{i}" for i in range(30)]
    rig.run_until(answered(rig, ids))
    exactly_once(rig, ids)
    order = [job.key.strip('"') for job in rig.pool.sent]
    last_urgent = max(n for n, rid in enumerate(order) if rid.startswith("u"))
    assert bulk_peak[0] == 1
    assert sum(1 for rid in order[:last_urgent] if rid.startswith("b")) <= 1


def test_earliest_deadline_first_inside_a_queue():
    rig = Rig("--concurrency", "1", "--dispatch-order", "deadline", "--intake-buffer", "20", workers=1, start=False)
    deadlines = {f"d{i}": 600 + (i * 7) % 20 * 10 for i in range(20)}   # shuffled deadlines
    for rid, deadline_in in deadlines.items():
        rig.request(rid, deadline_in=deadline_in)
    rig.sup.start()
    rig.run_until(answered(rig, deadlines))
    assert [job.key.strip('"') for job in rig.pool.sent] == sorted(deadlines, key=deadlines.get)


def test_max_attempts():
    def failing(job, now):
        return Outcome(Kind.RETRY, 500, b"", "HTTP 500", elapsed=0.01), 0.01

    rig = Rig("--max-attempts", "2", "--retry-base-delay", "0.05", "--retry-max-delay", "0.05", gateway=failing)
    rig.request("m")
    rig.run_until(answered(rig, ["m"]))
    assert rig.results()["m"]["error"] == "max attempts (2) reached (last failure: HTTP 500)"
    assert len(rig.pool.sent) == 2


def test_a_worker_holding_an_attempt_past_its_budget_is_replaced():
    rig = None

    def hangs_once(job, now):
        if len(rig.pool.sent) == 0:  # the first attempt never ends (a hung worker)
            return Outcome(Kind.OK, 200, b"{}", elapsed=1e6), 1e6
        return Outcome(Kind.OK, 200, b'"second"', elapsed=0.1), 0.1

    rig = Rig("--request-timeout", "2", workers=1, gateway=hangs_once)
    rig.request("h")
    rig.run_until(answered(rig, ["h"]), seconds=30)
    result = rig.results()["h"]
    assert result["payload"] == "second" and result["attempts"] == 2  # the hung attempt counted
    assert rig.pool.restarts == 1


def test_workers_are_recycled_after_max_requests_without_loss():
    rig = Rig("--concurrency", "2", "--worker-max-requests", "5")
    ids = list(range(30))
    rig.requests(ids)
    rig.run_until(answered(rig, ids))
    exactly_once(rig, ids)
    assert rig.pool.restarts >= 4


def test_pubsub_overflow_is_staged_in_the_retry_set_not_held():
    rig = Rig("--concurrency", "2", "--intake-buffer", "3", start=False)
    rig.transport.must_drain = True  # pub/sub: what is not taken now is lost, so all is read
    ids = list(range(50))
    rig.requests(ids)
    rig.sup.start()
    rig.sup.tick()
    assert len(rig.sup.ledger) <= 5 and len(rig.transport.retry_set) >= 45
    assert rig.metric(rig.sup.metrics.staged, "batch-queue") >= 45
    rig.run_until(answered(rig, ids))
    exactly_once(rig, ids)


def test_a_gate_whose_source_fails_holds_dispatch_unless_it_fails_open():
    from tests.harness import free_port

    source = {"type": "redis", "key": "k", "url": f"redis://127.0.0.1:{free_port()}/0", "interval": 0.2}
    closed = Rig("--gate", json.dumps(source))
    closed.request("c")
    closed.run_until(lambda: closed.metric(closed.sup.metrics.gate_decisions, "batch-queue", "failed-closed") >= 3)
    assert closed.pool.sent == [] and closed.metric(closed.sup.metrics.held_back, "batch-queue", "gate") == 1
    assert sum(m.samples[0].value for m in closed.sup.metrics.gate_errors.collect() if m.samples) >= 3
    opened = Rig("--gate", json.dumps({**source, "fail_open": True}))
    opened.request("o")
    opened.run_until(answered(opened, ["o"]))
    assert opened.metric(opened.sup.metrics.gate_decisions, "batch-queue", "failed-open") >= 1


def test_results_are_written_while_a_claim_keeps_failing():
    rig = Rig(gateway=answers_after(1))
    rig.request("a")
    rig.run_until(lambda: rig.pool.in_flight() == 1)
    rig.transport.refuse_claims = True
    rig.request("b")
    rig.run_until(answered(rig, ["a"]), seconds=60)
    assert [item.id for item, _ in rig.sup.inbound.unclaimed] == ["b"]  # read, held unclaimed
    rig.transport.refuse_claims = False
    rig.run_until(answered(rig, ["a", "b"]), seconds=60)
    exactly_once(rig, ["a", "b"])


def test_a_vllm_gate_keeps_headroom_for_online_load_and_stops_while_online_requests_wait():
    """A pod of 8 slots serving 4 online requests: batch keeps 8 - 4 - sqrt(4) = 2 in flight,
    no fewer (vLLM counts asyncproc's own requests as running; the gate subtracts them); when
    online requests wait, nothing more is sent until they no longer do; nothing is lost."""
    served = lambda job, now: (Outcome(Kind.OK, 200, b'{"ok": true}', elapsed=0.2), 0.2)  # noqa: E731
    rig, pod = vllm_pod_rig({"capacity": 8, "interval": 0.1, "beta": 1}, "--concurrency", "8", "--intake-buffer", "200",
                            gateway=served)
    ids = list(range(200))
    rig.requests(ids)
    rig.run_until(lambda: len(rig.transport.result_ids()) >= 50)
    assert rig.pool.max_in_flight == 2 and rig.metric(rig.sup.metrics.gate_slots, "batch-queue") == 2
    pod["waiting"] = 1
    rig.run_until(lambda: rig.metric(rig.sup.metrics.gate_decisions, "batch-queue", "closed") >= 1)
    sent, until = len(rig.pool.sent), rig.clock() + 5
    rig.run_until(lambda: rig.clock() >= until)
    assert len(rig.pool.sent) == sent and rig.pool.in_flight() == 0
    assert rig.metric(rig.sup.metrics.held_back, "batch-queue", "gate") > 0
    pod["waiting"] = 0
    rig.run_until(answered(rig, ids))
    exactly_once(rig, ids)
    assert rig.pool.max_in_flight == 2


def test_slow_requests_in_their_thousands_are_written_a_batch_at_a_time():
    """With thousands in flight at seconds each, a tick waits for more outcomes (1% of the
    mean attempt latency, at most 250 ms), so results are written a batch per write instead
    of one each; every id still answered once."""
    import random

    rng = random.Random(7)

    def gateway(_assignment, _now):
        seconds = rng.uniform(1.0, 3.0)
        return Outcome(Kind.OK, 200, b"{}", elapsed=seconds), seconds

    rig = Rig("--concurrency", "2000", gateway=gateway)
    writes = []
    write = rig.transport.write
    rig.transport.write = lambda w: (writes.append(len(w.results)), write(w))[1]
    ids = list(range(6000))
    rig.requests(ids)
    rig.run_until(answered(rig, ids))
    exactly_once(rig, ids)
    window = rig.sup.dispatcher.window   # 1% of the mean latency (1-3 s), under the cap
    assert 1.0 <= window.mean_latency <= 3.0 and window.seconds() == window.SHARE * window.mean_latency
    batches = [n for n in writes if n]
    assert sum(batches) == 6000 and len(batches) < 6000 / 5, len(batches)


def test_a_transport_that_settles_later_has_each_delivery_settled_once_after_its_result():
    """The sorted set's one round trip a flush: a result's delivery is settled by the next
    write, never by the one that writes the result; an outage keeps the settling for
    later; a stop whose last write was results settles them at once; and what waits to
    be settled never shows as writes waiting (the outbox gauge)."""
    rig = Rig("--concurrency", "4", gateway=answers_after(1), start=False)
    rig.transport.settles_later = True
    rig.sup.start()
    ids = list(range(12))
    rig.requests(ids)
    rig.run_until(lambda: len(rig.transport.result_ids()) >= 4)
    assert rig.sup.books.settle_later and not rig.sup.books.outbox
    rig.transport.down = True           # the last four finish while down, and the stop begins
    rig.signal(signal.SIGTERM)
    rig.run_until(lambda: rig.sup.state is Lifecycle.STOPPING and len(rig.sup.books.outbox.results) == 4)
    rig.transport.down = False
    writes = rig.transport.writes
    rig.run_until(lambda: rig.transport.writes > writes)   # reconnected: the results are written
    written_at = rig.clock()
    rig.run_until(lambda: rig.sup.state is Lifecycle.STOPPED)
    assert rig.clock() - written_at < 0.5, "the settling is written at once, not at the next housekeeping"
    answered_ids = rig.transport.result_ids()
    assert len(answered_ids) == len(set(answered_ids)) == 8   # the other 4 were never taken
    tokens = rig.transport.written_at
    settled = [d.token for d in rig.transport.settled]
    assert len(tokens) == 8 and sorted(settled) == sorted(tokens), "each answered delivery settled once"
    assert all(rig.transport.settled_at[t] > tokens[t] for t in tokens), "settled by a later write"
