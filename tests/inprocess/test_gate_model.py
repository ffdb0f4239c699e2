"""The vllm gate's pure policy (gates.observe, gates.decide) against the noise-free model of
the G2 pool (asyncproc.tools.gate_model): a fake clock, no processes, about 50 ms a phase.
These guard what the benchmark measures only through the noise of a shared machine."""
from dataclasses import replace

import pytest

from asyncproc.tools import gate_model
from asyncproc.tools.bench import ONLINE

G2 = ONLINE["G2"]


def phase(o, **params):
    interval = params.pop("interval", o.interval)
    return gate_model.run(o, gate_model.gate_of(o.capacity, interval, **params))


@pytest.mark.parametrize("seed", [1, 2])
def test_defaults_keep_online_p99_near_alone_and_use_about_half_the_idle_capacity(seed):
    o = replace(G2, seed=seed)
    alone = gate_model.run(o, None)
    gated = phase(o)
    assert alone.batch_busy == 0 and abs(alone.online_busy - gated.online_busy) < 0.05
    assert gated.p99 <= 1.10 * alone.p99
    assert 0.45 <= gated.idle_used <= 0.75
    assert gated.surge_batch_busy < 0.6, "batch gives way during the surge"


def test_an_open_pool_is_what_costs_online_p99():
    o = replace(G2, seed=1)
    alone = gate_model.run(o, None)
    ungated = gate_model.run(o, None, ungated=True)
    assert ungated.idle_used > 0.95
    assert ungated.p99 > 2 * alone.p99


def test_more_headroom_trades_batch_for_online_p99():
    o = replace(G2, seed=1)
    low, high = phase(o, beta=0.0), phase(o, beta=1.0)
    assert low.idle_used > high.idle_used + 0.15
    assert high.p99 <= low.p99
    assert high.surge_batch_busy < low.surge_batch_busy


def test_a_surge_to_full_capacity_stops_batch():
    o = replace(G2, seed=1, surge=1.0)
    alone = gate_model.run(o, None)
    gated = phase(o)
    assert gated.surge_batch_busy < 0.3
    assert gated.p99 <= 1.10 * alone.p99


def test_the_model_is_deterministic_and_the_sweep_reports_per_seed():
    rows = gate_model.sweep(G2, [{"beta": 0.25}], seeds=[1, 2])
    assert rows == gate_model.sweep(G2, [{"beta": 0.25}], seeds=[1, 2])
    (params, ratios, used, surge, wasted, aborts), = rows
    assert params == {"beta": 0.25, "interval": G2.interval}
    assert len(ratios) == len(used) == len(surge) == 2 and wasted == [0.0, 0.0] and aborts == [0, 0]


def test_knowing_every_future_arrival_would_fill_more_than_any_gate_does():
    o = replace(G2, seed=1)
    bound = gate_model.clairvoyant(o)
    assert 0.7 < bound < 1.0
    assert phase(o, beta=0.0).idle_used < bound


FAST = {"beta": 0.0, "window": 0.02, "interval": 0.05}


@pytest.mark.parametrize("seed", [1, 2])
def test_preemption_with_fast_readings_fills_70_percent_within_a_tenth_of_online_p99(seed):
    """Reading every 0.05 s, the online load unsmoothed, one batch request allowed to queue
    at the pod (capacity 9 of 8) and the newest attempts aborted when online requests wait."""
    o = replace(G2, seed=seed)
    alone = gate_model.run(o, None)
    gated = gate_model.run(o, gate_model.gate_of(9, **FAST, preempt=True))
    assert gated.p99 <= 1.10 * alone.p99
    assert gated.idle_used >= 0.70
    assert gated.preempted > 0 and 0 < gated.wasted_share < 0.25


def test_aborted_work_is_wasted_not_used_and_preemption_is_what_protects_online_p99():
    o = replace(G2, seed=1)
    alone = gate_model.run(o, None)
    without = gate_model.run(o, gate_model.gate_of(9, **FAST))
    with_ = gate_model.run(o, gate_model.gate_of(9, **FAST, preempt=True))
    assert without.preempted == 0 and without.wasted == 0
    assert without.p99 > 1.15 * alone.p99 and with_.p99 <= 1.10 * alone.p99
    assert with_.batch_busy + with_.wasted <= o.capacity - with_.online_busy + 1e-9
    assert with_.idle_used < without.idle_used


def test_with_preemption_a_surge_to_full_capacity_still_stops_batch():
    o = replace(G2, seed=1, surge=1.0)
    alone = gate_model.run(o, None)
    gated = gate_model.run(o, gate_model.gate_of(8, **FAST, preempt=True))
    assert gated.surge_batch_busy < 0.3
    assert gated.p99 <= 1.10 * alone.p99
