"""Request merge policies: which queue's message goes next (SPEC §6). Pure."""
from __future__ import annotations

import random
from typing import Mapping, Optional, Sized

POLICIES = ("random-robin",)


def random_robin(pending: Mapping[str, Sized], rng: random.Random) -> Optional[str]:
    """The seed's policy: a uniformly random queue among those with messages waiting."""
    candidates = [name for name, waiting in pending.items() if len(waiting)]
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    return rng.choice(candidates)


def policy(name: str):
    if name == "random-robin":
        return random_robin
    raise ValueError(f"unknown request merge policy {name!r}")
