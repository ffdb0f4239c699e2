"""Chaos: 20,000 good requests mixed with 1% poison messages of every kind, a gateway that
misbehaves in every hostile mode for some of them, and a kill -9 of the whole process tree
half-way. Every good id gets exactly one correct result, every poison message an error
result or a dead letter, asyncproc never exits on its own, and its memory stays bounded."""
import threading
import time
from collections import Counter

import orjson
import psutil
import pytest

from tests.harness import Queue, request, wait_subscribed, wait_until

GOOD = 20_000
PEAK_RSS_BOUND = 400 * 1024 * 1024   # the whole tree: supervisor + 2 workers (seen: 120-135 MiB)
OPTIONS = ("--concurrency", "64", "--request-timeout", "2", "--max-response-bytes", str(1 << 20),
           "--max-message-bytes", "65536", "--retry-base-delay", "0.2", "--retry-max-delay", "1",
           "--redis.lease-seconds", "3")
HOSTILE_DEADLINE = 12

#: mode -> (how its script reads, what its result must say)
HOSTILE = {
    "drip": (["drip"], "deadline exceeded"),
    "trickle": (["trickle"], "deadline exceeded"),
    "endless": (["endless"], "deadline exceeded"),
    "huge": (["huge"], "response too large"),
    "huge-chunked": (["huge-chunked"], "response too large"),
    "reset": (["reset", "reset", 200], None),      # fails twice, then answers: a payload
    "short": (["short", 200], None),
    "long": (["long"], None),
}


def poison_messages(now):
    """(raw, id or None) of every kind of bad message; id None: it must be dead-lettered."""
    future = now + 600
    with_id = {
        "p-no-deadline": {"id": "p-no-deadline", "payload": {}},
        "p-bad-deadline": {"id": "p-bad-deadline", "deadline": "soon", "payload": {}},
        "p-far-deadline": {"id": "p-far-deadline", "deadline": 1e308, "payload": {"prompt": "x"}},
        "p-past": {"id": "p-past", "deadline": now - 5, "payload": {}},
        "p-payload": {"id": "p-payload", "deadline": future, "payload": "text"},
        "p-metadata": {"id": "p-metadata", "deadline": future, "payload": {}, "metadata": {"n": 1}},
        "p-traversal": {"id": "p-traversal", "deadline": future, "payload": {}, "endpoint": "/../../admin/reset"},
        "p-lora": {"id": "p-lora", "deadline": future, "payload": {}, "endpoint": "/v1/load_lora_adapter"},
        "p-query": {"id": "p-query", "deadline": future, "payload": {}, "endpoint": "/v1/completions?x=1"},
        "p-retry-count": {"request_kind": "x", "internal": {"retry_count": 18446744073709551615},
                          "data": {"id": "p-retry-count", "deadline": future, "payload": {}}},
    }
    out = [(orjson.dumps(obj), rid) for rid, obj in with_id.items()]
    out.append((orjson.dumps({"id": "p-oversized", "deadline": future, "payload": {"prompt": "x" * 100_000}}),
                "p-oversized"))
    out += [(raw, None) for raw in (
        b"not json", b"\xff\xfe\x00", b"[1, 2]", b'{"id": ', orjson.dumps({"deadline": future, "payload": {}}),
        orjson.dumps({"id": "", "deadline": future, "payload": {}}),
        orjson.dumps({"id": "x" * 600, "deadline": future, "payload": {}}),
        b'{"id": 18446744073709551615, "deadline": 1900000000, "payload": {}}',
        orjson.dumps({"payload": {"prompt": "x" * 100_000}, "id": "not-first"}),  # oversized, id not first
    )]
    return out


