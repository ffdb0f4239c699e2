"""Worker-side HTTP: urllib3 connections kept alive per gateway origin (origins.py, which
also opens one without waiting where the origin's address is known); one attempt is a
send, a wait for the answer, and a receive, so a worker can have thousands of attempts in
flight without a thread blocked on each (the worker's loop parks the sockets in between,
see worker.py); timeouts bounded by the deadline, no hidden retries.

Bounded whatever the gateway does: the body is read in chunks up to `max_response_bytes`
(more: a final "response too large", the connection discarded), and one attempt, headers
and body, ends within min(request timeout, time left to the deadline). Socket timeouts
alone do not bound a gateway that trickles a byte at a time, so each attempt records the
socket it uses and the worker's main loop calls `expire_overdue()`: it shuts down the
socket of an attempt past its budget, the blocked read fails, and the attempt is a
retryable "attempt timed out".

urllib3's connections (`urllib3.connection.HTTPConnection` / `HTTPSConnection`: TLS,
connect errors, the request line and header checks), not its pool and not requests: one
attempt holds one connection from its send to its receive, and a connection the gateway
closed while it sat idle is noticed before it is used again (as urllib3's pool does). The
answer is read through http.client's response, as urllib3's `getresponse` does underneath;
urllib3's response object around it is made only to decode a Content-Encoding. The pool's
per-request machinery (checkout and return under a lock, retry objects, URL re-encoding),
urllib3's response object (a header dict, decoder set-up, length bookkeeping: with its
`request()`, a quarter to a third of a worker's CPU per request) and requests' (hooks,
cookie jars, proxy lookup) cost more CPU than the whole rest of a dispatch (see the
README's performance section).
"""
from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Union

import urllib3
from urllib3 import exceptions as u3
from urllib3.connection import HTTPConnection, HTTPSConnection

from asyncproc import outcomes
from asyncproc.origins import OneWrite, Origins
from asyncproc.outcomes import Assignment, Outcome

#: Never start an attempt with less time than this before the deadline.
MIN_ATTEMPT_SECONDS = 0.05
BASE_HEADERS = {"Content-Type": "application/json", "User-Agent": "asyncproc"}
#: The body is read this much at a time (and the size and time checked in between).
READ_CHUNK = 256 * 1024
TIMED_OUT = "attempt timed out"
#: Each connection's send buffer: a request body up to `INLINE_SEND_BYTES` then fits in it
#: whole (a connection is idle, its buffer empty, when an attempt takes it), so sending it
#: never waits for the gateway to read (the kernel may round the buffer down to its limit).
SEND_BUFFER_BYTES = 256 * 1024
INLINE_SEND_BYTES = 64 * 1024
#: How much of an answer `answer_state` looks at: a larger one is read by a thread.
PEEK_BYTES = 64 * 1024
#: A plain int: `socket.MSG_PEEK | socket.MSG_DONTWAIT` is an IntFlag operation (microseconds
#: of enum machinery, once per answer).
_PEEK_FLAGS = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
SOCKET_OPTIONS = HTTPConnection.default_socket_options + [
    (socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)]


#: How long a cancel for a key not (yet) being attempted here is remembered: it may be
#: queued for a thread, or its outcome already on its way back.
CANCEL_MEMORY_SECONDS = 60.0


