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


def slot(key: str) -> int:
    """The Redis Cluster hash slot of `key` (redis-py's CRC16 of its hash tag)."""
    from redis.crc import key_slot

    return key_slot(key.encode())


def slot_problem(prefix: str, name: str) -> str:
    """Why `name` and asyncproc's keys beside it (leases, state, done markers) would not
    share one cluster slot, or "" when they do. They do unless braces in the name or the
    prefix make Redis hash something else than hash_tag() says (`a{}b`, `{}x{y}`)."""
    if "{" in prefix or "}" in prefix:
        return "must not contain { or } on a Redis Cluster (the queue's {hash tag} decides a key's slot)"
    if slot(aux_key(prefix, name, "leases")) != slot(name):
        return (f"{name!r} and asyncproc's keys for it would hash to different cluster slots; name it"
                " without braces, or with one non-empty {hash tag}, e.g. '{orders}:requests'")
    return ""
