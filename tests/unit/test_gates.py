"""Gate policy: parsing, readings to budgets, budgets to in-flight limits, AIMD. Pure, table-driven."""
import math

import pytest

from asyncproc import aimd, gates
from asyncproc.gates import Failed, Sample

D = gates.Defaults("redis://localhost:6379/0", interval=1.0, timeout=0.25)
VLLM = "http://pod-a:8000/metrics"


def page(*samples):
    return tuple(Sample(name, tuple(sorted(labels.items())), value) for name, labels, value in samples)


def scrape(**extra):
    doc = {"type": "endpoint-scrape", "url": VLLM, "metric": "vllm:num_requests_running"}
    doc.update(extra)
    return gates.parse(doc, D)


@pytest.mark.parametrize("doc, problem", [
    ({"type": "endpiont-scrape"}, "unknown gate type 'endpiont-scrape'"),
    ({}, "unknown gate type None"),
    ("redis", "must be an object"),
    ({"type": "redis", "key": "b", "intervall": 2}, "unknown parameter 'intervall' for gate type redis"),
    ({"type": "redis"}, "gate.key: must be a non-empty string"),
    ({"type": "redis", "key": "b", "url": "http://x"}, "gate.url"),
    ({"type": "redis", "key": "b", "fail_open": "yes"}, "fail_open"),
    ({"type": "redis", "key": "b", "interval": 0}, "interval: must be greater than 0"),
    ({"type": "constant", "budget": 2}, "between 0 and 1"),
    ({"type": "endpoint-scrape", "url": VLLM}, "metric"),
    ({"type": "endpoint-scrape", "url": "pod:8000", "metric": "m"}, "url"),
    ({"type": "endpoint-scrape", "url": VLLM, "metric": "m", "metirc": "m"}, "unknown parameter 'metirc'"),
    ({"type": "endpoint-scrape", "url": VLLM, "metric": "m", "pods": 2}, "needs a capacity"),
    ({"type": "endpoint-scrape", "url": VLLM, "metric": "m", "capacity": 8, "pods": {"url": VLLM, "metrc": "x"}},
     "unknown parameter 'metrc'"),
    ({"type": "endpoint-scrape", "url": VLLM, "metric": "m", "reserved": 1.5}, "reserved"),
    ({"type": "endpoint-scrape", "url": VLLM, "metric": "m", "aggregate": "avg"}, "aggregate"),
    ({"type": "prometheus-query", "url": "http://prom:9090"}, "query"),
    ({"type": "min", "gates": []}, "non-empty list"),
    ({"type": "min", "gates": [{"type": "constant"}, {"type": "nope"}]}, "gate.gates[1]: unknown gate type"),
])
def test_bad_gates_are_errors_naming_the_problem(doc, problem):
    with pytest.raises(gates.GateError) as err:
        gates.parse(doc, D)
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_defaults_and_sources():
    gate = gates.parse({"type": "min", "gates": [
        {"type": "redis", "key": "budget"},
        {"type": "endpoint-scrape", "url": [VLLM, "http://pod-b:8000/metrics"], "metric": "m", "capacity": 4,
         "interval": 0.5},
        {"type": "prometheus-query", "url": "http://prom:9090/", "query": "x", "timeout": 2}]}, D)
    found = gates.sources(gate)
    assert found == {
        gates.RedisKey("redis://localhost:6379/0", "budget", 0.25): 1.0,
        gates.Scrape(VLLM, 0.25): 0.5,
        gates.Scrape("http://pod-b:8000/metrics", 0.25): 0.5,
        gates.PromQuery("http://prom:9090", "x", 2.0): 1.0,
    }
    assert gates.sources(gates.OPEN) == {}