class Attempt:
    """One attempt in flight: its job, when its budget ends (monotonic), the connection and
    socket it uses, and whether it was cancelled or expired (its socket shut from the
    worker's main loop)."""

    __slots__ = ("job", "started", "ends_at", "connect_timeout", "conn", "sock", "expired", "done",
                 "key", "cancelled", "overrun")

    def __init__(self, job: Assignment, started: float, ends_at: float, connect_timeout: float) -> None:
        self.job = job
        self.key = job.key
        self.started = started
        self.ends_at = ends_at
        self.connect_timeout = connect_timeout
        self.conn: Optional[HTTPConnection] = None
        self.sock: Optional[socket.socket] = None
        self.expired = False
        self.done = False
        self.cancelled = False
        self.overrun = False   # bytes came after the answer (seen by answer_state): not reused

    def shut(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed

    def record(self, sock: Optional[socket.socket]) -> None:
        """The socket this attempt reads from now on; shut at once if the attempt ended while
        it was connecting (cancel and expiry set their flag, then shut what is recorded)."""
        self.sock = sock
        if self.cancelled or self.expired:
            self.shut()

    def inline_send(self) -> bool:
        """Whether the main loop can send this attempt without waiting: over a connection
        already open, with a body that fits the empty send buffer."""
        conn = self.conn
        return conn is not None and conn.sock is not None and len(self.job.body) <= INLINE_SEND_BYTES


class Gateway:
    """The HTTP side of one worker process: its attempts in flight and its idle connections,
    shared by the worker's loop and threads."""

    def __init__(self, tls: Optional[Any] = None) -> None:
        self.origins = Origins(tls_options(tls), SOCKET_OPTIONS)   # connections kept, addresses found
        self._attempts: Dict[int, Attempt] = {}   # id(attempt) -> attempt in flight
        self._attempts_lock = threading.Lock()
        self._cancelled: Dict[str, float] = {}    # keys cancelled before their attempt began -> when
        # The earliest budget end among the attempts in flight (or sooner): expire_overdue()
        # returns at once before it, instead of walking thousands of attempts ten times a second.
        self._next_expiry = float("inf")

    def in_flight(self) -> int:
        return len(self._attempts)

    @property
    def next_expiry(self) -> float:
        """Monotonic time before which `expire_overdue` has nothing to do."""
        return self._next_expiry

    def post(self, job: Assignment, clock: Callable[[], float] = time.time) -> Outcome:
        """POST the payload once and classify what came back (README: Dispatch and retries),
        waiting for the answer on this thread."""
        attempt = self.begin(job, clock)
        if isinstance(attempt, Outcome):
            return attempt
        outcome = self.send(attempt)
        return outcome if outcome is not None else self.receive(attempt)

    def begin(self, job: Assignment, clock: Callable[[], float] = time.time) -> Union[Attempt, Outcome]:
        """The attempt for `job`, with its budget and a connection, or its outcome already
        (no time left, or cancelled before it began)."""
        remaining = job.deadline - clock()
        if remaining < MIN_ATTEMPT_SECONDS:
            return outcomes.expired()
        budget = min(job.request_timeout, remaining)
        started = time.monotonic()
        attempt = Attempt(job, started, started + budget, min(job.connect_timeout, remaining))
        attempt.conn = self.origins.take(job.origin)
        with self._attempts_lock:
            cancelled = self._cancelled.pop(job.key, None) is not None
            if not cancelled:   # from here on it is in flight until `_end`
                self._attempts[id(attempt)] = attempt
                self._next_expiry = min(self._next_expiry, attempt.ends_at)
        if cancelled:
            self.origins.give_back(job.origin, attempt.conn)   # unused: kept for the next attempt
            return outcomes.cancelled()
        return attempt

    def send(self, attempt: Attempt, wait: bool = True) -> Optional[Outcome]:
        """Connect if need be and send the request; None when sent, else the attempt's
        outcome (it failed, and is over). `wait=False` (the worker's loop, over an open
        connection with a body that fits its empty send buffer): the socket is left
        non-blocking, so no call polls it first, and one that would wait fails instead."""
        conn, job = attempt.conn, attempt.job
        try:
            if conn.sock is None:
                conn.timeout = attempt.connect_timeout
                conn.connect()
                self.origins.found(job.origin, conn.sock)
            attempt.record(conn.sock)
            _set_timeout(conn.sock, _timeout(attempt, wait))   # sending, then the answer
            _write_request(conn, job)
        except FAILURES as exc:
            return self._end(attempt, _failure(exc, attempt), clean=False)
        return None

    def receive(self, attempt: Attempt, wait: bool = True) -> Outcome:
        """Read and classify the answer to a sent attempt; this waits for it, so the worker's
        loop calls it only once `answer_state` finds it WHOLE (a thread otherwise), with
        `wait=False`: all of it is there, so the socket is read without polling it first."""
        conn, job = attempt.conn, attempt.job
        clean = False
        try:
            _set_timeout(conn.sock, _timeout(attempt, wait))
            response = _read_head(conn)
        except FAILURES as exc:
            return self._end(attempt, _failure(exc, attempt), clean)
        try:
            limit = job.max_response_bytes
            declared = _content_length(response)
            elapsed = time.monotonic() - attempt.started
            if declared is not None and declared > limit:
                return self._end(attempt, outcomes.too_large(response.status, limit, elapsed), clean)
            encoded = "Content-Encoding" in response.headers
            if declared is not None and 0 < declared <= READ_CHUNK and not encoded:
                body = response.read()  # the common case: one read, no loop (short: IncompleteRead)
            else:
                body = self._read(_decoding(response) if encoded else response, attempt, limit)
                if body is None:
                    return self._end(attempt, outcomes.too_large(response.status, limit,
                                                                  time.monotonic() - attempt.started), clean)
            if attempt.expired:  # a body read "to the end" because its socket was shut
                return self._end(attempt, outcomes.connection_failure(
                    TIMED_OUT, time.monotonic() - attempt.started), clean)
            # 204 and 304 have no body by HTTP: bytes a gateway sent anyway would be read as
            # the next answer on this connection, so it is not used again.
            clean = response.status not in NO_BODY and not attempt.overrun
        except FAILURES as exc:
            return self._end(attempt, _failure(exc, attempt), clean)
        finally:
            if not clean:
                response.close()
        return self._end(attempt, outcomes.from_response(response.status, body, response.headers.get("Retry-After"),
                                                         time.monotonic() - attempt.started), clean)

    # -- opening a connection without waiting (the worker's loop) ---------------------------
    def opens_now(self, attempt: Attempt, now: float) -> bool:
        """Whether the worker's loop can open this attempt's connection itself: plain HTTP to
        an origin whose address a helper's connection found lately (`Origins.knows`), and a
        body the loop may send."""
        return self.origins.knows(attempt.job.origin, now) and self.may_open_later(attempt)

    def may_open_later(self, attempt: Attempt) -> bool:
        """Whether the loop could open this attempt's connection itself once a helper's
        connection has found the origin's address: plain HTTP, a body the loop may send."""
        return (attempt.conn.sock is None and not isinstance(attempt.conn, HTTPSConnection)
                and len(attempt.job.body) <= INLINE_SEND_BYTES)

    def open_now(self, attempt: Attempt) -> Optional[Outcome]:
        """Start connecting to the origin's known address without waiting; None while it
        connects (`opened` says how it went, once the socket is writable), else the
        attempt's outcome."""
        try:
            sock = self.origins.connect_now(attempt.job.origin)
        except OSError as exc:
            return self._failed_open(attempt, None, f"connection error: {_reason(exc)}")
        attempt.record(sock)   # a cancel or expiry from now on shuts it
        return None

    def opened(self, attempt: Attempt) -> Optional[Outcome]:
        """The socket `open_now` started is writable: connected (None; the connection has it
        now), or the attempt's outcome (refused, unreachable, cancelled, past its budget)."""
        sock = attempt.sock
        if attempt.cancelled or attempt.expired:
            return self._failed_open(attempt, sock, TIMED_OUT if attempt.expired else "connection error: cancelled",
                                     forget=False)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            return self._failed_open(attempt, sock, f"connection error: {_reason(OSError(error, os.strerror(error)))}")
        attempt.conn.sock = sock
        return None

    def open_timed_out(self, attempt: Attempt) -> Outcome:
        """The socket `open_now` started did not connect within the attempt's connect timeout."""
        return self._failed_open(attempt, attempt.sock, "connect timeout")

    def _failed_open(self, attempt: Attempt, sock: Optional[socket.socket], reason: str,
                     forget: bool = True) -> Outcome:
        """An attempt whose connection could not be opened from the loop: the socket closed,
        the address forgotten (the next connection is opened by a helper, which looks the
        name up again), the attempt over (retryable)."""
        if sock is not None:
            sock.close()
        if forget:
            self.origins.forget(attempt.job.origin)
        return self._end(attempt, outcomes.connection_failure(reason, time.monotonic() - attempt.started), False)

    def send_now(self, attempt: Attempt) -> Optional[Outcome]:
        return self.send(attempt, wait=False)

    def receive_now(self, attempt: Attempt) -> Outcome:
        return self.receive(attempt, wait=False)

    def abandon(self, attempt: Attempt, reason: str) -> Outcome:
        """End an attempt that met an unexpected error (a bug costs one attempt, retried)."""
        return self._end(attempt, outcomes.connection_failure(reason, time.monotonic() - attempt.started), False)

    def _end(self, attempt: Attempt, outcome: Outcome, clean: bool) -> Outcome:
        """The attempt is over: forget it, keep its connection for the next one when the
        exchange ended cleanly (else discard it: the next connects afresh)."""
        with self._attempts_lock:
            ended, attempt.done = attempt.done, True
            self._attempts.pop(id(attempt), None)
        if ended:  # already ended (abandoned after a bug): its connection is accounted for
            return outcome
        conn = attempt.conn
        if not clean or attempt.cancelled:
            if attempt.sock is not None and attempt.sock is not conn.sock:
                attempt.sock.close()   # one the loop was still opening
            conn.close()  # never reused as it is: the next attempt on it connects afresh
        self.origins.give_back(attempt.job.origin, conn)
        if attempt.cancelled and outcome.status is None:  # aborted before an answer came
            return outcomes.cancelled(outcome.elapsed)
        return outcome

    def cancel(self, keys, now: Optional[float] = None, remember: bool = True) -> int:
        """Abort the attempts of `keys`: shut their sockets (the blocked call fails at once
        and the attempt ends as cancelled); a key not being attempted yet is cancelled when
        its attempt would begin, unless `remember` is false (a preemption: it is about this
        attempt only, and the request is attempted again). The connection is discarded."""
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
                if getattr(response, "length", None):  # http.client's: bytes declared, not sent
                    raise http.client.IncompleteRead(b"".join(chunks), response.length)
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
        self.origins.close()


#: Statuses whose answers have no body whatever their headers say (http.client reads none).
NO_BODY = (204, 304)
_HEAD_END = b"\r\n\r\n"
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]{1,9})[ \t]*\r\n", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:", re.IGNORECASE)


