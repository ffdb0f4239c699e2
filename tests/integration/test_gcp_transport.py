"""The gcp-pubsub transport alone, in this process, on the emulator: the edge cases."""
import time

import orjson
import pytest
from google.api_core import exceptions as gexc

from asyncproc import config
from asyncproc.transports import TransportError, Writes
from asyncproc.transports.gcp_pubsub import GcpPubSub
from tests.harness import request, wait_until


@pytest.fixture
def transport(pubsub, monkeypatch):
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub.emulator.host)
    settings = config.load_settings(pubsub.args("--gcp.ack-deadline", "10"), {}, cpu_count=1)
    t = GcpPubSub(settings.gcp, settings.queue_names)
    t.connect()
    yield t
    t.close()


def receive(transport, count):
    got = []
    wait_until(lambda: got.extend(transport.receive(10)) or len(got) >= count, timeout=10, what=f"{count} deliveries")
    return got


def result_for(delivery, body=b'{"ok": true}'):
    key = orjson.loads(delivery.raw)["id"]
    return (orjson.dumps(key).decode(), orjson.dumps({"id": key, "payload": orjson.loads(body)}), delivery)


def test_a_redelivery_of_a_held_message_is_not_taken_twice(pubsub, transport):
    pubsub.put([request("held")])
    (delivery,) = receive(transport, 1)
    old_ack_id = transport._held[delivery.token].ack_id
    # the lease runs out (here: at once) and Pub/Sub delivers the message again
    pubsub.subscriber.modify_ack_deadline(request={"subscription": transport.subscriptions[delivery.queue],
                                                   "ack_ids": [old_ack_id], "ack_deadline_seconds": 0})
    wait_until(lambda: transport.receive(10) == [] and transport._held[delivery.token].ack_id != old_ack_id,
               timeout=10, what="the redelivery to refresh the ack id")
    transport.write(Writes(results=[result_for(delivery)]))
    assert [r["id"] for r in pubsub.wait_results(1)] == ["held"]
    assert transport._held == {} and pubsub.undelivered() == 0


def test_a_write_tried_again_after_a_failed_ack_does_not_publish_again(pubsub, transport, monkeypatch):
    pubsub.put([request("once")])
    (delivery,) = receive(transport, 1)
    real_ack = transport._subscriber.acknowledge
    calls = []

    def flaky_ack(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise gexc.ServiceUnavailable("connection reset")
        return real_ack(*args, **kwargs)

    monkeypatch.setattr(transport._subscriber, "acknowledge", flaky_ack)
    writes = Writes(results=[result_for(delivery)])
    with pytest.raises(TransportError):
        transport.write(writes)
    transport.write(writes)  # what the supervisor does with its outbox
    assert len(calls) == 2
    # publishing is synchronous: a second copy would have been out before write() returned
    wait_until(lambda: len(pubsub.results()) >= 1, what="the result")
    assert [r["id"] for r in pubsub.results()] == ["once"]
    assert pubsub.undelivered() == 0


def test_a_retry_comes_back_with_its_state_when_due(pubsub, transport):
    pubsub.put([request("again")])
    (delivery,) = receive(transport, 1)
    transport.write(Writes(retries=[(b'{"state": 1}', time.time() + 1.5, delivery)]))
    assert transport.stats()["retry_set"][delivery.queue] == 1
    started = time.time()
    (back,) = receive(transport, 1)
    assert back.state == b'{"state": 1}' and back.raw == delivery.raw and time.time() - started >= 1.0
    assert transport.stats() == {"leased": {delivery.queue: 1}, "retry_set": {delivery.queue: 0}}


def test_a_retry_redelivered_early_waits_for_the_rest(pubsub, transport):
    pubsub.put([request("later")])
    (delivery,) = receive(transport, 1)
    transport.write(Writes(retries=[(b"{}", time.time() + 1.2, delivery)]))  # back in 2 s
    # ... but due much later (a delay past 600 s is served in steps of 600 s)
    transport._waiting[delivery.token] = (b"{}", time.time() + 1000)
    seen = []
    original = transport._modack
    transport._modack = lambda path, ack_ids, seconds: seen.append((len(ack_ids), seconds)) or original(path, ack_ids, seconds)
    wait_until(lambda: transport.receive(10) == [] and (1, 600) in seen, timeout=10,
               what="the early redelivery to be given a new deadline")
    assert transport.stats()["retry_set"][delivery.queue] == 1 and pubsub.undelivered() == 0


def test_a_result_too_large_for_pubsub_becomes_an_error_result(pubsub, transport):
    pubsub.put([request("huge")])
    (delivery,) = receive(transport, 1)
    item = result_for(delivery, orjson.dumps({"text": "x" * 10_500_000}))
    transport.write(Writes(results=[item]))
    (result,) = pubsub.wait_results(1)
    assert result == {"id": "huge", "error": f"result too large for Pub/Sub ({len(item[1])} bytes)", "attempts": 0}


def test_without_a_dead_letter_topic_a_bad_message_is_left_to_the_subscription(pubsub, monkeypatch):
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub.emulator.host)
    args = pubsub.args("--gcp.dead-letter-topic", "")  # the last one given wins
    settings = config.load_settings(args, {}, cpu_count=1)
    transport = GcpPubSub(settings.gcp, settings.queue_names)
    transport.connect()
    try:
        pubsub.put([b"not json"])
        (delivery,) = receive(transport, 1)
        seen = []
        original = transport._modack
        transport._modack = lambda path, ack_ids, seconds: seen.append(seconds) or original(path, ack_ids, seconds)
        transport.write(Writes(dead_letters=[(b'{"reason": "not valid JSON"}', delivery)]))
        assert seen == [600] and transport._held == {}
        assert pubsub.undelivered() == 0  # not acknowledged, not back before 600 s either
        assert pubsub.dead_letters() == []
    finally:
        transport.close()