@pytest.mark.parametrize("value, capacity, pods, reserved, budget", [
    (0.0, None, 1, 0.0, 1.0),
    (0.25, None, 1, 0.0, 0.75),
    (0.25, None, 1, 0.1, 0.65),
    (1.7, None, 1, 0.0, 0.0),       # a saturation above 1 is clamped
    (-0.5, None, 1, 0.0, 1.0),
    (4, 8, 1, 0.0, 0.5),            # a count over a per-pod capacity
    (4, 8, 2, 0.0, 0.75),           # ...times the ready pods
    (12, 4, 2, 0.0, 0.0),
    (6, 8, 1, 0.25, 0.0),
    (3, 8, 0, 0.0, 0.0),            # no pod ready: saturated
])
def test_saturation_budget(value, capacity, pods, reserved, budget):
    assert math.isclose(gates.saturation_budget(value, capacity, pods, reserved), budget, abs_tol=1e-9)


def test_scrape_gate_selects_metric_and_labels_over_pages():
    gate = scrape(capacity=4, labels={"model_name": "m1"}, url=[VLLM, "http://pod-b/metrics"])
    readings = {
        gates.Scrape(VLLM, 0.25): page(("vllm:num_requests_running", {"model_name": "m1"}, 1),
                                       ("vllm:num_requests_running", {"model_name": "m2"}, 50),
                                       ("vllm:num_requests_waiting", {"model_name": "m1"}, 9)),
        gates.Scrape("http://pod-b/metrics", 0.25): page(("vllm:num_requests_running", {"model_name": "m1", "pod": "b"}, 2)),
    }
    assert gates.decide(gate, readings) == gates.Decision(0.25, "throttled")  # (1 + 2) / 4


def test_scrape_gate_ready_pods_from_another_endpoint():
    pods_url = "http://epp:9090/metrics"
    gate = scrape(capacity=4, pods={"url": pods_url, "metric": "ready_pods"})
    readings = {gates.Scrape(VLLM, 0.25): page(("vllm:num_requests_running", {}, 6)),
                gates.Scrape(pods_url, 0.25): page(("ready_pods", {"pool": "a"}, 3))}
    assert gates.decide(gate, readings).budget == 0.5


@pytest.mark.parametrize("reading, fail_open, decision", [
    (page(("vllm:kv_cache_usage_perc", {}, 0.3)), False, ("throttled", 0.7)),
    (page(("vllm:kv_cache_usage_perc", {}, 1.0)), False, ("closed", 0.0)),
    (page(("vllm:kv_cache_usage_perc", {}, 0.0)), False, ("open", 1.0)),
    (page(("vllm:kv_cache_usage_perc", {}, float("nan"))), False, ("failed-closed", 0.0)),
    (page(("other", {}, 0.0)), False, ("failed-closed", 0.0)),          # the metric is missing
    (page(("other", {}, 0.0)), True, ("failed-open", 1.0)),
    (Failed("connection refused"), False, ("failed-closed", 0.0)),
    (Failed("connection refused"), True, ("failed-open", 1.0)),
    (None, False, ("failed-closed", 0.0)),                               # not read yet
])
def test_scrape_gate_decisions(reading, fail_open, decision):
    gate = scrape(metric="vllm:kv_cache_usage_perc", fail_open=fail_open)
    readings = {} if reading is None else {gates.Scrape(VLLM, 0.25): reading}
    got = gates.decide(gate, readings)
    assert (got.reason, got.budget) == decision


@pytest.mark.parametrize("value, decision", [
    (0.0, ("closed", 0.0)), (1.0, ("open", 1.0)), (0.4, ("throttled", 0.4)), (7.0, ("open", 1.0)),
    (-1.0, ("closed", 0.0)), (Failed("key budget is not set"), ("failed-closed", 0.0)),
])
def test_redis_gate(value, decision):
    gate = gates.parse({"type": "redis", "key": "budget"}, D)
    got = gates.decide(gate, {gate.source: value})
    assert (got.reason, got.budget) == decision


def test_min_gate_takes_the_smallest_budget():
    gate = gates.parse({"type": "min", "gates": [
        {"type": "redis", "key": "a"}, {"type": "redis", "key": "b", "fail_open": True}, {"type": "constant", "budget": 0.9}]}, D)
    a, b = (g.source for g in gate.gates[:2])
    assert gates.decide(gate, {a: 0.5, b: 0.7}).budget == 0.5
    assert gates.decide(gate, {a: 1.0, b: Failed("down")}).budget == 0.9   # b fails open
    assert gates.decide(gate, {b: 1.0}).reason == "failed-closed"            # a not read: closed