#: What `answer_state` finds on a parked socket.
NOTHING, PART, WHOLE, HELPER = "nothing", "part", "whole", "helper"


def answer_state(attempt: Attempt) -> str:
    """How much of the answer to a sent attempt has arrived: WHOLE when the socket holds a
    final status line, headers with a Content-Length and that many bytes of body (or the
    connection ended), so `receive` reads it without waiting; PART when the rest may follow
    at once (a server that writes headers and body apart); NOTHING after a spurious
    wake-up; HELPER when a thread must read it: larger than `PEEK_BYTES`, chunked, read
    until close, interim, or TLS (what arrived is records, not the answer). Only looks
    (MSG_PEEK): http.client still parses whatever arrived."""
    sock = attempt.sock
    if sock is None:
        return WHOLE
    if isinstance(sock, ssl.SSLSocket):
        return HELPER
    try:
        data = sock.recv(PEEK_BYTES, _PEEK_FLAGS)
    except (BlockingIOError, InterruptedError):
        return NOTHING
    except OSError:
        return WHOLE   # reset or shut: receive fails at once
    if not data:
        return WHOLE
    end = data.find(_HEAD_END)
    if end < 0:
        return PART if len(data) < PEEK_BYTES else HELPER
    if not data.startswith(b"HTTP/1.") or data[9:10] == b"1":
        return HELPER
    length = _CONTENT_LENGTH.search(data, 0, end + 2)
    if length is None or _CHUNKED.search(data, 0, end):
        return HELPER
    whole = end + len(_HEAD_END) + int(length.group(1))
    if len(data) >= whole:
        attempt.overrun = len(data) > whole   # more than the answer: never read as the next one
        return WHOLE
    return PART if whole <= PEEK_BYTES else HELPER


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