def workload(now):
    """(raws, expected): expected maps each answerable id to None (a payload) or the error
    text its result must contain; plus the raws that must be dead-lettered."""
    poison = poison_messages(now)
    raws, expected, letters = [], {}, []
    rounds = GOOD // 100
    for i in range(GOOD):
        rid = f"g{i}"
        mode = list(HOSTILE)[(i // 100) % len(HOSTILE)] if i % 100 == 50 else None
        if mode is None:
            raws.append(request(rid, {"prompt": "x"}))
            expected[rid] = None
        else:
            script, outcome = HOSTILE[mode]
            # the modes that end at their deadline get a short one; the others must outlive
            # the kill -9 and the restart, whenever they come
            deadline_in = HOSTILE_DEADLINE + 30 * (i / GOOD) if outcome == "deadline exceeded" else 300
            raws.append(request(rid, {"prompt": "x", "x_sim": {"key": rid, "script": script, "bytes": 4 << 20,
                                                                "interval": 0.5}}, deadline_in=deadline_in))
            expected[rid] = outcome
        if i % 100 == 0:  # 1% poison, every kind in turn
            raw, pid = poison[(i // 100) % len(poison)]
            if pid is None:
                letters.append(raw)
            else:
                pid = f"{pid}-{i}"
                raw = raw.replace(orjson.dumps(pid.rsplit("-", 1)[0]), orjson.dumps(pid), 1)
                expected[pid] = "poison"
            raws.append(raw)
    assert rounds and len(raws) == GOOD + GOOD // 100
    return raws, expected, letters


def check_results(results, expected):
    counts = Counter(r["id"] for r in results)
    missing = set(expected) - set(counts)
    assert not missing, f"{len(missing)} ids never answered, e.g. {sorted(missing)[:10]}"
    assert set(counts) == set(expected), set(counts) - set(expected)
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1][:10]
    for result in results:
        want = expected[result["id"]]
        if want is None:
            assert result.get("payload", {}).get("object") == "text_completion", result
        elif want == "poison":
            assert "error" in result and "payload" not in result, result
        else:
            assert want in result["error"], result


class PeakRss:
    """Samples the resident memory of a process tree (its members may change) until stopped."""

    def __init__(self):
        self.roots, self.peak, self._stop = [], 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.2):
            total = 0
            for pid in list(self.roots):
                try:
                    root = psutil.Process(pid)
                    total += sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.peak


@pytest.fixture
def hostile_sim():
    from tests.harness import Sim

    gateway = Sim()
    yield gateway
    gateway.stop()


def test_chaos_on_a_sorted_set_with_kill_9_half_way(redis_server, hostile_sim, start_processor):
    queue = Queue(redis_server.client(), "redis-sortedset")
    client = redis_server.client()
    raws, expected, letters = workload(time.time())
    queue.put(raws, deadlines=[float(i) for i in range(len(raws))])  # arrival order
    rss = PeakRss()
    first = start_processor(hostile_sim.url, "--message-queue-impl", "redis-sortedset", *OPTIONS)
    rss.roots.append(first.proc.pid)
    wait_until(lambda: client.llen("batch-queue-result") >= len(expected) // 2, 120, 0.1, what="half the results")
    assert first.proc.poll() is None  # it never exits on its own
    first.kill()
    second = start_processor(hostile_sim.url, "--message-queue-impl", "redis-sortedset", *OPTIONS)
    rss.roots.append(second.proc.pid)
    wait_until(lambda: client.llen("batch-queue-result") >= len(expected), 180, 0.2,
               what=f"{len(expected)} results (have {client.llen('batch-queue-result')})")
    wait_until(lambda: queue.leftovers() == {}, 30, what="nothing left leased")
    peak = rss.stop()
    results = queue.results()
    check_results(results, expected)
    dead = [d["raw"] for d in queue.dead_letters()]
    assert {raw[:4096].decode("utf-8", "replace") for raw in letters} <= set(dead)
    assert second.proc.poll() is None
    assert peak < PEAK_RSS_BOUND, f"peak RSS {peak / 1048576:.0f} MiB"
    stats = hostile_sim.stats()["by_status"]
    print(f"\nchaos sorted set: {len(set(raws))} distinct messages, {len(results)} results, {len(dead)} dead letters,"
          f" 1 kill -9 of the tree, restarts {second.metric('asyncproc_worker_restarts_total'):.0f},"
          f" peak RSS {peak / 1048576:.0f} MiB, hostile answers {sum(v for k, v in stats.items() if 'hostile' in k)}")


def test_chaos_on_pubsub_with_kill_9_half_way(redis_server, hostile_sim, results, start_processor):
    """The same on pub/sub: what reached the subscriber is recorded in Redis at intake, so
    the kill -9 of the tree loses none of it (README: Faults, pub/sub)."""
    client = redis_server.client()
    raws, expected, letters = workload(time.time())
    first = start_processor(hostile_sim.url, *OPTIONS)
    rss = PeakRss()
    rss.roots.append(first.proc.pid)
    wait_subscribed(client, "batch-queue")
    for start in range(0, len(raws), 1000):
        pipe = client.pipeline(transaction=False)
        for raw in raws[start:start + 1000]:
            pipe.publish("batch-queue", raw)
        assert sum(pipe.execute()) == len(raws[start:start + 1000])  # each reached the subscriber
    results.wait_for(len(expected) // 2, timeout=120)
    assert first.proc.poll() is None  # it never exits on its own
    first.kill()
    second = start_processor(hostile_sim.url, *OPTIONS)
    rss.roots.append(second.proc.pid)
    results.wait_for(len(expected), timeout=180)
    peak = rss.stop()
    check_results(results.items, expected)
    dead = wait_until(lambda: (lambda d: d if len(d) >= len(letters) else None)(
        [orjson.loads(x)["raw"] for x in client.lrange("batch-queue-dead-letter", 0, -1)]), what="dead letters")
    assert {raw[:4096].decode("utf-8", "replace") for raw in letters} <= set(dead)
    assert second.proc.poll() is None
    assert peak < PEAK_RSS_BOUND, f"peak RSS {peak / 1048576:.0f} MiB"
    print(f"\nchaos pub/sub: {len(raws)} messages, {len(results.items)} results, {len(dead)} dead letters,"
          f" 1 kill -9 of the tree, peak RSS {peak / 1048576:.0f} MiB")
