"""redis-streams' lease sets alone, in this process, on a real Redis: due retries are
claimed back, but lease sets found with nothing due are not asked again every tick."""
import time

import orjson
import pytest

from asyncproc import config
from asyncproc.transports import Writes
from asyncproc.transports.redis_streams import RedisStreams
from asyncproc.transports.redisbase import RETRIES_IDLE_SECONDS
from tests.harness import request


def streams(redis_server):
    settings = config.load_settings(["--redis-url", f"redis://127.0.0.1:{redis_server.port}/0",
                                     "--message-queue-impl", "redis-streams"], {}, cpu_count=1)
    transport = RedisStreams(settings.redis, settings.queue_names)
    transport.connect()
    return transport, settings.queue_names[0]


def retry_of(delivery, now):
    state = orjson.dumps({"v": 1, "id": orjson.loads(delivery.raw)["id"], "deadline": now + 600, "payload": {},
                          "queue": delivery.queue, "received_at": 1.0, "attempts": 1})
    return Writes(retries=[(state, now - 1, delivery)]), state


@pytest.fixture
def pair(redis_server):
    mine, queue = streams(redis_server)
    other, _ = streams(redis_server)          # another replica on the same stream and group
    yield mine, other, queue, redis_server.client()
    mine.close()
    other.close()


def test_lease_sets_found_empty_are_left_alone_for_a_moment_but_not_past_a_retry_of_ours(pair):
    mine, other, queue, client = pair
    for i in range(2):
        client.xadd(queue, {"message": request(f"e{i}")})
    first, = mine.receive(1)
    second, = other.receive(1)
    now = time.time()
    assert mine.claim_due(now, 10) == []                      # nothing due: left alone a moment
    writes, theirs = retry_of(second, now)
    other.write(writes)                                       # another replica's retry, due now
    assert mine.claim_due(now + RETRIES_IDLE_SECONDS / 2, 10) == []
    assert [d.state for d in mine.claim_due(now + RETRIES_IDLE_SECONDS, 10)] == [theirs]
    assert mine.claim_due(now + RETRIES_IDLE_SECONDS + 0.01, 10) == []   # empty again
    writes, ours = retry_of(first, now)
    mine.write(writes)                                        # ours: asked for at once
    assert [d.state for d in mine.claim_due(now + RETRIES_IDLE_SECONDS + 0.02, 10)] == [ours]
