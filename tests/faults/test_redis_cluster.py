"""asyncproc on a real Redis Cluster (3 masters + 3 replicas on free ports): queues spread
over the masters, replicas sharing them, a master killed mid-run, a slot migrated mid-run."""
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter

import orjson
import pytest
import redis

from asyncproc.transports.keys import aux_key
from tests.cluster import Cluster, cluster_redis_binary, free_slot_key
from tests.harness import ROOT, Queue, request, wait_until

BINARY = cluster_redis_binary()
pytestmark = pytest.mark.skipif(BINARY is None, reason="no redis-server 7 or later (apt-get install redis-server)")
IMPLS = ["redis-sortedset", "redis-streams"]


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    """One cluster for the tests that leave its topology as they found it."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), BINARY).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def own_cluster(tmp_path):
    """A cluster of the test's own: it kills a master."""
    cluster = Cluster(tmp_path / "cluster", BINARY).start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


class Setup:
    """Request queues, one on each master, and a result key, all named for this test."""

    def __init__(self, cluster: Cluster, impl: str) -> None:
        tag = uuid.uuid4().hex[:6]
        self.cluster, self.impl = cluster, impl
        self.client = cluster.client()
        self.names = [free_slot_key(cluster, f"{tag}-q", port) for port in cluster.masters()]
        self.result_key = f"{tag}-results"
        self.queues = [Queue(self.client, impl, name, self.result_key) for name in self.names]

    def args(self, *extra: str) -> list:
        out = ["--message-queue-impl", self.impl, "--redis.result-queue-name", self.result_key,
               "--redis.lease-seconds", "3", "--retry-base-delay", "0.1", "--retry-max-delay", "0.3"]
        for name in self.names:
            out += ["--redis.request-queue-name", name]
        return out + list(extra)

    def put(self, ids, latency: float = 0.02) -> None:
        """Round robin over the queues, one pipeline per queue."""
        for n, queue in enumerate(self.queues):
            queue.put([request(i, {"prompt": "x", "x_sim": {"latency": latency}}) for i in ids[n::len(self.queues)]])

    def results(self) -> list:
        while True:
            try:
                return self.queues[0].results()
            except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterDownError):
                time.sleep(0.1)  # the test's own reader, during a failover

    def wait_results(self, count: int, timeout: float = 90.0) -> list:
        wait_until(lambda: len(self.results()) >= count, timeout, 0.1, what=f"{count} results")
        return self.results()

    def leftovers(self) -> dict:
        """Work still held anywhere: queue, leases, pending entries, entries not yet read
        (by key: KEYS on a cluster client asks one node only)."""
        out = {}
        for name in self.names:
            held = {"leases": self.client.zcard(aux_key("asyncproc", name, "leases"))}
            if self.impl == "redis-sortedset":
                held["queue"] = self.client.zcard(name)
            else:  # not the group's `lag`: Redis 7.0 may misstate it after a failover
                for group in self.client.xinfo_groups(name):
                    after = group["last-delivered-id"].decode()
                    held["pending"] = group["pending"]
                    held["unread"] = len(self.client.xrange(name, min=f"({after}", count=10))
            out.update({f"{name}:{k}": v for k, v in held.items() if v})
        return out


def assert_exactly_once(results, ids):
    counts = Counter(r["id"] for r in results)
    assert set(counts) == set(ids), f"missing {sorted(set(ids) - set(counts))[:10]}"
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1][:10]
    assert all("payload" in r for r in results), [r for r in results if "payload" not in r][:3]


def test_queues_on_every_master_shared_by_three_replicas(shared_cluster, sim, processors, impl):
    setup = Setup(shared_cluster, impl)
    assert len({shared_cluster.master_port_of(n) for n in setup.names}) == 3
    ids = [f"c{i}" for i in range(600)]
    replicas = [processors(shared_cluster.url, sim.url, *setup.args("--concurrency", "8")) for _ in range(3)]
    setup.put(ids, latency=0.05)
    assert_exactly_once(setup.wait_results(600), ids)
    assert all(p.metric("asyncproc_results_total") > 0 for p in replicas)  # the work was shared
    assert sim.stats()["requests"] == 600  # and not doubled
    wait_until(lambda: setup.leftovers() == {}, what="nothing left behind")