def _failure(exc: BaseException, attempt: Attempt) -> Outcome:
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
    return outcomes.connection_failure(reason, time.monotonic() - attempt.started)


def _timeout(attempt: Attempt, wait: bool) -> float:
    """The socket timeout for the next step of an attempt: what is left of its budget, or
    0 (non-blocking: CPython polls a socket with a timeout before every call, one system
    call more per send and per read) when the caller knows the step cannot wait."""
    return max(attempt.ends_at - time.monotonic(), 0.001) if wait else 0.0


def _write_request(conn: OneWrite, job: Assignment) -> None:
    """POST the job over `conn`: urllib3's request line and header checks (a header that
    could split the request is refused), Content-Length framing, the body, the head and a
    body up to 64 KiB in one write (`origins.OneWrite`). What urllib3's `request()` does
    for a bytes body, without the response bookkeeping `_read_head` does not need; Host
    and Accept-Encoding: identity are added unless the job's headers have them (as urllib3
    does)."""
    headers = job.headers
    named = {name.lower() for name in headers}
    conn.putrequest("POST", job.path, skip_host="host" in named, skip_accept_encoding="accept-encoding" in named)
    conn.putheader("Content-Length", str(len(job.body)))
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.end_request(job.body)


def _read_head(conn: HTTPConnection) -> http.client.HTTPResponse:
    """The answer's status line and headers, parsed by http.client, as urllib3's own
    `getresponse` does before it wraps them in its response object; the wrapper (its header
    dict and decoders) is made only for an answer with a Content-Encoding (`_decoding`)."""
    return http.client.HTTPConnection.getresponse(conn)


def _decoding(response: http.client.HTTPResponse) -> urllib3.HTTPResponse:
    """urllib3's response over an encoded answer: it decodes the body as it is read (the
    size limit counts decoded bytes) and raises on a body shorter than declared."""
    return urllib3.HTTPResponse(body=response, headers=urllib3.HTTPHeaderDict(response.msg.items()),
                                status=response.status, reason=response.reason, preload_content=False,
                                decode_content=True, original_response=response, enforce_content_length=True,
                                request_method="POST")


def _set_timeout(sock: socket.socket, timeout: float) -> None:
    """A socket's timeout set only when it changes: each `settimeout` is a system call."""
    if sock.gettimeout() != timeout:
        sock.settimeout(timeout)


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
