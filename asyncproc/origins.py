"""The connections a worker keeps per gateway origin, and where each origin is.

Idle connections are reused newest first (deque pops and appends are atomic: the worker's
loop and its helper threads share them). The address a helper's connection found for a
plain-HTTP origin (its DNS answer) is kept for ADDRESS_SECONDS, so that the loop can open
connections to it without waiting (`connect_now`); after that, or once such a connection
fails, the next is opened by a helper again, which looks the name up again.

The connections are urllib3's, with one change (`OneWrite`): a request's head and its body
leave in one write.
"""
from __future__ import annotations

import collections
import errno
import os
import socket
import ssl
import time
from typing import Any, Deque, Dict, List, Optional

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.util import parse_url

#: How long an origin's address, as a helper's connection found it, is used.
ADDRESS_SECONDS = 30.0
#: A body up to this size is copied after the head and sent with it; a larger one follows it.
ONE_WRITE_BYTES = 64 * 1024


class OneWrite:
    """For urllib3's connections: the head and the body of a request leave in one write.
    http.client's `endheaders` writes the head, then the body: two system calls, and two
    segments the gateway wakes for (two passes through TCP on loopback). Corking the
    socket around them made one segment but cost two `setsockopt` calls more; one write of
    both costs 3-5 us of CPU a request less (README: Performance). The head is still made
    and checked by urllib3's `putrequest` and `putheader`; `send` is http.client's
    documented hook."""

    _held_body: Optional[bytes] = None   # the body `send` adds to the head

    def end_request(self, body: bytes) -> None:
        """End the head begun by `putrequest`/`putheader` and send it with `body`."""
        if len(body) > ONE_WRITE_BYTES:
            self.endheaders(body)   # not copied: the head goes first, the body after it
            return
        self._held_body = body
        try:
            self.endheaders()
        finally:
            self._held_body = None

    def send(self, data) -> None:
        body, self._held_body = self._held_body, None
        super().send(data + body if body else data)  # type: ignore[misc]


class Connection(OneWrite, HTTPConnection):
    """urllib3's plain-HTTP connection, writing a request at once."""


class TLSConnection(OneWrite, HTTPSConnection):
    """urllib3's HTTPS connection, writing a request at once."""


class Origins:
    def __init__(self, tls_options: Dict[str, Any], socket_options: List[tuple]) -> None:
        self.tls_options = tls_options
        self.socket_options = socket_options
        self._idle: Dict[str, Deque[HTTPConnection]] = collections.defaultdict(collections.deque)
        self._made: List[HTTPConnection] = []      # every connection made, to close at the end
        self._urls: Dict[str, Any] = {}             # origin -> its parsed URL
        self._addresses: Dict[str, tuple] = {}      # plain-HTTP origin -> (family, address, when found)

    def take(self, origin: str) -> HTTPConnection:
        """An idle connection to `origin` (scheme://host:port), or a new one not yet
        connected; one the gateway closed while idle is closed here too, so it reconnects."""
        idle = self._idle[origin]
        if idle:
            conn = idle.pop()
            if conn.sock is not None and not conn.is_connected:
                conn.close()
            return conn
        url = self._urls.get(origin)
        if url is None:
            url = self._urls[origin] = parse_url(origin)
        https = url.scheme == "https"
        cls = TLSConnection if https else Connection
        conn = cls(url.host, url.port or (443 if https else 80), socket_options=self.socket_options,
                   **(self.tls_options if https else {}))
        self._made.append(conn)
        return conn

    def give_back(self, origin: str, conn: HTTPConnection) -> None:
        self._idle[origin].append(conn)

    def made(self) -> int:
        return len(self._made)

    # -- addresses, for opening without waiting -------------------------------------------
    def found(self, origin: str, sock: socket.socket) -> None:
        """A helper's connection to `origin` is open: where it went (plain HTTP only)."""
        if not isinstance(sock, ssl.SSLSocket):
            self._addresses[origin] = (sock.family, sock.getpeername(), time.monotonic())

    def knows(self, origin: str, now: float) -> bool:
        known = self._addresses.get(origin)
        return known is not None and now - known[2] < ADDRESS_SECONDS

    def forget(self, origin: str) -> None:
        self._addresses.pop(origin, None)

    def connect_now(self, origin: str) -> socket.socket:
        """A non-blocking socket (the connections' own options) connecting to the origin's
        known address; writable once connected or failed (SO_ERROR says which). OSError
        when it cannot even start."""
        known = self._addresses.get(origin)
        if known is None:
            raise OSError("address not known")
        family, address, _ = known
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)  # (not setblocking: an ioctl more)
        try:
            for option in self.socket_options:
                sock.setsockopt(*option)
            error = sock.connect_ex(address)
            if error not in (0, errno.EINPROGRESS):
                raise OSError(error, os.strerror(error))
        except OSError:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        for conn in list(self._made):
            conn.close()
