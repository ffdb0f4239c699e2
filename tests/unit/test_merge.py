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


def test_unknown_policy():
    with pytest.raises(ValueError):
        merge.policy("nope")
