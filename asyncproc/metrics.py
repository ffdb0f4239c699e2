"""One Prometheus registry (supervisor only) and the /metrics /healthz /readyz server.

The server runs in one daemon thread and only reads `Health`, which the supervisor loop
writes each tick; it never touches the loop's state.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: /healthz fails when the loop has not ticked for this long.
STALL_SECONDS = 30.0


class Metrics:
    def __init__(self) -> None:
        self._children: dict = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("asyncproc_requests_received", "Request messages received", ["queue"], registry=r)
        self.results = Counter(
            "asyncproc_results",
            "Results written, by outcome: success, gateway_error, invalid, deadline_exceeded, max_attempts",
            ["queue", "outcome"], registry=r)
        self.retries = Counter("asyncproc_retries", "Retries scheduled, by reason", ["queue", "reason"], registry=r)
        self.bad_messages = Counter("asyncproc_bad_messages", "Invalid request messages, by kind", ["queue", "kind"], registry=r)
        self.dead_letters = Counter("asyncproc_dead_letters", "Messages sent to the dead-letter list", ["queue"], registry=r)
        self.skipped = Counter("asyncproc_skipped_deliveries",
                               "Deliveries not processed: id in flight here, or claimed elsewhere / answered",
                               ["queue", "reason"], registry=r)
        self.staged = Counter("asyncproc_staged", "Requests staged in the retry set for lack of capacity", ["queue"], registry=r)
        self.in_flight = Gauge("asyncproc_in_flight", "Requests assigned to workers", ["queue"], registry=r)
        self.shed = Counter("asyncproc_shed", "Attempts the gateway shed (HTTP 429)", ["queue"], registry=r)
        self.residence = Histogram(
            "asyncproc_queue_residence_seconds", "Receipt of a request to its first dispatch", ["queue"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.end_to_end = Histogram(
            "asyncproc_end_to_end_seconds", "Creation (or receipt) of a request to its result", ["queue"],
            buckets=LATENCY_BUCKETS + (600, 1800, 3600, 14400, 86400), registry=r,
        )
        self.waiting = Gauge("asyncproc_waiting", "Requests held in memory, waiting for a worker", registry=r)
        self.workers_alive = Gauge("asyncproc_workers_alive", "Worker processes ready", registry=r)
        self.worker_restarts = Counter("asyncproc_worker_restarts", "Worker processes restarted", registry=r)
        self.queue_gauges = {
            "retry_set": Gauge("asyncproc_retry_set_size", "Entries in a Redis retry set", ["queue"], registry=r),
            "depth": Gauge("asyncproc_queue_depth", "Requests waiting in a persisted queue", ["queue"], registry=r),
            "leased": Gauge("asyncproc_queue_leased", "Requests leased or pending (taken, not finished)",
                            ["queue"], registry=r),
            "oldest_age_seconds": Gauge("asyncproc_queue_oldest_age_seconds",
                                        "Age of the oldest request not yet taken", ["queue"], registry=r),
        }
        self.outbox = Gauge("asyncproc_outbox", "Writes waiting for the queue system", registry=r)
        self.transport_errors = Counter("asyncproc_transport_errors", "Queue-system errors", registry=r)
        self.internal_errors = Counter(
            "asyncproc_internal_errors",
            "Unexpected errors while handling one message, by stage; the message got an error result"
            " or a dead letter and the loop went on", ["queue", "stage"], registry=r)
        self.writes_refused = Counter(
            "asyncproc_writes_refused",
            "Items the queue system refused on their own (too large, ...), by kind; each was replaced"
            " by an error result or dead-lettered", ["kind"], registry=r)
        self.subscriber_dropped = Counter(
            "asyncproc_subscriber_dropped",
            "Times Redis closed the pub/sub subscription (output buffer limit); what it held is lost",
            registry=r)
        self.gateway_latency = Histogram(
            "asyncproc_gateway_latency_seconds", "Time of one gateway attempt", ["queue"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.gate_budget = Gauge("asyncproc_gate_budget", "Dispatch budget of a queue's gate, 0-1", ["queue"], registry=r)
        self.gate_decisions = Counter(
            "asyncproc_gate_decisions",
            "Gate decisions (one per reading), by reason: open, throttled, closed, failed-open, failed-closed",
            ["queue", "reason"], registry=r)
        self.gate_errors = Counter("asyncproc_gate_source_errors", "Failed gate readings, by source",
                                   ["source"], registry=r)
        self.adaptive_limit = Gauge("asyncproc_adaptive_limit",
                                    "Adaptive concurrency: requests that may be in flight now", registry=r)
        self.held_back = Gauge(
            "asyncproc_held_back",
            "Requests waiting that dispatch holds back although worker threads are free, by reason:"
            " gate, queue_limit, adaptive", ["queue", "reason"], registry=r)

    def of(self, metric, *labels: str):
        """The labelled child of `metric`, looked up once (labels() is costly per message)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child


@dataclass
class Health:
    """Written by the supervisor loop, read by the HTTP thread."""

    last_tick: float = 0.0
    ready: bool = False
    reason: str = "starting"

    def alive(self) -> bool:
        return time.monotonic() - self.last_tick < STALL_SECONDS


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - probes would flood the log
        pass


def _app(metrics: Metrics, health: Health):
    metrics_app = make_wsgi_app(metrics.registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            ok = health.alive()
            return _text(start_response, ok, "ok\n" if ok else "supervisor loop stalled\n")
        if path == "/readyz":
            return _text(start_response, health.ready, ("ready\n" if health.ready else health.reason + "\n"))
        return metrics_app(environ, start_response)

    return app


def _text(start_response, ok: bool, body: str):
    start_response("200 OK" if ok else "503 Service Unavailable",
                   [("Content-Type", "text/plain; charset=utf-8")])
    return [body.encode()]


def serve(metrics: Metrics, health: Health, host: str, port: int) -> Optional[_Server]:
    """Start the HTTP endpoint in a daemon thread; None when the port is 0 (turned off)."""
    if not port:
        return None
    server = make_server(host, port, _app(metrics, health), _Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
