"""A stand-in OpenAI-compatible gateway for demos, tests and benchmarks (aiohttp, one loop).

`asyncproc sim --port 8000 --latency 0.2 --rate-503 0.1` answers /v1/completions,
/v1/chat/completions and /v1/embeddings with well-formed responses, after a latency, with
faults injected at the given rates. A request may also script its own fate with an
`x_sim` object in its payload (how tests get exact behaviour):

    {"x_sim": {"key": "a1", "script": [503, 429, 200], "retry_after": "1", "latency": 0.1}}

The n-th request with key "a1" gets script[n] (the last entry repeats); an entry may be a
status code, "drop" (the connection is closed without an answer) or a hostile mode.

Every success carries `x_sim` with the path, the objective header, the attempt number and
the time it was seen (and, with `"headers": true` in the request's `x_sim`, every header it
saw). `GET /sim/stats` returns counts; `GET /metrics` returns vLLM-style gauges. One event loop
serves thousands of connections, so a latency of seconds costs no thread per request.

With `--capacity N` it models an inference server's limits: N requests are served at once,
the rest wait in arrival order (so latency grows with the queue), and with `--queue-bound M`
a request that finds M already waiting is shed at once (`--shed-status`, 429 by default).
`/metrics` then reports running, waiting and KV-cache usage (running / capacity) as vLLM
names them, and `sim_running_requests{objective}` per inference objective as a gateway would.
A client that disconnects before its answer gives up its slot at once, or its place in the
line, as vLLM's OpenAI server aborts such a request; `/sim/stats` counts those requests and
the service time they had taken (`aborted`, `aborted_seconds`, by objective) apart from
`busy_seconds`, the service of requests that ran to the end.

A hostile gateway, for tests of asyncproc's bounds: `{"x_sim": {"hostile": MODE}}` (or a
script entry naming MODE) makes the answer misbehave, whatever the other options say:

- "drip": 200, Content-Length 1000000, the body one byte a second (`interval` seconds);
- "trickle": the status line and headers one byte a second, never finished;
- "huge": 200 with Content-Length 200 MB (`bytes`), then that many bytes as fast as read;
- "huge-chunked": 200 MB (`bytes`) in chunks, no length announced;
- "endless": a chunked body of 64-byte chunks every 50 ms, never ending;
- "reset": Content-Length 1000, 100 bytes, then a TCP reset;
- "short": Content-Length 1000, 100 bytes, then a clean close (less than declared);
- "long": a well-formed completion whose Content-Length covers it, then more bytes
  (more than declared; asyncproc must take the declared body and not reuse the rest).

Every mode but "long" should end as an error result ("response too large", final) or in
retries until the deadline ("attempt timed out", "read timeout" or a connection error), each
attempt within --request-timeout (and the deadline). `/sim/stats` counts them under by_status "hostile-MODE".
"""
from __future__ import annotations

import argparse
import asyncio
import random
import socket
import struct
import sys
import time
from collections import Counter, defaultdict, deque
from typing import Any, Dict, Optional

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

OBJECTIVE_HEADER = "x-gateway-inference-objective"
FAULTS = ("429", "503", "500", "400", "drop")
HOSTILE = ("drip", "trickle", "huge", "huge-chunked", "endless", "reset", "short", "long")
USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


