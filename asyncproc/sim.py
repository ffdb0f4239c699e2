"""A stand-in OpenAI-compatible gateway for demos, tests and benchmarks.

`asyncproc sim --port 8000 --latency 0.2 --rate-503 0.1` answers /v1/completions,
/v1/chat/completions and /v1/embeddings with well-formed responses, after a latency, with
faults injected at the given rates. A request may also script its own fate with an
`x_sim` object in its payload (how tests get exact behaviour):

    {"x_sim": {"key": "a1", "script": [503, 429, 200], "retry_after": "1", "latency": 0.1}}

The n-th request with key "a1" gets script[n] (the last entry repeats); an entry may be a
status code or "drop" (the connection is closed without an answer). Every success carries
`x_sim` with the path, the objective header, the attempt number and the time it was seen.
`GET /sim/stats` returns counts; `GET /metrics` returns vLLM-style gauges.
"""
from __future__ import annotations

import argparse
import random
import socket
import sys
import threading
import time
from collections import Counter, defaultdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional, Tuple

import orjson

OBJECTIVE_HEADER = "x-gateway-inference-objective"
FAULTS = ("429", "503", "500", "400", "drop")


class SimState:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.lock = threading.Lock()
        self.attempts: Dict[str, int] = defaultdict(int)
        self.by_status: Counter = Counter()
        self.by_path: Counter = Counter()
        self.objectives: Counter = Counter()
        self.requests = 0
        self.running = 0
        self.counter = 0

    def latency(self, scripted: Optional[float]) -> float:
        if scripted is not None:
            return float(scripted)
        low, high = self.args.latency_min, self.args.latency_max
        if high is None:
            return self.args.latency
        return self.rng.uniform(low, high)

    def random_fault(self) -> Optional[str]:
        roll = self.rng.random()
        edge = 0.0
        for fault in FAULTS:
            edge += getattr(self.args, f"rate_{fault}")
            if roll < edge:
                return fault
        return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "asyncproc-sim"
    sim: SimState  # set on the subclass made by make_server

    def log_message(self, format, *args):  # noqa: A002 - quiet: the sim serves thousands/s
        pass

    def setup(self) -> None:
        super().setup()
        # Small writes must not wait for the client's delayed ACK (Nagle).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- GET: stats, health, metrics --------------------------------------------------------
    def do_GET(self) -> None:
        sim = self.sim
        if self.path == "/sim/stats":
            with sim.lock:
                body = {
                    "requests": sim.requests,
                    "by_status": {str(k): v for k, v in sim.by_status.items()},
                    "by_path": dict(sim.by_path),
                    "objectives": dict(sim.objectives),
                    "attempts": dict(sim.attempts),
                }
            self._send(200, orjson.dumps(body))
        elif self.path in ("/health", "/healthz"):
            self._send(200, b'{"status":"ok"}')
        elif self.path == "/metrics":
            text = (
                "# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{model_name="sim"}} {sim.running}\n'
                "# TYPE vllm:num_requests_waiting gauge\n"
                'vllm:num_requests_waiting{model_name="sim"} 0\n'
            )
            self._send(200, text.encode(), "text/plain; version=0.0.4")
        else:
            self._send(404, b'{"error":{"message":"not found"}}')

    # -- POST: the inference API -------------------------------------------------------------
    def do_POST(self) -> None:
        sim = self.sim
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            payload = orjson.loads(raw)
            if not isinstance(payload, dict):
                raise ValueError
        except ValueError:
            self._record(400, None)
            self._send(400, b'{"error":{"message":"body must be a JSON object","type":"invalid_request_error"}}')
            return
        directive = payload.get("x_sim") if isinstance(payload.get("x_sim"), dict) else {}
        key = str(directive.get("key")) if directive.get("key") is not None else None
        with sim.lock:
            sim.requests += 1
            sim.by_path[self.path] += 1
            objective = self.headers.get(OBJECTIVE_HEADER)
            if objective:
                sim.objectives[objective] += 1
            attempt = 0
            if key is not None:
                attempt = sim.attempts[key]
                sim.attempts[key] += 1
            sim.running += 1
            sim.counter += 1
            serial = sim.counter
        try:
            fate = self._fate(directive, attempt)
            delay = sim.latency(directive.get("latency"))
            if delay > 0:
                time.sleep(delay)
            if fate == "drop":
                self._record("drop", None)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            status = int(fate) if fate is not None else 200
            retry_after = directive.get("retry_after")
            if retry_after is None and status in (429, 503) and sim.args.retry_after is not None:
                retry_after = sim.args.retry_after
            if status != 200:
                self._record(status, None)
                body = orjson.dumps({"error": {"message": f"simulated {status}", "code": status}})
                headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
                self._send(status, body, extra=headers)
                return
            body = self._completion(payload, serial, {
                "path": self.path, "objective": objective, "attempt": attempt + 1,
                "key": key, "at": time.time(),
            })
            if body is None:
                self._record(404, None)
                self._send(404, b'{"error":{"message":"unknown endpoint"}}')
                return
            self._record(200, None)
            self._send(200, body)
        finally:
            with sim.lock:
                sim.running -= 1

    def _fate(self, directive: Dict[str, Any], attempt: int) -> Any:
        script = directive.get("script")
        if isinstance(script, list) and script:
            return script[min(attempt, len(script) - 1)]
        return self.sim.random_fault()

    def _record(self, status: Any, _unused: Any) -> None:
        with self.sim.lock:
            self.sim.by_status[status] += 1

    def _completion(self, payload: Dict[str, Any], serial: int, seen: Dict[str, Any]) -> Optional[bytes]:
        model = payload.get("model", "sim")
        created = int(time.time())
        usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
        if self.path.endswith("/chat/completions"):
            doc = {
                "id": f"chatcmpl-{serial}", "object": "chat.completion", "created": created,
                "model": model, "usage": usage,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "simulated reply"}}],
            }
        elif self.path.endswith("/completions"):
            doc = {
                "id": f"cmpl-{serial}", "object": "text_completion", "created": created,
                "model": model, "usage": usage,
                "choices": [{"index": 0, "text": " simulated reply", "finish_reason": "length"}],
            }
        elif self.path.endswith("/embeddings"):
            doc = {"object": "list", "model": model, "usage": usage,
                   "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}]}
        else:
            return None
        doc["x_sim"] = seen
        return orjson.dumps(doc)

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              extra: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status, HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self._headers_buffer.append(b"\r\n" + body)  # headers and body in one write
        self.flush_headers()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


def make_server(args: argparse.Namespace) -> Tuple[_Server, SimState]:
    state = SimState(args)
    handler = type("BoundHandler", (Handler,), {"sim": state})
    server = _Server((args.host, args.port), handler)
    return server, state


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asyncproc sim", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one")
    p.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    p.add_argument("--latency-min", type=float, default=0.0, help="uniform latency: low end")
    p.add_argument("--latency-max", type=float, default=None, help="uniform latency: high end")
    for fault in FAULTS:
        what = "close the connection without answering" if fault == "drop" else f"answer {fault}"
        p.add_argument(f"--rate-{fault}", type=float, default=0.0, help=f"fraction of requests to {what}")
    p.add_argument("--retry-after", default=None, help="Retry-After value sent with 429/503")
    p.add_argument("--seed", type=int, default=None, help="random seed for latency and faults")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if sum(getattr(args, f"rate_{f}") for f in FAULTS) > 1.0:
        parser.error("the --rate-* options add up to more than 1")
    try:
        server, _state = make_server(args)
    except OSError as exc:
        print(f"asyncproc sim: error: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"asyncproc sim listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
