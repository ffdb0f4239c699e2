"""Key names for Redis Cluster: a queue's own keys share the queue's hash slot."""
from __future__ import annotations


def hash_tag(name: str) -> str:
    """What Redis hashes for `name`: the first non-empty {...} part, else the whole name."""
    start = name.find("{")
    if start != -1:
        end = name.find("}", start + 1)
        if end > start + 1:
            return name[start + 1:end]
    return name


def aux_key(prefix: str, name: str, suffix: str) -> str:
    """An asyncproc key in the same slot as `name`: asyncproc:{batch-queue}:leases."""
    tag = hash_tag(name)
    middle = "" if tag == name else f":{name}"
    return f"{prefix}:{{{tag}}}{middle}:{suffix}"