class Sim:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.attempts: Dict[str, int] = defaultdict(int)
        self.by_status: Counter = Counter()
        self.by_path: Counter = Counter()
        self.objectives: Counter = Counter()
        self.requests = 0
        self.running = 0          # requests being served (holding one of the capacity's slots)
        self.waiters: deque = deque()
        self.peak_running = 0
        self.peak_waiting = 0
        self.shed = 0
        self.busy: Counter = Counter()          # seconds of service, by objective
        self.aborted: Counter = Counter()       # requests whose client left mid-request, by objective
        self.aborted_busy: Counter = Counter()  # seconds of service they had taken, by objective
        self.running_by: Counter = Counter()    # requests being served, by objective
        self.fault_rates = [(f, getattr(args, f"rate_{f}")) for f in FAULTS if getattr(args, f"rate_{f}")]
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def latency(self, scripted: Optional[float]) -> float:
        if scripted is not None:
            return float(scripted)
        if self.args.latency_max is None:
            return self.args.latency
        return self.rng.uniform(self.args.latency_min, self.args.latency_max)

    def fate(self, directive: Dict[str, Any], attempt: int) -> Any:
        script = directive.get("script")
        if isinstance(script, list) and script:
            return script[min(attempt, len(script) - 1)]
        if self.fault_rates:
            roll, edge = self.rng.random(), 0.0
            for fault, rate in self.fault_rates:
                edge += rate
                if roll < edge:
                    return fault
        return None

    # -- capacity ------------------------------------------------------------------------
    async def acquire(self) -> bool:
        """A slot to serve in, waiting in arrival order; False: shed (the queue is full)."""
        capacity = self.args.capacity
        if not capacity or (self.running < capacity and not self.waiters):
            self.running += 1
            self.peak_running = max(self.peak_running, self.running)
            return True
        bound = self.args.queue_bound
        if bound >= 0 and len(self.waiters) >= bound:
            return False
        slot = asyncio.get_running_loop().create_future()
        self.waiters.append(slot)
        self.peak_waiting = max(self.peak_waiting, len(self.waiters))
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                self.release()  # handed a slot just as the client left
            else:
                self.waiters.remove(slot)
            raise
        return True

    def release(self) -> None:
        while self.waiters:
            slot = self.waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot passes on: running stays the same
                return
        self.running -= 1

    # -- handlers ------------------------------------------------------------------------
    async def inference(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            payload = orjson.loads(raw)
            if not isinstance(payload, dict):
                raise ValueError
        except ValueError:
            self.by_status[400] += 1
            return _json(400, {"error": {"message": "body must be a JSON object", "type": "invalid_request_error"}})
        directive = payload.get("x_sim") if isinstance(payload.get("x_sim"), dict) else {}
        key = str(directive["key"]) if directive.get("key") is not None else None
        path = request.path
        self.requests += 1
        self.by_path[path] += 1
        objective = request.headers.get(OBJECTIVE_HEADER)
        if objective:
            self.objectives[objective] += 1
        attempt = 0
        if key is not None:
            attempt = self.attempts[key]
            self.attempts[key] += 1
        serial = self.requests
        arrived = time.time()
        label = objective or ""
        mode = directive.get("hostile")
        script = directive.get("script")
        if mode is None and isinstance(script, list) and script and script[min(attempt, len(script) - 1)] in HOSTILE:
            mode = script[min(attempt, len(script) - 1)]
        if mode is not None:
            return await self.hostile(request, str(mode), directive, payload, serial)
        if not await self.acquire():
            self.shed += 1
            status = self.args.shed_status
            self.by_status[status] += 1
            headers = {"Retry-After": str(self.args.retry_after)} if self.args.retry_after is not None else None
            return _json(status, {"error": {"message": "server at capacity", "code": status}}, headers)
        self.running_by[label] += 1
        started = time.monotonic()
        fate = None
        try:
            fate = self.fate(directive, attempt)
            delay = self.latency(directive.get("latency"))
            if delay > 0:
                await asyncio.sleep(delay)
            if fate == "drop":
                self.by_status["drop"] += 1
                request.transport.abort()  # closed without an answer
                raise asyncio.CancelledError
            status = int(fate) if fate is not None else 200
            if status != 200:
                self.by_status[status] += 1
                retry_after = directive.get("retry_after")
                if retry_after is None and status in (429, 503):
                    retry_after = self.args.retry_after
                headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
                return _json(status, {"error": {"message": f"simulated {status}", "code": status}}, headers)
            seen = {"path": path, "objective": objective, "attempt": attempt + 1, "key": key, "at": time.time(),
                    "arrived": arrived}
            if directive.get("headers"):  # echo the headers it saw (tests of what asyncproc sends)
                seen["headers"] = {name.lower(): value for name, value in request.headers.items()}
            doc = completion(path, payload.get("model", "sim"), serial)
            if doc is None:
                self.by_status[404] += 1
                return _json(404, {"error": {"message": "unknown endpoint"}})
            doc["x_sim"] = seen
            self.by_status[200] += 1
            return _json(200, doc)
        except asyncio.CancelledError:
            if fate != "drop":  # the client left (aiohttp cancels the handler): the work is thrown away
                self.aborted[label] += 1
                self.aborted_busy[label] += time.monotonic() - started
                started = None
            raise
        finally:
            if started is not None:
                self.busy[label] += time.monotonic() - started
            self.running_by[label] -= 1
            self.release()

    # -- hostile modes ---------------------------------------------------------------------
    async def hostile(self, request: web.Request, mode: str, directive: Dict[str, Any], payload: Dict[str, Any],
                      serial: int) -> web.StreamResponse:
        """Misbehave as `mode` says (see the module's help); the connection is closed after."""
        if mode not in HOSTILE:
            self.by_status[400] += 1
            return _json(400, {"error": {"message": f"unknown hostile mode {mode!r}; known: {', '.join(HOSTILE)}"}})
        self.by_status[f"hostile-{mode}"] += 1
        interval = float(directive.get("interval", 1.0))
        size = int(directive.get("bytes", 200_000_000))
        transport = request.transport
        try:
            if mode == "long":
                doc = orjson.dumps(completion(request.path, payload.get("model", "sim"), serial) or {})
                await _raw(request, _head(len(doc)) + doc + b"EXTRA BYTES BEYOND THE CONTENT-LENGTH " * 5)
            elif mode in ("reset", "short"):
                await _raw(request, _head(1000) + b"z" * 100)
                if mode == "reset" and transport is not None:
                    sock = transport.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif mode == "trickle":
                for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 1_000_000:
                    await _raw(request, bytes([byte]))
                    await asyncio.sleep(interval)
            elif mode == "drip":
                await _raw(request, _head(1_000_000))
                for _ in range(1_000_000):
                    await asyncio.sleep(interval)
                    await _raw(request, b" ")
            elif mode in ("huge", "huge-chunked", "endless"):
                chunked = mode != "huge"
                await _raw(request, _head(None if chunked else size))
                block = b"x" * (64 if mode == "endless" else 1 << 20)
                sent = 0
                while mode == "endless" or sent < size:
                    piece = block if mode == "endless" else block[:size - sent]
                    await _raw(request, b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                    sent += len(piece)
                    if mode == "endless":
                        await asyncio.sleep(0.05)
                if chunked:
                    await _raw(request, b"0\r\n\r\n")
        except (ConnectionError, OSError):
            pass  # the client gave up: what the bounds are for
        if transport is not None:
            if mode == "reset":
                transport.abort()
            else:
                transport.close()
        raise asyncio.CancelledError  # answered by hand: aiohttp sends nothing more

    async def stats(self, _request: web.Request) -> web.Response:
        return _json(200, {
            "requests": self.requests,
            "by_status": {str(k): v for k, v in self.by_status.items()},
            "by_path": dict(self.by_path),
            "objectives": dict(self.objectives),
            "attempts": dict(self.attempts),
            "capacity": self.args.capacity,
            "running": self.running,
            "running_by": {k: v for k, v in self.running_by.items() if v},
            "waiting": len(self.waiters),
            "peak_running": self.peak_running,
            "peak_waiting": self.peak_waiting,
            "shed": self.shed,
            "busy_seconds": dict(self.busy),
            "aborted": dict(self.aborted),
            "aborted_seconds": dict(self.aborted_busy),
            "time": time.time(),
        })

    async def health(self, _request: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

    def collect(self):
        """vLLM's gauge names, read from the sim's state at each scrape (prometheus_client)."""
        capacity = self.args.capacity
        usage = min(self.running / capacity, 1.0) if capacity else 0.0
        for name, doc, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", self.running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", len(self.waiters)),
            ("vllm:gpu_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage),
        ):
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(["sim"], value)
            yield family
        by_objective = GaugeMetricFamily("sim_running_requests",
                                         "Requests being served, by inference objective ('' = none).",
                                         labels=["objective"])
        for objective, count in sorted(self.running_by.items()):
            by_objective.add_metric([objective], count)
        yield by_objective

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/sim/stats", self.stats)
        app.router.add_get("/health", self.health)
        app.router.add_get("/healthz", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/{path:.*}", self.inference)
        return app


def completion(path: str, model: Any, serial: int) -> Optional[Dict[str, Any]]:
    created = int(time.time())
    if path.endswith("/chat/completions"):
        return {"id": f"chatcmpl-{serial}", "object": "chat.completion", "created": created, "model": model,
                "usage": USAGE, "choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant", "content": "simulated reply"}}]}
    if path.endswith("/completions"):
        return {"id": f"cmpl-{serial}", "object": "text_completion", "created": created, "model": model,
                "usage": USAGE, "choices": [{"index": 0, "text": " simulated reply", "finish_reason": "length"}]}
    if path.endswith("/embeddings"):
        return {"object": "list", "model": model, "usage": USAGE,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}]}
    return None


