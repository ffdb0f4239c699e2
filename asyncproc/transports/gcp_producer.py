"""The producer's side of gcp-pubsub: requests published to the topic behind the
request subscription; each batch's results read from a subscription of its own on the
result topic, created before its requests are published (so no result can be missed) and
named `asyncproc-results-<batch>`. Imported only for `gcp-pubsub` (the `gcp` extra).
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Dict, List, Optional

import orjson
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from google.pubsub_v1 import PubsubMessage

from asyncproc.transports.base import Producer, ProducerError, ResultReader
from asyncproc.transports.gcp_pubsub import (
    MAX_IDS_PER_CALL,
    MAX_PUBLISH,
    RPC_TIMEOUT,
    make_clients,
    pull,
    resource_path,
)

if TYPE_CHECKING:
    from asyncproc.config import GcpConfig

ERRORS = (gexc.GoogleAPIError, auth_exc.GoogleAuthError)
RESULTS_PREFIX = "asyncproc-results-"
RESULTS_TTL_SECONDS = 7 * 24 * 3600   # a batch's results subscription lapses after a week unused


class GcpQueues:
    def __init__(self, gcp: GcpConfig, queue: str) -> None:
        self.project = gcp.project
        self.subscription = resource_path(self.project, "subscriptions", queue)
        self.result_topic = resource_path(self.project, "topics", gcp.result_topic)
        self.publisher, self.subscriber = make_clients(os.environ.get("PUBSUB_EMULATOR_HOST"))
        self._topic: Optional[str] = None

    def results_subscription(self, batch: str) -> str:
        """In the result topic's project (projects/P/topics/T)."""
        return f"projects/{self.result_topic.split('/')[1]}/subscriptions/{RESULTS_PREFIX}{batch}"

    def request_topic(self) -> str:
        """The topic behind the request subscription: what producers publish to."""
        if self._topic is None:
            self._topic = self.subscriber.get_subscription(subscription=self.subscription, timeout=RPC_TIMEOUT).topic
        return self._topic

    def open_batch(self, batch: str, total: int) -> None:
        """The batch's results subscription, created before any of its requests is out."""
        try:
            self.subscriber.create_subscription(request={
                "name": self.results_subscription(batch), "topic": self.result_topic,
                "ack_deadline_seconds": 60, "labels": {"asyncproc": "batch", "total": str(total),
                                                       "created": str(int(time.time()))},
                "expiration_policy": {"ttl": {"seconds": RESULTS_TTL_SECONDS}},
            }, timeout=RPC_TIMEOUT)
        except gexc.AlreadyExists:
            pass  # a resumed run: results waiting there are still ours

    def publish(self, raws: List[bytes]) -> None:
        topic = self.request_topic()
        for start in range(0, len(raws), MAX_PUBLISH):
            self.publisher.publish(topic=topic, messages=[PubsubMessage(data=r) for r in raws[start:start + MAX_PUBLISH]],
                                   timeout=RPC_TIMEOUT)

    def batch(self, batch: str) -> Dict[str, str]:
        try:
            found = self.subscriber.get_subscription(subscription=self.results_subscription(batch), timeout=RPC_TIMEOUT)
        except gexc.NotFound:
            return {}
        labels = dict(found.labels)
        return {"total": labels.get("total", "0"), "created": labels.get("created", "0"), "transport": "gcp-pubsub"}

    def batch_ids(self) -> List[str]:
        names = self.publisher.list_topic_subscriptions(request={"topic": self.result_topic}, timeout=RPC_TIMEOUT)
        short = (name.rsplit("/", 1)[-1] for name in names)
        return sorted(name[len(RESULTS_PREFIX):] for name in short if name.startswith(RESULTS_PREFIX))

    def close_batch(self, batch: str) -> None:
        try:
            self.subscriber.delete_subscription(subscription=self.results_subscription(batch), timeout=RPC_TIMEOUT)
        except gexc.NotFound:
            pass


class GcpProducer(Producer):
    """Batches are subscriptions on the result topic; there is no shared store for
    cancellations or queue statistics (those are the service's: Cloud Monitoring)."""

    persisted = True
    results_per_batch = True
    errors = ERRORS + (OSError,)
    where = "pubsub"

    def __init__(self, gcp: GcpConfig, queue: str) -> None:
        self.queues = self.run(lambda: GcpQueues(gcp, queue))

    def submit(self, requests: List[dict], forget: bool = False) -> int:
        self.run(lambda: self.queues.publish([orjson.dumps(r) for r in requests]))
        return len(requests)

    def open_batch(self, batch: str, total: int) -> None:
        self.run(lambda: self.queues.open_batch(batch, total))

    def record_batch(self, batch: str, count: int, total: Optional[int]) -> None:
        pass  # the batch's results subscription, labelled at open_batch, is its record

    def results(self, from_start: bool = True, batch: Optional[str] = None, total: int = 0) -> ResultReader:
        """The results of `batch` (required), from its own subscription, acknowledged once read."""
        if batch is None:
            raise ProducerError("gcp-pubsub keeps results per batch: give a batch")
        self.open_batch(batch, total)
        return GcpResults(self, batch)

    def cancel(self, members: Dict[str, float], batch: Optional[str], now: float) -> None:
        raise ProducerError("cancel needs a Redis transport: with gcp-pubsub asyncproc has no shared store to"
                            " read cancellations from")

    def finish_batch(self, batch: str) -> None:
        self.run(lambda: self.queues.close_batch(batch))

    def batch(self, batch: str) -> Dict[str, str]:
        return self.run(lambda: self.queues.batch(batch))

    def batch_ids(self) -> List[str]:
        return self.run(self.queues.batch_ids)

    def queue_stats(self) -> Dict[str, Dict[str, float]]:
        return {}  # held by the service: see Cloud Monitoring (README, gcp-pubsub)


class GcpResults(ResultReader):
    """Pulls a batch's results subscription. What one poll returned is acknowledged at the
    next poll (or close), after the caller has written it: a crash in between redelivers,
    and the output file already knows those ids."""

    def __init__(self, producer: GcpProducer, batch: str) -> None:
        self.producer = producer
        self.queues = producer.queues
        self.path = self.queues.results_subscription(batch)
        self.unacked: List[str] = []

    def poll(self, timeout: float) -> List[dict]:
        raws = self.producer.run(lambda: self._pull(timeout))
        return [r for r in map(self.decode, raws) if r is not None]

    def _pull(self, timeout: float) -> List[bytes]:
        self._ack()
        end = time.monotonic() + timeout
        while True:
            response = pull(self.queues.subscriber, self.path, 1000)
            if response.received_messages or time.monotonic() >= end:
                break
            time.sleep(min(0.1, max(end - time.monotonic(), 0)))
        self.unacked = [m.ack_id for m in response.received_messages]
        return [m.message.data for m in response.received_messages]

    def _ack(self) -> None:
        for start in range(0, len(self.unacked), MAX_IDS_PER_CALL):
            self.queues.subscriber.acknowledge(
                request={"subscription": self.path, "ack_ids": self.unacked[start:start + MAX_IDS_PER_CALL]},
                timeout=RPC_TIMEOUT)
        self.unacked = []

    def close(self) -> None:
        self.producer.run(self._ack)
