"""Worker-side HTTP: each worker thread keeps one urllib3 connection per gateway origin
alive and posts over it; timeouts bounded by the deadline, no hidden retries.

Bounded whatever the gateway does: the body is read in chunks up to `max_response_bytes`
(more: a final "response too large", the connection discarded), and one attempt, headers
and body, ends within min(request timeout, time left to the deadline). Socket timeouts
alone do not bound a gateway that trickles a byte at a time, so each attempt records the
socket it uses and the worker's main loop calls `expire_overdue()`: it shuts down the
socket of an attempt past its budget, the blocked read fails, and the attempt is a
retryable "attempt timed out".

urllib3's connections (`urllib3.connection.HTTPConnection` / `HTTPSConnection`: TLS,
connect errors, response objects), not its pool and not requests: a thread makes one
request at a time, so threads and connections pair one to one and a pool has nothing to
share; its per-request machinery (checkout and return, retry objects, URL re-encoding) and
requests' (hooks, cookie jars, proxy lookup) cost more CPU than the whole rest of a
dispatch (see the README's performance section). A connection the gateway closed while it
sat idle is noticed before it is used (as urllib3's pool does) and opened again.
"""
from __future__ import annotations

import http.client
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import urllib3
from urllib3 import exceptions as u3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.util import parse_url

from asyncproc import outcomes
from asyncproc.outcomes import Assignment, Outcome

#: Never start an attempt with less time than this before the deadline.
MIN_ATTEMPT_SECONDS = 0.05
BASE_HEADERS = {"Content-Type": "application/json", "User-Agent": "asyncproc"}
#: The body is read this much at a time (and the size and time checked in between).
READ_CHUNK = 256 * 1024
TIMED_OUT = "attempt timed out"


#: How long a cancel for a key not (yet) being attempted here is remembered: it may be
#: queued for a thread, or its outcome already on its way back.
CANCEL_MEMORY_SECONDS = 60.0