def _head(length: Optional[int]) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{framing}\r\n\r\n".encode()


async def _raw(request: web.Request, data: bytes) -> None:
    """Bytes straight onto the connection, waiting while the client reads slower."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client gone")
    transport.write(data)
    while transport.get_write_buffer_size() > (1 << 20):  # the client reads slower
        await asyncio.sleep(0.01)
        if transport.is_closing():
            raise ConnectionResetError("client gone")


def _json(status: int, doc: Any, headers: Optional[Dict[str, str]] = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json", headers=headers)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asyncproc sim", description=__doc__.split("\n\n")[0],
                                epilog=__doc__[__doc__.index("A hostile gateway"):],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one")
    p.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    p.add_argument("--latency-min", type=float, default=0.0, help="uniform latency: low end")
    p.add_argument("--latency-max", type=float, default=None, help="uniform latency: high end")
    for fault in FAULTS:
        what = "close the connection without answering" if fault == "drop" else f"answer {fault}"
        p.add_argument(f"--rate-{fault}", type=float, default=0.0, help=f"fraction of requests to {what}")
    p.add_argument("--capacity", type=int, default=0, help="requests served at once; 0 = unlimited")
    p.add_argument("--queue-bound", type=int, default=-1,
                   help="with --capacity: requests that may wait; one more is shed (-1 = unbounded)")
    p.add_argument("--shed-status", type=int, default=429, choices=(429, 503), help="status of a shed request")
    p.add_argument("--retry-after", default=None, help="Retry-After value sent with 429/503")
    p.add_argument("--seed", type=int, default=None, help="random seed for latency and faults")
    return p


async def serve(args: argparse.Namespace) -> None:
    # handler_cancellation: a client that disconnects cancels its handler, freeing its slot (as vLLM aborts it)
    runner = web.AppRunner(Sim(args).app(), access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=4096, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        print(f"asyncproc sim: error: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        raise SystemExit(2) from None
    host, port = runner.addresses[0][:2]
    print(f"asyncproc sim listening on http://{host}:{port}", flush=True)
    await asyncio.Event().wait()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if sum(getattr(args, f"rate_{f}") for f in FAULTS) > 1.0:
        parser.error("the --rate-* options add up to more than 1")
    try:
        import uvloop  # optional: a faster event loop when installed

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0
