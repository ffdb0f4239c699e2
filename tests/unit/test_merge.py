import random
from collections import Counter

import pytest

from asyncproc import merge


@pytest.mark.parametrize("pending, allowed", [
    ({}, {None}),
    ({"a": []}, {None}),
    ({"a": [1]}, {"a"}),
    ({"a": [], "b": [1]}, {"b"}),
    ({"a": [1], "b": [1], "c": []}, {"a", "b"}),
])
def test_random_robin_picks_only_queues_with_messages(pending, allowed):
    rng = random.Random(3)
    assert {merge.random_robin(pending, rng) for _ in range(50)} <= allowed


def test_random_robin_is_fair_between_queues():
    rng = random.Random(5)
    counts = Counter(merge.random_robin({"a": [1], "b": [1] * 100}, rng) for _ in range(4000))
    assert 1700 < counts["a"] < 2300


@pytest.mark.parametrize("pending, allowed", [
    ({}, {None}),
    ({"hi": [], "lo": [1]}, {"lo"}),
    ({"hi": [1], "lo": [1]}, {"hi"}),
    ({"hi": [1], "mid": [1], "mid2": [1], "lo": [1]}, {"hi"}),
    ({"mid": [1], "mid2": [1], "lo": [1]}, {"mid", "mid2"}),
])
def test_priority_is_strict(pending, allowed):
    pick = merge.policy("priority", priorities={"hi": 2, "mid": 1, "mid2": 1, "lo": 0})
    rng = random.Random(1)
    assert {pick(pending, rng, 0.0) for _ in range(50)} == allowed


def test_priority_aging_serves_a_starved_queue():
    pick = merge.policy("priority", priorities={"hi": 5, "lo": 0}, aging=1.0)
    rng = random.Random(1)
    served = [pick({"hi": [1], "lo": [1]}, rng, now=t / 10) for t in range(200)]  # 20 s, a pick per 0.1 s
    # lo gains a level per second waiting: after 5 s (and more) it is served, then waits again
    assert served[:50].count("lo") == 0
    assert 2 <= served.count("lo") <= 5
    never = merge.policy("priority", priorities={"hi": 5, "lo": 0})
    assert all(never({"hi": [1], "lo": [1]}, rng, now=t) == "hi" for t in range(1000))


def test_weighted_shares_follow_weights():
    pick = merge.policy("weighted", weights={"a": 3.0, "b": 1.0})
    rng = random.Random(7)
    counts = Counter(pick({"a": [1], "b": [1], "c": []}, rng, 0.0) for _ in range(8000))
    assert 5700 < counts["a"] < 6300 and counts["a"] + counts["b"] == 8000
    assert pick({"a": [], "b": [1]}, rng, 0.0) == "b"
    assert pick({}, rng, 0.0) is None


def test_unknown_policy():
    with pytest.raises(ValueError):
        merge.policy("nope")
