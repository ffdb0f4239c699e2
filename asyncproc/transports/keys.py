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


def cancel_key(prefix: str) -> str:
    """The sorted set `asyncproc cancel` writes: members `batch:<id>` or `id:<id key>`,
    scored by when the cancellation lapses."""
    return f"{prefix}:cancelled"


def pubsub_key(prefix: str, result_queue: str, name: str) -> str:
    """redis-pubsub's own keys, all in one slot with its markers: `held`, `held-messages`."""
    return f"{prefix}:{{{result_queue}}}:{name}"


def pubsub_marker(prefix: str, result_queue: str, kind: str, id_key: str) -> str:
    """redis-pubsub's per-id markers: `claim` (a replica took it) and `done` (answered)."""
    return pubsub_key(prefix, result_queue, f"{kind}:{id_key}")
