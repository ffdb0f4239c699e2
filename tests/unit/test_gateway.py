"""The worker's HTTP layer against a real local HTTP server (real sockets, real timeouts)."""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from asyncproc.gateway import BASE_HEADERS, Gateway
from asyncproc.outcomes import Assignment, Kind

SEEN = []


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    accepted = 0   # connections the server accepted

    def setup(self):
        type(self).accepted += 1
        super().setup()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        SEEN.append((self.path, dict(self.headers), body))
        if self.path == "/slow":
            time.sleep(2)
        status, headers, out = {
            "/shed": (429, {"Retry-After": "7"}, b'{"error": "busy"}'),
            "/bad": (400, {}, b'{"error": "no such model"}'),
            "/text": (200, {}, b"plain"),
        }.get(self.path, (200, {}, json.dumps({"choices": []}).encode()))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(out)))
        try:
            self.end_headers()
            self.wfile.write(out)
        except BrokenPipeError:
            pass  # the client gave up (the timeout test)


@pytest.fixture(scope="module")
def origin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def job(origin, path="/v1/completions", deadline_in=60.0, objective="food"):
    headers = dict(BASE_HEADERS, **({"x-gateway-inference-objective": objective} if objective else {}))
    return Assignment("k", origin, path, b'{"prompt": "hi"}', headers, time.time() + deadline_in, 5.0, 300.0)


def test_post_sends_payload_and_objective_header(origin):
    SEEN.clear()
    outcome = Gateway().post(job(origin))
    assert outcome.kind is Kind.OK and outcome.status == 200 and json.loads(outcome.body) == {"choices": []}
    path, headers, body = SEEN[0]
    assert path == "/v1/completions" and body == b'{"prompt": "hi"}'
    assert headers["Content-Type"] == "application/json"
    assert headers["x-gateway-inference-objective"] == "food"


def test_connections_are_reused(origin):
    gateway = Gateway()
    accepted = Handler.accepted
    for _ in range(3):
        assert gateway.post(job(origin)).kind is Kind.OK
    assert Handler.accepted - accepted == 1   # one socket, kept alive
    assert gateway.origins.made() == 1


def test_a_connection_the_gateway_closed_while_idle_is_opened_again():
    """A gateway may close a kept-alive connection between requests (idle timeout, restart)
    without saying so: the next request must notice and connect afresh, not fail."""
    listener = socket.create_server(("127.0.0.1", 0))
    served, closed = [], threading.Event()

    def serve():
        for _ in range(2):
            conn, _ = listener.accept()
            data = b""
            while b"\r\n\r\n" not in data or not data.endswith(b'{"prompt": "hi"}'):
                data += conn.recv(65536)
            served.append(data)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")  # keep-alive, then...
            conn.close()                                                     # ...closed anyway
            closed.set()

    threading.Thread(target=serve, daemon=True).start()
    origin = f"http://127.0.0.1:{listener.getsockname()[1]}"
    gateway = Gateway()
    try:
        assert gateway.post(job(origin)).kind is Kind.OK
        assert closed.wait(5)
        outcome = gateway.post(job(origin))
        assert outcome.kind is Kind.OK, outcome
        assert len(served) == 2
    finally:
        gateway.close()
        listener.close()


@pytest.mark.parametrize("path, kind, status, retry_after", [
    ("/shed", Kind.SHED, 429, "7"),
    ("/bad", Kind.FATAL, 400, None),
    ("/text", Kind.OK, 200, None),
])
def test_statuses(origin, path, kind, status, retry_after):
    outcome = Gateway().post(job(origin, path))
    assert (outcome.kind, outcome.status, outcome.retry_after) == (kind, status, retry_after)
    if kind is Kind.FATAL:
        assert outcome.error == 'gateway returned HTTP 400: {"error": "no such model"}'


def test_read_timeout_is_bounded_by_the_deadline(origin):
    started = time.monotonic()
    outcome = Gateway().post(job(origin, "/slow", deadline_in=0.5))
    assert outcome.kind is Kind.RETRY and outcome.error == "read timeout"
    assert time.monotonic() - started < 1.5


def test_connection_refused_is_retryable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outcome = Gateway().post(job(f"http://127.0.0.1:{port}"))
    assert outcome.kind is Kind.RETRY and outcome.error.startswith("connection error")
    assert "refused" in outcome.error.lower()


def test_no_attempt_after_the_deadline(origin):
    SEEN.clear()
    outcome = Gateway().post(job(origin, deadline_in=-1))
    assert outcome.kind is Kind.EXPIRED and SEEN == []


class Writes:
    """A connected socket that records what each `sendall` carried (and sends it)."""

    def __init__(self, sock):
        self.sock, self.writes = sock, []

    def sendall(self, data):
        self.writes.append(bytes(data))
        self.sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self.sock, name)


@pytest.mark.parametrize("size", [0, 16, 64 * 1024, 64 * 1024 + 1, 300 * 1024])
def test_a_request_head_and_body_leave_in_one_write_up_to_64_kib(origin, size):
    """A request's head and a body up to 64 KiB are one write (one system call, one segment
    for the gateway to wake for); a larger body follows the head, not copied. Either way the
    gateway reads the request whole and answers it."""
    http = Gateway()
    body = bytes(i % 253 for i in range(size))
    attempt = http.begin(job(origin)._replace(key=f"w{size}", body=body))
    attempt.conn.connect()
    attempt.conn.sock = recorded = Writes(attempt.conn.sock)
    SEEN.clear()
    assert http.send(attempt) is None
    outcome = http.receive(attempt)
    assert outcome.kind is Kind.OK and outcome.status == 200
    assert SEEN[-1][2] == body and SEEN[-1][1]["Content-Length"] == str(size)
    head = recorded.writes[0][:recorded.writes[0].index(b"\r\n\r\n") + 4]
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert recorded.writes == ([head + body] if size <= 64 * 1024 else [head, body])
    http.close()
