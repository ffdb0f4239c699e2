"""One Prometheus registry (supervisor only) and the /metrics /healthz /readyz server.

The server runs in one daemon thread and only reads `Health`, which the supervisor loop
writes each tick; it never touches the loop's state.

Slow clients cost no thread: that thread accepts connections and reads their request heads
itself (non-blocking, one selector); a client gets CONNECTION_TIMEOUT seconds to send its
head, at most MAX_PENDING connections wait for theirs (a new one closes the oldest), and a
complete request is answered by one of at most MAX_SERVING_THREADS short-lived threads (a
connection finding them all busy is closed).
"""
from __future__ import annotations

import io
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: /healthz fails when the loop has not ticked for this long.
STALL_SECONDS = 30.0
#: Seconds a client has to send its request head, and for each send of the answer.
CONNECTION_TIMEOUT = 10.0
#: Connections still sending their heads, at most; one more closes the oldest.
MAX_PENDING = 256
#: Requests answered at once (one thread each).
MAX_SERVING_THREADS = 8
#: A request head longer than this is cut there (and rejected by the parser).
MAX_HEAD_BYTES = 16384


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
        self.staged = Counter("asyncproc_staged", "Requests staged in Redis for lack of capacity", ["queue"], registry=r)
        self.in_flight = Gauge("asyncproc_in_flight", "Requests assigned to workers", ["queue"], registry=r)
        self.shed = Counter("asyncproc_shed", "Attempts the gateway shed (HTTP 429)", ["queue"], registry=r)
        self.headers_refused = Counter(
            "asyncproc_request_headers_refused",
            "Request headers not sent: hop-by-hop, host, content-length or invalid", ["queue", "reason"], registry=r)
        self.cancel_reads = Counter(
            "asyncproc_cancel_reads", "Reads of cancellations for what is held (one pipelined read each)", registry=r)
        self.cancel_watched = Gauge(
            "asyncproc_cancel_watched", "Held requests with an llm-d-async token checked in the last read", registry=r)
        self.aborted = Counter("asyncproc_cancelled_in_flight",
                               "Requests cancelled while at the gateway: their attempt was aborted", ["queue"], registry=r)
        self.preempted = Counter(
            "asyncproc_preempted", "Attempts aborted to give their pool slot to online requests waiting (the vllm"
            " gate's preempt); each request is attempted again", ["queue"], registry=r)
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
        self.gate_slots = Gauge("asyncproc_gate_slots",
                                "Requests a queue's vllm gate lets asyncproc have in flight to its pool",
                                ["queue"], registry=r)
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
            "Requests waiting that dispatch holds back although workers have room, by reason:"
            " gate, queue_limit, adaptive", ["queue", "reason"], registry=r)

    def observe(self, in_flight: Mapping[str, int], queues: Iterable[str], waiting: int,
                adaptive_limit: Optional[int], held: Mapping[tuple, int], alive: int, outbox: int) -> None:
        """The gauges of the supervisor's state, set a few times a second (not per message)."""
        queues = list(queues)
        for queue in set(in_flight) | set(queues):
            self.in_flight.labels(queue).set(in_flight.get(queue, 0))
        self.waiting.set(waiting)
        if adaptive_limit is not None:
            self.adaptive_limit.set(adaptive_limit)
        for queue in queues:
            for reason in HELD_REASONS:
                self.of(self.held_back, queue, reason).set(held.get((queue, reason), 0))
        self.workers_alive.set(alive)
        self.outbox.set(outbox)

    def of(self, metric, *labels: str):
        """The labelled child of `metric`, looked up once (labels() is costly per message)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child


#: Why dispatch holds a waiting request back although workers have room (the held-back gauge).
HELD_REASONS = ("gate", "queue_limit", "adaptive")


@dataclass
class Health:
    """Written by the supervisor loop, read by the HTTP thread."""

    last_tick: float = 0.0
    ready: bool = False
    reason: str = "starting"

    def alive(self) -> bool:
        return time.monotonic() - self.last_tick < STALL_SECONDS


class _Pending:
    __slots__ = ("address", "deadline", "head")

    def __init__(self, address, deadline: float) -> None:
        self.address = address
        self.deadline = deadline
        self.head = bytearray()


class _Server(WSGIServer):
    """WSGIServer with its own serve loop: heads read without a thread per connection,
    answers by a bounded number of threads."""

    allow_reuse_address = True
    request_queue_size = 128  # the listen backlog: a burst of connections is not dropped

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slots = threading.BoundedSemaphore(MAX_SERVING_THREADS)
        self.heads: Dict[int, bytes] = {}     # id(connection) -> its head, for the handler
        self._stop = threading.Event()
        self._stopped = threading.Event()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stopped.clear()
        pending: Dict[socket.socket, _Pending] = {}
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            try:
                while not self._stop.is_set():
                    now = time.monotonic()
                    wake = min((p.deadline for p in pending.values()), default=now + poll_interval)
                    for key, _ in selector.select(max(min(wake - now, poll_interval), 0.0)):
                        if key.fileobj is self.socket:
                            self._accept(selector, pending)
                        else:
                            self._read_head(selector, pending, key.fileobj)
                    now = time.monotonic()
                    for conn in [c for c, p in pending.items() if p.deadline <= now]:
                        self._drop(selector, pending, conn)
            finally:
                for conn in list(pending):
                    self._drop(selector, pending, conn)
                self._stopped.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._stopped.wait()

    def _accept(self, selector, pending: Dict[socket.socket, _Pending]) -> None:
        try:
            conn, address = self.socket.accept()
        except OSError:  # out of descriptors, or the client left: try again next turn
            time.sleep(0.01)
            return
        if len(pending) >= MAX_PENDING:
            oldest = min(pending, key=lambda c: pending[c].deadline)
            self._drop(selector, pending, oldest)
        conn.setblocking(False)
        pending[conn] = _Pending(address, time.monotonic() + CONNECTION_TIMEOUT)
        selector.register(conn, selectors.EVENT_READ)

    def _read_head(self, selector, pending: Dict[socket.socket, _Pending], conn) -> None:
        entry = pending[conn]
        try:
            data = conn.recv(MAX_HEAD_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(selector, pending, conn)
            return
        entry.head += data
        if b"\r\n\r\n" not in entry.head and len(entry.head) < MAX_HEAD_BYTES:
            return
        selector.unregister(conn)
        del pending[conn]
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(conn)
            return
        conn.setblocking(True)
        conn.settimeout(CONNECTION_TIMEOUT)
        self.heads[id(conn)] = bytes(entry.head[:MAX_HEAD_BYTES])
        try:
            threading.Thread(target=self._answer, args=(conn, entry.address), name="metrics-answer",
                             daemon=True).start()
        except RuntimeError:  # no thread to be had
            self.heads.pop(id(conn), None)
            self.slots.release()
            self.shutdown_request(conn)

    def _answer(self, conn: socket.socket, address) -> None:
        try:
            self.finish_request(conn, address)
        except Exception:
            pass  # the client left or was too slow: nothing to report
        finally:
            self.heads.pop(id(conn), None)
            self.shutdown_request(conn)
            self.slots.release()

    def _drop(self, selector, pending: Dict[socket.socket, _Pending], conn: socket.socket) -> None:
        pending.pop(conn, None)
        try:
            selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()


class _QuietHandler(WSGIRequestHandler):
    timeout = CONNECTION_TIMEOUT  # each send of the answer

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.rfile = io.BytesIO(self.server.heads.get(id(self.request), b""))

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