@pytest.mark.parametrize("budget, limit, allowed", [
    (0.0, 8, 0), (1.0, 8, 8), (0.5, 8, 4), (0.01, 8, 1), (0.3, 10, 3), (0.31, 10, 4), (1.0, 0, 0),
])
def test_allowed_in_flight(budget, limit, allowed):
    assert gates.allowed_in_flight(budget, limit) == allowed


def test_queue_limits():
    assert gates.limits(["a", "b", "c"], {"a": 2, "b": 0}, {"b": 0.5, "c": 0.0}, 8) == {"a": 2, "b": 4, "c": 0}


AIMD = aimd.Policy(floor=1, ceiling=32, decrease=0.5, latency_target=2.0)


def test_aimd_slow_start_doubles_then_halves_once_per_round():
    state = aimd.start(AIMD)
    for _ in range(7):
        state = aimd.adapt(state, AIMD, 200, True, 0.1, dispatched_at=1.0, now=2.0)
    assert state.limit == 8 and state.slow_start
    state = aimd.adapt(state, AIMD, 429, False, 0.0, dispatched_at=3.0, now=4.0)
    assert state.limit == 4 and not state.slow_start and state.decreased_at == 4.0 and state.overloaded_at == 8
    # more sheds of requests sent before that decrease do not decrease again
    assert aimd.adapt(state, AIMD, 429, False, 0.0, dispatched_at=3.5, now=4.1) == state
    assert aimd.adapt(state, AIMD, 503, False, 0.0, dispatched_at=4.2, now=4.3).limit == 2


@pytest.mark.parametrize("status, ok, elapsed, limit", [
    (200, True, 0.1, 4.25),     # congestion avoidance: one per limit's worth of successes
    (200, True, 3.0, 2.0),      # slower than the latency target
    (500, False, 0.1, 4.0),     # other failures say nothing about capacity
    (None, False, 0.1, 4.0),    # a connection error neither
    (429, False, 0.0, 2.0),
])
def test_aimd_signals(status, ok, elapsed, limit):
    state = aimd.State(4.0, slow_start=False)
    assert aimd.adapt(state, AIMD, status, ok, elapsed, 1.0, 2.0).limit == limit


def test_aimd_probes_slowly_near_where_the_gateway_was_overloaded():
    policy = aimd.Policy(floor=1, ceiling=32, decrease=0.5, probe=8)
    far = aimd.State(4.0, slow_start=False, overloaded_at=8.0)
    near = aimd.State(7.5, slow_start=False, overloaded_at=8.0)
    assert aimd.adapt(far, policy, 200, True, 0.1, 1, 2).limit == 4.25
    assert aimd.adapt(near, policy, 200, True, 0.1, 1, 2).limit == 7.5 + 1 / 7.5 / 8


def test_aimd_bounds():
    policy = aimd.Policy(floor=2, ceiling=3, decrease=0.5)
    state = aimd.State(2.0, slow_start=False)
    assert aimd.adapt(state, policy, 429, False, 0, 1, 2).limit == 2
    state = aimd.State(3.0)
    assert aimd.adapt(state, policy, 200, True, 0, 1, 2).limit == 3
    assert aimd.State(2.9).in_flight == 2


# -- the vllm gate -------------------------------------------------------------------------
POD_B = "http://pod-b:8000/metrics"


def vllm(**extra):
    """A vllm gate of one pod of 8 slots; beta 1 and a 2 s window unless a test says (round numbers)."""
    doc = {"type": "vllm", "url": VLLM, "capacity": 8, "beta": 1, "window": 2}
    doc.update(extra)
    return gates.parse(doc, D)


def vllm_page(running, waiting=0, kv=None):
    samples = [("vllm:num_requests_running", {"model_name": "m"}, running),
               ("vllm:num_requests_waiting", {"model_name": "m"}, waiting)]
    if kv is not None:
        samples.append(("vllm:kv_cache_usage_perc", {"model_name": "m"}, kv))
    return page(*samples)


