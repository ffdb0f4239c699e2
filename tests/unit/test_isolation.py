"""The supervisor's per-message isolation and write isolation, in-process: a transport
double that refuses what a test names, no processes, no sleeps."""
import orjson
import pytest

from asyncproc import config, messages, supervisor
from asyncproc.messages import Request
from asyncproc.transports.base import Delivery, Transport, TransportError, Writes

NOW = 1_700_000_000.0


class RefusingTransport(Transport):
    """Writes into lists; refuses any write holding an item over `max_item` bytes (as Redis
    refuses a bulk over proto-max-bulk-len), or everything while `down`."""

    def __init__(self, max_item=1 << 30):
        self.max_item = max_item
        self.down = False
        self.written = Writes()
        self.calls = 0

    def connect(self):
        pass

    def receive(self, limit):
        return []

    def claim_due(self, now, limit):
        return []

    def write(self, writes):
        self.calls += 1
        if self.down:
            raise TransportError("redis: connection refused")
        sizes = [len(raw) for _, raw, _ in writes.results] + [len(s) for s, _, _ in writes.retries]
        if any(size > self.max_item for size in sizes):
            raise TransportError("redis: Protocol error: invalid bulk length")
        for name in ("results", "retries", "dead_letters", "drops"):
            getattr(self.written, name).extend(getattr(writes, name))

    def stats(self):
        return {}

    def ping(self):
        if self.down:
            raise TransportError("redis: connection refused")


def make(transport):
    settings = config.load_settings(["--workers", "1", "--metrics-port", "0"], environ={})
    sup = supervisor.Supervisor(settings, transport)
    sup.link.connected = True
    return sup


def result_item(rid, size=10):
    raw = orjson.dumps({"id": rid, "payload": "x" * size})
    return (messages.id_key(rid), raw, Delivery(b"", "q", token=rid))


def written_ids(transport):
    return [orjson.loads(raw)["id"] for _, raw, _ in transport.written.results]


def test_one_refused_result_is_replaced_and_the_rest_written():
    transport = RefusingTransport(max_item=1000)
    sup = make(transport)
    sup.books.outbox.results.extend([result_item("a"), result_item("big", 5000), result_item("b")])
    sup.books.outbox.retries.append((messages.encode_state(Request("r", NOW + 60, {}, "q", NOW)), NOW, None))
    sup.flush()
    assert sorted(written_ids(transport)) == ["a", "b", "big"]
    big = [orjson.loads(raw) for _, raw, _ in transport.written.results if b'"big"' in raw][0]
    assert "refused by the queue system" in big["error"]
    assert len(transport.written.retries) == 1 and not sup.books.outbox and sup.link.connected
    assert sup.metrics.writes_refused.labels("result")._value.get() == 1


def test_a_refused_retry_answers_its_request():
    transport = RefusingTransport(max_item=1000)
    sup = make(transport)
    sup.books.outbox.retries.append((messages.encode_state(Request("r", NOW + 60, {"p": "x" * 2000}, "q", NOW,
                                                             attempts=2)), NOW, None))
    sup.flush()
    (result,) = [orjson.loads(raw) for _, raw, _ in transport.written.results]
    assert result["id"] == "r" and result["attempts"] == 2 and "retry refused" in result["error"]


def test_an_outage_keeps_everything_and_the_back_off_grows_until_a_write_succeeds():
    transport = RefusingTransport()
    transport.down = True
    sup = make(transport)
    sup.books.outbox.results.extend([result_item("a"), result_item("b")])
    delays = []
    for _ in range(4):
        sup.link.connected = True  # as after a successful reconnect
        sup.flush()
        delays.append(sup.link.delay)
    assert delays == sorted(delays) and delays[-1] > delays[0]  # a connect alone resets nothing
    assert len(sup.books.outbox.results) == 2 and transport.written.results == []
    transport.down = False
    sup.link.connected = True
    sup.flush()
    assert sorted(written_ids(transport)) == ["a", "b"]
    assert sup.link.delay == supervisor.RECONNECT_MIN and not sup.link.outage


def test_even_a_small_write_refused_is_an_outage_not_the_items_fault():
    transport = RefusingTransport(max_item=5)  # refuses every result, replacements included
    sup = make(transport)
    sup.books.outbox.results.extend([result_item("a"), result_item("b")])
    sup.flush()
    assert not sup.link.connected and len(sup.books.outbox.results) == 2
    assert all(b"payload" in raw for _, raw, _ in sup.books.outbox.results)  # not turned into errors


@pytest.mark.parametrize("stage", ["accept", "settle", "retry"])
def test_an_unexpected_error_costs_one_error_result(stage):
    sup = make(RefusingTransport())
    request = Request("p", NOW + 60, {}, "q", NOW, attempts=1)
    delivery = Delivery(b"raw", "q", token="t")

    def boom(*_):
        raise TypeError("Integer exceeds 64-bit range")

    sup.books.isolation.run(stage, request, delivery, boom)
    ((key, raw, settles),) = sup.books.outbox.results
    assert orjson.loads(raw) == {"id": "p", "error": f"internal error while {stage} (TypeError)", "attempts": 1}
    assert settles is delivery
    assert sup.metrics.internal_errors.labels("q", stage)._value.get() == 1


def test_an_unexpected_error_without_an_id_is_a_dead_letter():
    sup = make(RefusingTransport())
    sup.books.isolation.run("accept", None, Delivery(b"garbage", "q", token="t"), lambda: 1 / 0)
    ((entry, _),) = sup.books.outbox.dead_letters
    assert orjson.loads(entry)["raw"] == "garbage" and "ZeroDivisionError" in orjson.loads(entry)["reason"]


def test_a_held_request_that_fails_is_answered_once_and_forgotten_after_the_write():
    transport = RefusingTransport()
    sup = make(transport)
    request = Request("h", NOW + 60, {}, "q", NOW)
    sup.ledger.admit(request, None)
    sup.ledger.assign(request.key, 0, NOW)
    sup.books.isolation.run("settle", request.key, None, lambda: 1 / 0)
    sup.settle(request.key, None)  # a late outcome for it is stale now: ignored
    sup.flush()
    assert written_ids(transport) == ["h"] and not sup.ledger.holds(request.key)
