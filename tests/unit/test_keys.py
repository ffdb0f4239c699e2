import pytest

from asyncproc.transports.keys import aux_key, hash_tag
from asyncproc.transports.redis_sortedset import shares


@pytest.mark.parametrize("name, tag", [
    ("batch-queue", "batch-queue"),
    ("{batch}:requests", "batch"),
    ("a{b}c{d}", "b"),
    ("a{}b", "a{}b"),
    ("a{b", "a{b"),
])
def test_hash_tag_is_what_redis_cluster_hashes(name, tag):
    assert hash_tag(name) == tag


@pytest.mark.parametrize("name, key", [
    ("batch-queue", "asyncproc:{batch-queue}:leases"),
    ("{batch}:requests", "asyncproc:{batch}:{batch}:requests:leases"),
])
def test_aux_keys_share_the_queue_slot(name, key):
    assert aux_key("asyncproc", name, "leases") == key
    assert hash_tag(aux_key("asyncproc", name, "leases")) == hash_tag(name)


@pytest.mark.parametrize("names, limit, start, expected", [
    (["a"], 5, 0, [("a", 5)]),
    (["a", "b"], 5, 0, [("a", 3), ("b", 2)]),
    (["a", "b"], 5, 1, [("b", 3), ("a", 2)]),
    (["a", "b", "c"], 1, 2, [("c", 1), ("a", 0), ("b", 0)]),
    ([], 3, 0, []),
])
def test_shares_rotate_so_no_queue_starves(names, limit, start, expected):
    assert shares(names, limit, start) == expected
