"""The batch window (how long a tick or a worker's turn lets outcomes gather), the intake's
poll back-off and the timer."""
import pytest

from asyncproc.timers import Backoff, BatchWindow, Timer


@pytest.mark.parametrize("latency, window", [
    (0.0, 0.0),
    (0.05, 0.0),      # under a millisecond: an instant gateway's outcomes are not held
    (0.5, 0.005),     # 1% of the mean latency
    (2.0, 0.02),
    (10.0, 0.1),
    (20.0, 0.2),
    (25.0, 0.25),     # never longer than 250 ms
    (600.0, 0.25),
])
def test_the_window_is_a_share_of_the_latency_up_to_a_cap(latency, window):
    batch = BatchWindow()
    batch.mean_latency = latency
    assert batch.seconds() == pytest.approx(window)


def test_the_mean_latency_follows_outcomes():
    batch = BatchWindow()
    for _ in range(200):
        batch.learn(20.0)
    assert batch.mean_latency == pytest.approx(20.0, rel=1e-3) and batch.seconds() == pytest.approx(0.2, rel=1e-3)
    for _ in range(200):
        batch.learn(0.01)
    assert batch.seconds() == 0.0


def test_a_timer_is_due_again_after_its_interval():
    timer = Timer(interval=5.0)
    assert timer.every(100.0) and not timer.every(104.9) and timer.every(105.0)


@pytest.mark.parametrize("found, waits", [
    ([True, True, True], [0.1, 0.1, 0.1]),
    ([False] * 7, [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]),        # doubling, up to the most
    ([False, False, False, True, False, False], [0.1, 0.2, 0.4, 0.1, 0.1, 0.2]),  # found: back to base
])
def test_asking_backs_off_while_it_finds_nothing(found, waits):
    backoff = Backoff(0.1, 1.0)
    assert [backoff.after(f) for f in found] == pytest.approx(waits)


def test_a_reset_backoff_asks_at_its_base_again():
    backoff = Backoff(0.1, 1.0)
    for _ in range(5):
        backoff.after(False)
    backoff.reset()
    assert backoff.after(False) == 0.1