class Attempt:
    """One attempt in flight: when its budget ends (monotonic), the socket it reads, and
    whether it was cancelled (its socket shut from the worker's main loop)."""

    __slots__ = ("ends_at", "sock", "expired", "done", "key", "cancelled")

    def __init__(self, ends_at: float, key: str = "") -> None:
        self.ends_at = ends_at
        self.sock: Optional[socket.socket] = None
        self.expired = False
        self.done = False
        self.key = key
        self.cancelled = False

    def shut(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed


_current = threading.local()   # .attempt: the calling thread's Attempt, for the connection class


def _record_socket(sock: Optional[socket.socket]) -> None:
    attempt = getattr(_current, "attempt", None)
    if attempt is not None and sock is not None:
        attempt.sock = sock
        if attempt.cancelled or attempt.expired:  # ended while it was connecting
            attempt.shut()


class _Tracked:
    """Mixed into the pool's connection class: tells the calling thread's attempt which
    socket it uses (a fresh one after connect, a kept-alive one at request)."""

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        _record_socket(self.sock)  # type: ignore[attr-defined]

    def request(self, *args, **kwargs) -> None:
        _record_socket(self.sock)  # type: ignore[attr-defined]
        super().request(*args, **kwargs)  # type: ignore[misc]


_tracked_classes: Dict[type, type] = {}


def tracked(connection_cls: type) -> type:
    """`connection_cls` (HTTP or HTTPS, whatever the pool uses) with socket tracking."""
    if issubclass(connection_cls, _Tracked):
        return connection_cls
    cls = _tracked_classes.get(connection_cls)
    if cls is None:
        cls = _tracked_classes[connection_cls] = type(
            f"Tracked{connection_cls.__name__}", (_Tracked, connection_cls), {})
    return cls


class Gateway:
    """The HTTP side of one worker process, shared by its threads (each with connections of
    its own)."""

    def __init__(self, tls: Optional[Any] = None) -> None:
        self.tls_options = tls_options(tls)
        self._local = threading.local()           # .connections: origin -> this thread's connection
        self._connections: List[HTTPConnection] = []   # every one made, to close at the end
        self._lock = threading.Lock()
        self._attempts: Dict[int, Attempt] = {}   # thread ident -> its attempt in flight
        self._attempts_lock = threading.Lock()
        self._cancelled: Dict[str, float] = {}    # keys cancelled before their attempt began -> when
        # The earliest budget end among the attempts in flight (or sooner): expire_overdue()
        # returns at once before it, instead of walking thousands of attempts ten times a second.
        self._next_expiry = float("inf")

    def connection(self, origin: str) -> HTTPConnection:
        """The calling thread's connection to `origin` (scheme://host:port), made on first
        use; one the gateway closed while idle is closed here too, so the request reconnects."""
        connections = getattr(self._local, "connections", None)
        if connections is None:
            connections = self._local.connections = {}
        conn = connections.get(origin)
        if conn is None:
            url = parse_url(origin)
            https = url.scheme == "https"
            cls = tracked(HTTPSConnection if https else HTTPConnection)
            conn = cls(url.host, url.port or (443 if https else 80), **(self.tls_options if https else {}))
            connections[origin] = conn
            with self._lock:
                self._connections.append(conn)
        elif conn.sock is not None and not conn.is_connected:
            conn.close()
        return conn

    def connections_made(self) -> int:
        return len(self._connections)

    def post(self, job: Assignment, clock: Callable[[], float] = time.time) -> Outcome:
        """POST the payload once and classify what came back (README: Dispatch and retries)."""
        remaining = job.deadline - clock()
        if remaining < MIN_ATTEMPT_SECONDS:
            return outcomes.expired()
        budget = min(job.request_timeout, remaining)
        timeouts = (min(job.connect_timeout, remaining), budget)
        started = time.monotonic()
        attempt = Attempt(started + budget, job.key)
        ident = threading.get_ident()
        with self._attempts_lock:
            if self._cancelled.pop(job.key, None) is not None:
                return outcomes.cancelled()
            self._attempts[ident] = attempt
            if attempt.ends_at < self._next_expiry:
                self._next_expiry = attempt.ends_at
        _current.attempt = attempt
        try:
            outcome = self._attempt(job, timeouts, attempt, started)
        finally:
            _current.attempt = None
            with self._attempts_lock:
                attempt.done = True
                self._attempts.pop(ident, None)
        if attempt.cancelled and outcome.status is None:  # aborted before an answer came
            return outcomes.cancelled(outcome.elapsed)
        return outcome

    def cancel(self, keys, now: Optional[float] = None, remember: bool = True) -> int:
        """Abort the attempts of `keys`: shut their sockets (the blocked call fails at once
        and the attempt ends as cancelled); a key not being attempted yet is cancelled when
        its attempt would begin, unless `remember` is false (a preemption: it is about this
        attempt only, and the request is attempted again). The connection is discarded, the
        thread goes on."""
        now = time.monotonic() if now is None else now
        wanted = set(keys)
        aborted = 0
        with self._attempts_lock:
            for attempt in self._attempts.values():
                if attempt.key in wanted and not attempt.done:
                    wanted.discard(attempt.key)
                    attempt.cancelled = True
                    attempt.shut()
                    aborted += 1
            for key in wanted if remember else ():
                self._cancelled[key] = now
        return aborted

    def _attempt(self, job: Assignment, timeouts: Tuple[float, float], attempt: Attempt,
                 started: float) -> Outcome:
        conn = self.connection(job.origin)
        try:
            conn.timeout = timeouts[0]          # connecting, if it must
            conn.request("POST", job.path, body=job.body, headers=job.headers, preload_content=False)
            conn.timeout = timeouts[1]          # waiting for the answer
            response = conn.getresponse()
        except FAILURES as exc:
            conn.close()
            return _failure(exc, attempt, started)
        clean = False
        try:
            limit = job.max_response_bytes
            declared = _content_length(response)
            if declared is not None and declared > limit:
                return outcomes.too_large(response.status, limit, time.monotonic() - started)
            if declared is not None and 0 < declared <= READ_CHUNK and "Content-Encoding" not in response.headers:
                body = response.read(declared)  # the common case: one read, no loop (short: an error)
                clean = True
            else:
                body = self._read(response, attempt, limit)
                if body is None:
                    return outcomes.too_large(response.status, limit, time.monotonic() - started)
                clean = True
            if attempt.expired:  # a body read "to the end" because its socket was shut
                clean = False
                return outcomes.connection_failure(TIMED_OUT, time.monotonic() - started)
        except FAILURES as exc:
            return _failure(exc, attempt, started)
        finally:
            if not clean:
                response.close()
                conn.close()  # discarded, never reused: the next request connects afresh
        return outcomes.from_response(response.status, body, response.headers.get("Retry-After"),
                                      time.monotonic() - started)

    @staticmethod
    def _read(response, attempt: Attempt, limit: int) -> Optional[bytes]:
        """The body, or None when it grows past `limit`; ReadTimeoutError past the budget."""
        chunks: List[bytes] = []
        size = 0
        while True:
            left = attempt.ends_at - time.monotonic()
            if attempt.cancelled:
                raise u3.ProtocolError("cancelled")
            if left <= 0 or attempt.expired:
                attempt.expired = True
                raise u3.ReadTimeoutError(None, None, TIMED_OUT)  # type: ignore[arg-type]
            if chunks and attempt.sock is not None:
                try:
                    attempt.sock.settimeout(left)  # no single read outlives the budget either
                except OSError:
                    pass
            chunk = response.read(min(READ_CHUNK, limit - size + 1))
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)

    def expire_overdue(self, now: Optional[float] = None) -> List[Attempt]:
        """Shut the sockets of attempts past their budget (called by the worker's main loop,
        at least every half second): their blocked reads fail and they end as timeouts."""
        now = time.monotonic() if now is None else now
        expired: List[Attempt] = []
        with self._attempts_lock:
            if self._cancelled:
                for key in [k for k, at in self._cancelled.items() if now - at > CANCEL_MEMORY_SECONDS]:
                    del self._cancelled[key]
            if now < self._next_expiry:
                return expired
            next_expiry = float("inf")
            for attempt in self._attempts.values():
                if attempt.done:
                    continue
                if attempt.ends_at > now:
                    next_expiry = min(next_expiry, attempt.ends_at)
                    continue
                if not attempt.expired:
                    attempt.expired = True
                    expired.append(attempt)
                next_expiry = now  # still reading: shut again at the next call, until it ends
                if attempt.sock is not None:
                    try:
                        attempt.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass  # already closed
            self._next_expiry = next_expiry
        return expired

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()