@pytest.mark.parametrize("doc, problem", [
    ({"type": "vllm", "url": VLLM}, "gate.capacity: required"),
    ({"type": "vllm", "url": VLLM, "capacity": 0}, "gate.capacity: must be greater than 0"),
    ({"type": "vllm", "capacity": 8}, "gate.url"),
    ({"type": "vllm", "url": [], "capacity": 8}, "gate.url"),
    ({"type": "vllm", "url": VLLM, "capacity": 8, "beta": -1}, "gate.beta: must be 0 or more"),
    ({"type": "vllm", "url": VLLM, "capacity": 8, "window": 0}, "gate.window"),
    ({"type": "vllm", "url": VLLM, "capacity": 8, "kv_cache_limit": 1.5}, "gate.kv_cache_limit"),
    ({"type": "vllm", "url": VLLM, "capacity": 8, "interval": 2, "max_age": 1}, "max_age: must be at least"),
    ({"type": "vllm", "url": VLLM, "capacity": 8, "metric": "x"}, "unknown parameter 'metric' for gate type vllm"),
    ({"type": "vllm", "url": VLLM, "capacity": 8, "preempt": "yes"}, "gate.preempt: must be true or false"),
])
def test_bad_vllm_gates_are_errors_naming_the_problem(doc, problem):
    with pytest.raises(gates.GateError) as err:
        gates.parse(doc, D)
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_vllm_gate_defaults_need_only_url_and_capacity():
    gate = gates.parse({"type": "vllm", "url": [VLLM, POD_B], "capacity": 8}, D)
    assert gate.pages == (gates.Scrape(VLLM, 0.25), gates.Scrape(POD_B, 0.25))
    assert (gate.capacity, gate.interval, gate.fail_open, gate.max_age) == (8, 1.0, False, 3.0)
    assert (gate.beta, gate.window, gate.kv_cache_limit, gate.preempt) == (0.25, 1.0, 0.9, False)
    assert gates.sources(gate) == {gates.Scrape(VLLM, 0.25): 1.0, gates.Scrape(POD_B, 0.25): 1.0}
    assert vllm(interval=2).max_age == 6.0   # three intervals when longer than the default


@pytest.mark.parametrize("online, beta, slots", [
    (0, 1.0, 8), (4, 1.0, 2), (4, 0.5, 3), (4, 0, 4), (6.4, 1.0, 0), (6.4, 0.5, 0), (1, 1.0, 6), (9, 0, 0),
])
def test_headroom_slots_square_root_staffing(online, beta, slots):
    assert gates.headroom_slots(8, online, beta) == slots


def decide_once(gate, reading, own=0, now=10.0, taken_at=10.0, load=None):
    """A decision on one fresh reading of the gate's first page (and the same on the others)."""
    readings = {p: reading for p in gate.pages} if reading is not None else {}
    taken = {p: taken_at for p in gate.pages}
    load = gates.observe(gate, load, readings, taken, own, now)
    return gates.decide(gate, readings, now, taken, {gate.pages: own}, {gate.pages: load} if load else {})


