"""The llm-d-async drop-in on a real Redis Cluster: its producer's keys (request-active,
request-cancel, the queue, the result list) land in slots of their own; markers are read
and released one key per command, results routed to the list the producer named."""
import orjson
import pytest

from tests.cluster import Cluster, cluster_redis_binary
from tests.harness import wait_until
from tests.llmd_replay import Producer, message

BINARY = cluster_redis_binary()
pytestmark = pytest.mark.skipif(BINARY is None, reason="no redis-server 7 or later (apt-get install redis-server)")


@pytest.fixture
def cluster(tmp_path):
    started = Cluster(tmp_path / "cluster", BINARY).start()
    yield started
    started.stop()


def test_llm_d_async_on_a_cluster(cluster, sim, processors):
    client = cluster.client()
    producer = Producer(client, request_queue="llmd-requests", result_queue="llmd-results")
    ids = [f"k{i}" for i in range(20)]
    for rid in ids:
        producer.submit(message(rid, {"prompt": "p", "x_sim": {"key": rid, "headers": True}},
                                headers={"Authorization": f"Bearer {rid}"}, metadata={"userid": "t"}))
    producer.cancel(ids[:5], cluster=True)
    processors(cluster.url, sim.url, "--message-queue-impl", "redis-sortedset", "--result-format", "llm-d-async",
               "--redis.request-queue-name", "llmd-requests", "--redis.result-queue-name", "other-results")
    results = {r["id"]: r for r in producer.get_results(20, timeout=60)}
    assert sorted(results) == sorted(ids)
    assert all(results[rid]["error_code"] == "CANCELLED" for rid in ids[:5])
    for rid in ids[5:]:
        seen = orjson.loads(results[rid]["payload"])["x_sim"]["headers"]
        assert seen["authorization"] == f"Bearer {rid}" and seen["x-llm-d-inference-fairness-id"] == "t"
    assert sim.stats()["requests"] == 15
    wait_until(lambda: not any(client.exists(f"request-active:{rid}") or client.exists(f"request-cancel:{rid}")
                               for rid in ids), 20, what="markers released")
