"""Redis Cluster settings: how a cluster is named, and what is refused at start."""
import subprocess
import sys

import pytest

from asyncproc import config
from asyncproc.config import ConfigError
from asyncproc.transports.keys import aux_key, slot, slot_problem
from asyncproc.transports.redisbase import cluster_url, seed_nodes
from tests.harness import ROOT

SORTED = ["--message-queue-impl", "redis-sortedset"]


def load(*argv):
    return config.load_settings(list(argv), {}, cpu_count=2)


def test_cluster_by_url_scheme_or_switch():
    assert load(*SORTED, "--redis-url", "redis+cluster://h:7000").redis.cluster
    assert load(*SORTED, "--redis-url", "redis://h:7000", "--redis.cluster", "true").redis.cluster
    assert not load(*SORTED, "--redis-url", "redis://h:7000").redis.cluster
    settings = load(*SORTED, "--redis-url", "redis://h:1", "--redis.wait-replicas", "1")
    assert (settings.redis.wait_replicas, settings.redis.wait_timeout) == (1, 2.0)


def test_cluster_urls_and_seed_nodes():
    assert cluster_url("rediss+cluster://u:p@h:1") == ("rediss://u:p@h:1", True)
    assert cluster_url("redis://h:1/0", True) == ("redis://h:1/0", True)
    assert cluster_url("redis://h:1/0") == ("redis://h:1/0", False)
    assert seed_nodes("redis://u:p@a:1,b:2,c") == ("redis://u:p@a:1", [("a", 1), ("b", 2), ("c", 6379)])


@pytest.mark.parametrize("argv, names", [
    (["--redis-url", "redis+cluster://h:1"], "--message-queue-impl: redis-pubsub does not run on a Redis Cluster"),
    ([*SORTED, "--redis-url", "redis+cluster://h:1/3"], "--redis-url: a Redis Cluster has only database 0"),
    ([*SORTED, "--redis-url", "unix:///tmp/r.sock", "--redis.cluster", "true"], "--redis.cluster"),
    ([*SORTED, "--redis-url", "redis+cluster://h:1", "--redis.key-prefix", "a{b}"], "--redis.key-prefix"),
    ([*SORTED, "--redis-url", "redis+cluster://h:1", "--redis.request-queue-name", "a{}b"],
     "--redis.request-queue-name: 'a{}b'"),
    ([*SORTED, "--redis-url", "redis+cluster://h:1", "--redis.result-queue-name", "{}r{x}"],
     "--redis.result-queue-name"),
    (["--redis.wait-replicas", "-1"], "--redis.wait-replicas"),
    (["--redis.wait-timeout", "0"], "--redis.wait-timeout"),
    (["--redis-url", "redis+clutser://h:1"], "--redis-url"),
])
def test_what_cannot_run_on_a_cluster_is_refused_in_one_line(argv, names):
    with pytest.raises(ConfigError) as err:
        load(*argv)
    assert names in str(err.value) and "\n" not in str(err.value)


def test_a_refusal_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "bin/asyncproc", "--redis-url", "redis+cluster://127.0.0.1:1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "redis-pubsub" in proc.stderr


@pytest.mark.parametrize("name", ["batch-queue", "{bq}:requests", "x{y}z{w}", "a:b:c", "{zz}:requests"])
def test_a_queue_and_its_keys_share_a_slot(name):
    assert slot_problem("asyncproc", name) == ""
    assert slot(aux_key("asyncproc", name, "leases")) == slot(name)
    assert slot(aux_key("asyncproc", name, "done:abc")) == slot(name)


def test_slot_is_redis_cluster_keyslot():
    assert slot("{zz}:requests") == 14415  # the slot of the report
    assert slot("foo") == 12182 and slot("{user1000}.following") == slot("{user1000}.followers")


def test_a_cluster_client_is_made_on_first_use_and_its_errors_are_transport_errors():
    from asyncproc.transports.base import TransportError
    from asyncproc.transports.redisbase import guarded, is_cluster, make_client

    client = make_client("redis+cluster://127.0.0.1:1", timeout=0.5)  # no node there: no error yet
    assert is_cluster(client)
    script = client.register_script("return 1")
    assert len(script.sha) == 40
    with pytest.raises(TransportError, match="connection refused"):
        guarded(client.ping)


@pytest.mark.parametrize("url, protocol", [
    ("redis://127.0.0.1:1/0", 2),                 # RESP2 unless asked: redis-py 8's RESP3 pub/sub
    ("redis://127.0.0.1:1/0?protocol=3", 3),      # path formats a log line per message
])
def test_clients_speak_resp2_unless_the_url_asks_for_resp3(url, protocol):
    from asyncproc.transports.redisbase import make_client

    client = make_client(url, timeout=0.5)
    assert client.connection_pool.connection_kwargs["protocol"] == protocol