@pytest.mark.parametrize("reading, own, extra, expected", [
    (vllm_page(0), 0, {}, ("open", 8)),
    (vllm_page(4), 0, {}, ("throttled", 2)),          # 4 online + sqrt(4) headroom
    (vllm_page(6), 2, {}, ("throttled", 2)),          # 2 of the 6 running are asyncproc's own
    (vllm_page(8), 4, {}, ("throttled", 2)),
    (vllm_page(8), 8, {}, ("open", 8)),               # all running are asyncproc's: no online load
    (vllm_page(3), 5, {}, ("open", 8)),               # own count ahead of the page: online never negative
    (vllm_page(5, waiting=1), 5, {}, ("closed", 0)),  # online requests queue: closed at once
    (vllm_page(7), 0, {}, ("closed", 0)),             # 7 + 2.6 > 8
    (vllm_page(4), 0, {"beta": 0}, ("throttled", 4)),
    (vllm_page(4, kv=0.95), 2, {}, ("throttled", 2)),  # KV cache full: asyncproc takes no more than it has
    (vllm_page(4, kv=0.95), 0, {}, ("closed", 0)),
    (vllm_page(4, kv=0.5), 0, {}, ("throttled", 2)),
    (vllm_page(4, kv=0.95), 0, {"kv_cache_limit": 1.0}, ("throttled", 2)),
    (page(("vllm:num_requests_running", {}, 4)), 0, {}, ("failed-closed", 0)),     # no waiting count
    (page(("vllm:num_requests_running", {}, 4)), 0, {"fail_open": True}, ("failed-open", None)),
    (vllm_page(float("nan")), 0, {}, ("failed-closed", 0)),
    (Failed("connection refused"), 0, {}, ("failed-closed", 0)),
    (None, 0, {}, ("failed-closed", 0)),
])
def test_vllm_gate_decisions(reading, own, extra, expected):
    got = decide_once(vllm(**extra), reading, own)
    assert (got.reason, got.slots) == expected
    assert got.budget == (0.0 if expected[0] in ("closed", "failed-closed") else 1.0)


def test_vllm_gate_sums_pods_and_closes_when_any_pod_queues():
    gate = vllm(url=[VLLM, POD_B], capacity=4)
    readings = {gates.Scrape(VLLM, 0.25): vllm_page(3), gates.Scrape(POD_B, 0.25): vllm_page(1, kv=0.2)}
    taken = {p: 5.0 for p in gate.pages}
    got = gates.decide(gate, readings, 5.0, taken, {gate.pages: 0})
    assert (got.reason, got.slots) == ("throttled", 2)           # 8 slots, 4 online + 2
    readings[gates.Scrape(POD_B, 0.25)] = vllm_page(1, waiting=2)
    assert gates.decide(gate, readings, 5.0, taken, {gate.pages: 0}).reason == "closed"


@pytest.mark.parametrize("age, fail_open, reason", [
    (2.9, False, "throttled"), (3.1, False, "failed-closed"), (3.1, True, "failed-open"),
])
def test_vllm_gate_bounds_the_age_of_its_readings(age, fail_open, reason):
    got = decide_once(vllm(fail_open=fail_open), vllm_page(4), now=100.0, taken_at=100.0 - age)
    assert got.reason == reason
    if reason.startswith("failed"):
        assert "old" in got.detail


def test_vllm_load_estimate_is_smoothed_over_the_window_and_counts_each_reading_once():
    gate = vllm(window=2.0)
    p = gate.pages[0]
    load = gates.observe(gate, None, {p: vllm_page(4)}, {p: 0.0}, 0, 0.0)
    assert load == gates.Load(4.0, 0.0)
    # A burst to 8 online, seen 2 s (one window) later, moves the estimate 1 - 1/e of the way.
    load = gates.observe(gate, load, {p: vllm_page(8)}, {p: 2.0}, 0, 2.0)
    assert math.isclose(load.online, 4 + 4 * (1 - math.exp(-1)))
    assert gates.observe(gate, load, {p: vllm_page(8)}, {p: 2.0}, 0, 2.5) == load     # the same reading again
    assert gates.observe(gate, load, {p: Failed("down")}, {p: 3.0}, 0, 3.0) == load   # a failure keeps it
    # Waiting requests are online load too; asyncproc's own are not.
    load = gates.observe(gate, gates.Load(0.0, 0.0), {p: vllm_page(8, waiting=2)}, {p: 1000.0}, 3, 1000.0)
    assert math.isclose(load.online, 7.0)


def test_vllm_gate_decides_on_the_estimate_not_one_noisy_reading():
    gate = vllm()
    p = gate.pages[0]
    load = gates.Load(4.0, 9.9)          # a steady online load of 4...
    got = decide_once(gate, vllm_page(7), load=load, now=10.0, taken_at=10.0)  # ...one reading of 7, 0.1 s on
    assert (got.reason, got.slots) == ("throttled", 1)   # the estimate moves to 4.15: one slot less, not all
    assert gates.decide(gate, {p: vllm_page(7)}, 10.0, {p: 10.0}, {gate.pages: 0}).slots == 0  # no estimate yet