@pytest.mark.parametrize("wait_replicas", [1, 0])
def test_master_killed_mid_run(own_cluster, sim, processors, impl, wait_replicas, record_property):
    """kill -9 of the master holding the results (and one of the queues) while its replica
    is behind (its link cut: replication is asynchronous, and a replica can lag under load
    or across zones); the replica takes over and asyncproc follows without a restart.
    With --redis.wait-replicas 1 nothing is lost: no request is acknowledged before its
    result is on the replica. Without it, results the dead master had and its replica had
    not are gone while their requests, acknowledged on other masters, are not redone: the
    test measures how many (README: Redis Cluster)."""
    cluster = own_cluster
    setup = Setup(cluster, impl)
    victim = cluster.master_port_of(setup.result_key)
    assert victim in {cluster.master_port_of(n) for n in setup.names}
    ids = [f"f{i}" for i in range(600)]
    setup.put(ids, latency=0.4)  # about 10 s of work for 24 in flight
    cluster.wait_in_sync()  # what the producer wrote is on the replicas: not what is measured
    procs = [processors(cluster.url, sim.url, *setup.args("--concurrency", "8",
                                                           "--redis.wait-replicas", str(wait_replicas)))
             for _ in range(3)]
    wait_until(lambda: len(setup.results()) >= 100, 60, 0.05, what="some results")
    replica = cluster.cut_replication(victim)
    try:
        if wait_replicas:  # writes wait for the replica: asyncproc says so and acknowledges nothing
            wait_until(lambda: any("unreachable: redis: fewer replicas" in p.log.read_text() for p in procs), 30,
                       what="an unconfirmed write")
        else:  # the replica falls 100 results behind
            behind = len(setup.results()) + 100
            wait_until(lambda: len(setup.results()) >= min(behind, len(ids)), 60, 0.05, what="100 more results")
        assert setup.leftovers()  # mid-run: requests not yet acknowledged
        cluster.kill(victim)
    finally:
        cluster.mend_replication(replica)
    promoted = cluster.wait_promoted(victim, setup.result_key)
    assert promoted == replica.port
    # back as a replica of the promoted one: WAIT has a replica to count again
    cluster.node(victim).start()
    cluster.wait_replicated(promoted)
    if wait_replicas:
        assert_exactly_once(setup.wait_results(len(ids), timeout=120), ids)
    else:
        wait_until(lambda: setup.leftovers() == {}, 120, 0.1, what="every request settled")
        results = setup.results()
        counts = Counter(r["id"] for r in results)
        assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1][:10]
        lost = len(set(ids) - set(counts))
        record_property("lost_without_wait", lost)
        print(f"\n{impl}: master killed 100 results ahead of its replica, no --redis.wait-replicas:"
              f" {lost} of {len(ids)} results lost")
        assert 0 < lost <= 100 + 3 * 8, lost  # what the replica had not received, at most
    try:
        wait_until(lambda: setup.leftovers() == {}, 60, 0.1, what="nothing left behind")
    except AssertionError:
        raise AssertionError(f"left behind: {setup.leftovers()}") from None
    assert all(p.proc.poll() is None for p in procs)  # followed the failover, no restart


def test_slot_of_a_queue_migrated_mid_run(shared_cluster, sim, processors, impl):
    """The reshard steps (IMPORTING/MIGRATING, MIGRATE key by key, SETSLOT NODE) for the slot
    of a queue while three replicas work on it: ASK and TRYAGAIN mid-way, MOVED after;
    nothing lost, nothing doubled."""
    cluster = shared_cluster
    setup = Setup(cluster, impl)
    moving = setup.names[0]
    slot, src = cluster.slot(moving), cluster.master_port_of(moving)
    dst = next(p for p in cluster.masters() if p != src)
    ids = [f"m{i}" for i in range(900)]
    for _ in range(3):
        processors(cluster.url, sim.url, *setup.args("--concurrency", "8"))
    setup.put(ids, latency=0.05)
    wait_until(lambda: len(setup.results()) >= 100, 60, 0.05, what="some results")
    cluster.begin_migration(slot, src, dst)
    while True:  # one key at a time, some work done between: the slot is split for a while
        before = len(setup.results())
        if not cluster.migrate_keys(slot, src, dst, count=1):
            break
        wait_until(lambda b=before: len(setup.results()) >= min(b + 20, len(ids)), 60, 0.05,
                   what="work going on mid-migration")
    cluster.end_migration(slot, dst)
    assert cluster.master_port_of(moving) == dst
    assert_exactly_once(setup.wait_results(900, timeout=120), ids)
    assert sim.stats()["requests"] >= 900
    try:
        wait_until(lambda: setup.leftovers() == {}, 60, 0.1, what="nothing left behind")
    except AssertionError:
        raise AssertionError(f"left behind: {setup.leftovers()}") from None


