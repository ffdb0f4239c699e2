"""The producer side of asyncproc's queues: submit requests, read results, cancel, look.

asyncproc is never called directly; this module only writes and reads the queues the
processor uses, in the formats of README "Messages". The batch commands are built on it;
your own code can use it too::

    client = Client(config.load_settings(["--message-queue-impl", "redis-streams"]))
    with client.results() as results:        # pub/sub: subscribe before submitting
        client.submit([{"id": "a1", "deadline": time.time() + 600, "payload": {...}}], batch="b1")
        for result in results.wait(timeout=60):
            ...
"""
from __future__ import annotations

import time
from typing import Dict, Iterable, List, Optional

from asyncproc import messages
from asyncproc.config import Settings
from asyncproc.transports import ProducerError, ResultReader, open_producer

CANCEL_RETENTION = 7 * 24 * 3600.0   # seconds a cancellation stays in force

#: Something the user asked cannot be done (one line, no traceback).
ClientError = ProducerError
Results = ResultReader


class Client:
    """Asks the transport's producer side (transports.open_producer); never branches on
    which transport it is."""

    def __init__(self, settings: Settings, queue: Optional[str] = None) -> None:
        self.settings = settings
        self.queue = queue or settings.queue_names[0]
        self.producer = open_producer(settings, self.queue)

    @property
    def persisted(self) -> bool:
        """Results wait (a Redis list or stream; on Pub/Sub the batch's own subscription)
        instead of being published once to whoever listens."""
        return self.producer.persisted

    @property
    def counts_results(self) -> bool:
        """Results can be read without taking them (for status)."""
        return self.producer.counts_results

    @property
    def results_per_batch(self) -> bool:
        """Results are read per batch: reading them needs a batch."""
        return self.producer.results_per_batch

    # -- submit --------------------------------------------------------------------------
    def submit(self, requests: Iterable[dict], batch: Optional[str] = None, forget: bool = False,
               batch_total: Optional[int] = None) -> int:
        """Put request messages on the request queue; returns how many.

        `batch` tags each request (metadata "asyncproc.batch") and records the batch for
        `status`: its total grows by what is submitted, or is `batch_total` (a resumed run
        submits only part of its batch again). `forget` clears the per-id markers of earlier runs (claims, "result
        published") so ids asked again are answered again: for a resumed run whose results
        never arrived."""
        tagged = [self._tag(r, batch) for r in requests]
        if batch is not None:  # its results subscription first (gcp-pubsub): no result can be missed
            self.producer.open_batch(batch, len(tagged))
        count = self.producer.submit(tagged, forget)
        if batch is not None:
            self.producer.record_batch(batch, count, batch_total)
        return count

    @staticmethod
    def _tag(request: dict, batch: Optional[str]) -> dict:
        if batch is None:
            return request
        return dict(request, metadata={**(request.get("metadata") or {}), messages.BATCH_KEY: batch})

    # -- results -------------------------------------------------------------------------
    def results(self, from_start: bool = True, batch: Optional[str] = None, total: int = 0) -> ResultReader:
        """A reader of results. Pub/sub: subscribed on return, so submit after this.
        Persisted transports: reads the result list or stream without removing anything,
        from its start (or from now with from_start=False). gcp-pubsub: the results of
        `batch` (required), from its own subscription, acknowledged once read."""
        return self.producer.results(from_start, batch, total)

    # -- cancel and look -----------------------------------------------------------------
    def cancel(self, batch: Optional[str] = None, ids: Iterable = ()) -> int:
        """Requests of `batch` or with these ids get the error result "cancelled": queued
        ones instead of being dispatched, ones in flight by aborting their attempt."""
        now = time.time()
        until = now + CANCEL_RETENTION
        members = {f"id:{messages.id_key(i)}": until for i in ids}
        if batch is not None:
            members[f"batch:{batch}"] = until
        if not members:
            raise ClientError("nothing to cancel: give --batch or --id")
        self.producer.cancel(members, batch, now)
        return len(members)

    def finish_batch(self, batch: str) -> None:
        """Every result of `batch` is out of the queues: drop what only served to read them."""
        self.producer.finish_batch(batch)

    def batch(self, batch: str) -> Dict[str, str]:
        return self.producer.batch(batch)

    def batch_ids(self) -> List[str]:
        return self.producer.batch_ids()

    def queue_stats(self) -> Dict[str, Dict[str, float]]:
        """The processor's own queue gauges (depth, leased, retry set) plus dead letters."""
        return self.producer.queue_stats()

    def close(self) -> None:
        self.producer.close()


def result_batch(result: dict) -> Optional[str]:
    metadata = result.get("metadata")
    return metadata.get(messages.BATCH_KEY) if isinstance(metadata, dict) else None


