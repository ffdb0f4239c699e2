"""redis-pubsub's staging alone, in this process, on a real Redis: overflow goes back into
Redis as it was received (its intake record stays) and claim_due hands it out again, due
retries first, then records whose holder died, then staged messages oldest first."""
import time

import orjson
import pytest

from asyncproc import config
from asyncproc.transports import Writes
from asyncproc.transports.redis_pubsub import RedisPubSub
from tests.harness import request, wait_until

PREFIX = "asyncproc:{batch-queue-result}:"


@pytest.fixture
def transport(redis_server):
    settings = config.load_settings(["--redis-url", f"redis://127.0.0.1:{redis_server.port}/0",
                                     "--redis.lease-seconds", "30"], {}, cpu_count=1)
    t = RedisPubSub(settings.redis, settings.queue_names, settings.messages.max_message_bytes)
    t.connect()
    yield t
    t.close()


def received(transport, client, raws):
    for raw in raws:
        client.publish("batch-queue", raw)
    got = []
    wait_until(lambda: got.extend(transport.receive(100)) or len(got) >= len(raws), timeout=10,
               what=f"{len(raws)} messages")
    keys = [orjson.dumps(orjson.loads(d.raw)["id"]).decode() for d in got]
    assert transport.claim(keys, got) == [True] * len(got)
    return got


def test_staged_messages_come_back_as_they_came_after_due_retries(redis_server, transport):
    client = redis_server.client()
    raws = [request(f"s{i}", {"prompt": "x" * i}) for i in range(5)]
    deliveries = received(transport, client, raws)
    # s1 is retried (due now), the others staged: s0, s2, s3, s4 received at 100, 103, 102, 101
    retry_state = orjson.dumps({"v": 1, "id": "s1", "deadline": time.time() + 600, "payload": {},
                                "queue": "batch-queue", "received_at": 1.0, "attempts": 1})
    staged = [(deliveries[i], at) for i, at in ((0, 100.0), (2, 103.0), (3, 102.0), (4, 101.0))]
    transport.write(Writes(retries=[(retry_state, time.time() - 1, deliveries[1])], staged=staged))
    assert client.zcard(PREFIX + "held") == 0 and client.zcard(PREFIX + "staged") == 4
    assert client.hlen(PREFIX + "held-messages") == 4   # the staged messages' records stay

    first = transport.claim_due(time.time(), 3)
    assert [d.state for d in first] == [retry_state, None, None]
    assert [(d.raw, d.queue, d.received) for d in first[1:]] == [(raws[0], "batch-queue", 100.0),
                                                               (raws[4], "batch-queue", 101.0)]
    rest = transport.claim_due(time.time(), 10)
    assert [(d.raw, d.received) for d in rest] == [(raws[3], 102.0), (raws[2], 103.0)]
    assert transport.claim_due(time.time(), 10) == []
    # taken back under a lease, as at intake: held (kept alive, taken up if we die) until settled
    assert client.zcard(PREFIX + "staged") == 0 and client.zcard(PREFIX + "held") == 4
    assert client.zscore(PREFIX + "held", rest[0].token.key) > time.time() + 20
    transport.write(Writes(results=[(d.token.key, b'{"ok":true}', d) for d in first[1:] + rest]))
    assert client.zcard(PREFIX + "held") == 0 and client.hlen(PREFIX + "held-messages") == 0


def test_a_record_whose_holder_died_comes_back_before_staged_ones(redis_server, transport):
    client = redis_server.client()
    dead, staged = received(transport, client, [request("dead"), request("staged")])
    client.zadd(PREFIX + "held", {dead.token.key: time.time() - 1})  # its lease ran out
    transport.write(Writes(staged=[(staged, 5.0)]))
    back = transport.claim_due(time.time(), 10)
    assert [(d.raw, d.received) for d in back] == [(dead.raw, None), (staged.raw, 5.0)]
    assert transport.stats()["retry_set"][PREFIX + "staged"] == 0


def test_an_empty_retry_set_is_left_alone_for_a_moment_but_not_past_a_retry_of_ours(redis_server, transport):
    """A staged backlog is taken back a tick at a time; the retry set, found empty, is not
    asked again every tick, but a retry another replica writes waits at most
    RETRIES_IDLE_SECONDS, and one this transport writes is asked for at once."""
    from asyncproc.transports.redis_pubsub import RETRIES_IDLE_SECONDS
    client = redis_server.client()
    deliveries = received(transport, client, [request(f"b{i}") for i in range(4)])
    transport.write(Writes(staged=[(d, 100.0 + i) for i, d in enumerate(deliveries)]))
    now = time.time()
    assert [d.state for d in transport.claim_due(now, 1)] == [None]   # the retry set: empty
    other = orjson.dumps({"v": 1, "id": "r", "deadline": now + 600, "payload": {}, "queue": "batch-queue",
                          "received_at": 1.0, "attempts": 1})
    client.zadd(transport._retries.key, {other: now - 1})   # another replica's retry, due
    assert [d.state for d in transport.claim_due(now + RETRIES_IDLE_SECONDS / 2, 1)] == [None]
    assert [d.state for d in transport.claim_due(now + RETRIES_IDLE_SECONDS, 1)] == [other]
    mine = orjson.dumps({"v": 1, "id": "b0", "deadline": now + 600, "payload": {}, "queue": "batch-queue",
                         "received_at": 1.0, "attempts": 1})
    transport.claim_due(now + RETRIES_IDLE_SECONDS + 0.01, 1)   # empty again: left alone
    transport.write(Writes(retries=[(mine, now, None)]))
    assert [d.state for d in transport.claim_due(now + RETRIES_IDLE_SECONDS + 0.02, 1)] == [mine]