def test_wait_replicas_acknowledges_nothing_a_replica_does_not_have(shared_cluster, sim, processors):
    """The result master's replica stopped (SIGSTOP): results reach the master but WAIT, on
    the connection that wrote them, counts no replica, so no request is acknowledged; once
    the replica runs again, each id gets exactly one result."""
    cluster = shared_cluster
    setup = Setup(cluster, "redis-streams")
    master = cluster.master_port_of(setup.result_key)
    replica = cluster.node(cluster.replica_of(master))
    proc = processors(cluster.url, sim.url, *setup.args("--concurrency", "4", "--redis.wait-replicas", "1",
                                                       "--redis.wait-timeout", "0.3"))
    ids = [f"w{i}" for i in range(30)]
    os.kill(replica.proc.pid, signal.SIGSTOP)
    try:
        setup.put(ids, latency=0.01)
        wait_until(lambda: "unreachable: redis: fewer replicas than --redis.wait-replicas 1" in proc.log.read_text(), 30,
                   what="an unconfirmed write")
        assert setup.results()  # on the master, not confirmed by its replica...
        held = sum(g["pending"] for q in setup.names for g in setup.client.xinfo_groups(q))
        unread = sum(int(k.endswith(":unread")) and v for k, v in setup.leftovers().items())
        assert held > 0 and held + unread == len(ids)  # ...so no request is acknowledged
    finally:
        os.kill(replica.proc.pid, signal.SIGCONT)
    assert_exactly_once(setup.wait_results(len(ids), timeout=60), ids)
    wait_until(lambda: setup.leftovers() == {}, 60, 0.1, what="nothing left behind")
    cluster.wait_replicated(master)


def test_batch_tools_on_a_cluster(shared_cluster, sim, processors, tmp_path):
    """run-batch and status through the cluster client, queues on two masters."""
    cluster = shared_cluster
    setup = Setup(cluster, "redis-streams")
    processors(cluster.url, sim.url, *setup.args("--concurrency", "8"))
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(orjson.dumps({"id": f"b{i}", "payload": {"prompt": f"p{i}"}})
                                  for i in range(200)) + b"\n")
    out = tmp_path / "out.jsonl"
    common = ["--redis-url", cluster.url, "--message-queue-impl", "redis-streams",
              "--redis.request-queue-name", setup.names[1], "--redis.result-queue-name", setup.result_key]
    done = subprocess.run([sys.executable, "-m", "asyncproc", "run-batch", str(source), "--output", str(out),
                           "--no-progress", *common], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(orjson.loads(line)["id"] for line in out.read_bytes().splitlines()) == sorted(
        f"b{i}" for i in range(200))
    status = subprocess.run([sys.executable, "-m", "asyncproc", "status", "--json", *common],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert status.returncode == 0, status.stderr
    assert orjson.loads(status.stdout)["batches"][0]["state"] == "complete"


def test_wait_replicas_on_one_redis(tmp_path, sim, processors):
    """Not a cluster: one Redis whose replica comes late. Until it is there nothing is
    acknowledged; then every id gets exactly one result."""
    from tests.harness import RedisServer

    primary = RedisServer(tmp_path / "primary").start()
    replica = RedisServer(tmp_path / "replica")
    try:
        queue = Queue(primary.client(), "redis-sortedset")
        ids = [f"s{i}" for i in range(50)]
        queue.put([request(i) for i in ids])
        proc = processors(primary.url, sim.url, "--message-queue-impl", "redis-sortedset", "--concurrency", "8",
                          "--redis.wait-replicas", "1", "--redis.wait-timeout", "0.3")
        wait_until(lambda: "unreachable: redis: fewer replicas" in proc.log.read_text(), 30,
                   what="an unconfirmed write")
        assert queue.leftovers()  # nothing acknowledged without a replica
        replica.start("--replicaof", "127.0.0.1", str(primary.port))
        assert_exactly_once(queue.wait_results(len(ids)), ids)
        wait_until(lambda: queue.leftovers() == {}, 30, what="nothing left behind")
    finally:
        replica.stop()
        primary.stop()