@pytest.mark.parametrize("budget, limit, slots, allowed", [
    (1.0, 8, None, 8), (1.0, 8, 3, 3), (1.0, 2, 3, 2), (1.0, 8, 0, 0), (1.0, 8, -2, 0), (0.5, 8, 6, 4), (0.0, 8, 5, 0),
])
def test_allowed_in_flight_within_slots(budget, limit, slots, allowed):
    assert gates.allowed_in_flight(budget, limit, slots) == allowed


def test_min_gate_with_a_vllm_gate_takes_the_fewest_slots_and_the_smallest_budget():
    gate = gates.parse({"type": "min", "gates": [{"type": "vllm", "url": VLLM, "capacity": 8, "beta": 1},
                                                 {"type": "redis", "key": "a"}]}, D)
    pool, key = gate.gates[0].pages, gate.gates[1].source
    readings = {pool[0]: vllm_page(4), key: 0.5}
    got = gates.decide(gate, readings, 1.0, {pool[0]: 1.0}, {pool: 0})
    assert (got.budget, got.slots, got.reason) == (0.5, 2, "throttled")
    readings[pool[0]] = vllm_page(4, waiting=1)
    got = gates.decide(gate, readings, 1.0, {pool[0]: 1.0}, {pool: 0})
    assert (got.budget, got.slots, got.reason) == (0.0, 0, "closed")


@pytest.mark.parametrize("reading, own, aborting, since, expected", [
    (vllm_page(8, waiting=2), 4, 0, 0.0, 2),            # two online requests wait: the two newest go
    (vllm_page(8, waiting=2), 1, 0, 0.0, 1),            # never more than asyncproc has
    (vllm_page(8, waiting=2), 4, 1, 0.0, 1),            # one abort already on its way counts
    (vllm_page(8, waiting=2), 4, 2, 0.0, 0),
    (vllm_page(8, waiting=0), 4, 0, 0.0, 0),            # nobody waits
    (vllm_page(8, waiting=1), 0, 0, 0.0, 0),            # nothing of asyncproc's in flight
    (vllm_page(3, waiting=2), 5, 0, 0.0, 0),            # the 2 waiting can only be asyncproc's own
    (vllm_page(4, waiting=3), 5, 0, 0.0, 2),            # 1 of asyncproc's must wait: 2 online
    (vllm_page(8, waiting=1), 4, 0, 10.0, 0),           # the reading predates the last abort
    (vllm_page(8, waiting=0.5), 4, 0, 0.0, 1),
    (Failed("connection refused"), 4, 0, 0.0, 0),       # no reading: no abort
])
def test_preemptions_free_as_many_slots_as_online_requests_wait(reading, own, aborting, since, expected):
    gate = vllm(preempt=True)
    readings, taken = {gate.pages[0]: reading}, {gate.pages[0]: 10.0}
    assert gates.preemptions(gate, readings, taken, own, aborting, since, 10.0) == expected
    assert gates.preemptions(vllm(), readings, taken, own, aborting, since, 10.0) == 0   # preempt off


def test_preemptions_wait_for_every_pod_read_after_the_last_abort():
    gate = vllm(url=[VLLM, POD_B], capacity=4, preempt=True)
    readings = {gates.Scrape(VLLM, 0.25): vllm_page(4, waiting=1), gates.Scrape(POD_B, 0.25): vllm_page(4)}
    taken = {gates.Scrape(VLLM, 0.25): 12.0, gates.Scrape(POD_B, 0.25): 9.0}
    assert gates.preemptions(gate, readings, taken, 4, 0, 10.0, 12.0) == 0
    taken[gates.Scrape(POD_B, 0.25)] = 11.0
    assert gates.preemptions(gate, readings, taken, 4, 0, 10.0, 12.0) == 1
