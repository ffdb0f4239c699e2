"""The benchmark's steady-state CPU per message: the tree's CPU between the 10th and 90th
percentile results, interpolated between samples; a start-up burst of CPU (connections
opened, the first fill) is left out."""
import math

import pytest

from asyncproc.tools.bench import steady_cpu


def run(results_per_second, seconds, startup_cpu, cpu_per_result, sample_every=0.1):
    arrivals = {f"m{i}": [10.0 + i / results_per_second] for i in range(int(results_per_second * seconds))}
    samples, t = [], 9.0
    while t <= 10.0 + seconds + 0.5:
        done = min(max((t - 10.0) * results_per_second, 0.0), results_per_second * seconds)
        samples.append((t, (startup_cpu if t >= 9.5 else 0.0) + done * cpu_per_result))
        t += sample_every
    return arrivals, samples


@pytest.mark.parametrize("rate, seconds, every", [(1000, 5, 0.1), (500, 60, 0.1), (50, 20, 0.37)])
def test_the_steady_cost_leaves_out_a_start_up_burst(rate, seconds, every):
    arrivals, samples = run(rate, seconds, startup_cpu=3.0, cpu_per_result=200e-6, sample_every=every)
    assert steady_cpu(arrivals, samples) == pytest.approx(200e-6, rel=0.02)


def test_a_window_too_short_to_tell_is_nan():
    arrivals, samples = run(1000, 0.5, startup_cpu=0.0, cpu_per_result=1e-4)
    assert math.isnan(steady_cpu(arrivals, samples))
    assert math.isnan(steady_cpu({}, samples))