def tls_options(tls: Optional[Any]) -> Dict[str, Any]:
    """urllib3 pool arguments for a config.TlsFiles: trusted CAs, client certificate (mTLS),
    verification (on unless explicitly turned off; the supervisor warns then)."""
    if tls is None:
        return {}
    options: Dict[str, Any] = {k: v for k, v in (("ca_certs", tls.ca_file), ("cert_file", tls.cert_file),
                                                 ("key_file", tls.key_file)) if v}
    if not tls.verify:
        options.update(cert_reqs="CERT_NONE", assert_hostname=False)
        urllib3.disable_warnings(u3.InsecureRequestWarning)  # said once at start, not per request
    return options


#: What an attempt can fail with: connecting, sending, or reading the answer.
FAILURES = (u3.HTTPError, http.client.HTTPException, OSError)


def _failure(exc: BaseException, attempt: Attempt, started: float) -> Outcome:
    """The retryable outcome of an attempt that failed with `exc`."""
    if isinstance(exc, u3.NewConnectionError):  # before ConnectTimeoutError: it is a subclass
        reason = f"connection error: {_reason(exc)}"
    elif isinstance(exc, u3.ConnectTimeoutError):
        reason = "connect timeout"
    elif attempt.expired:  # its socket was shut from the worker's main loop
        reason = TIMED_OUT
    elif isinstance(exc, (TimeoutError, socket.timeout, u3.ReadTimeoutError)):
        reason = "read timeout"
    else:
        reason = f"connection error: {_reason(exc)}"
    return outcomes.connection_failure(reason, time.monotonic() - started)


def _content_length(response) -> Optional[int]:
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    try:
        return int(value.split(",")[0].strip())
    except ValueError:
        return None


def _reason(exc: BaseException) -> str:
    """The innermost reason, without urllib3's object reprs."""
    text = str(exc)
    for marker in ("Failed to establish a new connection: ", "Connection aborted.', "):
        if marker in text:
            text = text.split(marker, 1)[1]
    text = text.strip("()'\" ")
    return text[:160] or type(exc).__name__
