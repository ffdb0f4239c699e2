"""A misbehaving HTTP gateway in a thread of the test process (raw sockets, exact bytes).

The request path picks the misbehaviour (the same modes as `asyncproc sim`'s
`{"x_sim": {"hostile": MODE}}`, which serves them to real processes):

- ``/ok``: a well-formed JSON answer (keep-alive, so connection reuse shows);
- ``/drip``: 200 with Content-Length 1000, the body one byte per `interval`;
- ``/trickle``: the status line and headers one byte per `interval`, never finished;
- ``/huge``: Content-Length `huge_bytes` and that many bytes, as fast as they are read;
- ``/huge-chunked``: `huge_bytes` in 64 KiB chunks, no length announced;
- ``/endless``: a chunked body of small chunks every `interval / 10`, never ending;
- ``/reset``: Content-Length 1000, 100 bytes, then a TCP reset;
- ``/short``: Content-Length 100, 50 bytes, then a clean close;
- ``/short-large``: the same with 1 MiB declared and 300 KiB sent (more than one read);
- ``/gzip``: a small gzip body (Content-Encoding gzip) that inflates to `huge_bytes`;
- ``/long``: a JSON answer whose Content-Length covers it, then extra bytes (kept alive).

`connections` counts accepted connections; `served` lists the paths in arrival order.
"""
from __future__ import annotations

import gzip
import socket
import struct
import threading
from typing import List

OK_BODY = b'{"choices": [{"index": 0, "text": "fine"}]}'


class HostileServer:
    def __init__(self, interval: float = 0.2, huge_bytes: int = 200 * 1024 * 1024) -> None:
        self.interval = interval
        self.huge_bytes = huge_bytes
        self.connections = 0
        self.served: List[str] = []
        self.open = 0                    # connections being served now
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, name="hostile-accept", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self.open += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                buffer = b""
                while not self._stopping.is_set():
                    while b"\r\n\r\n" not in buffer:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buffer += data
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    lines = head.decode("latin-1").split("\r\n")
                    path = lines[0].split(" ")[1]
                    length = 0
                    for line in lines[1:]:
                        name, _, value = line.partition(":")
                        if name.strip().lower() == "content-length":
                            length = int(value)
                    while len(buffer) < length:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buffer += data
                    buffer = buffer[length:]
                    with self._lock:
                        self.served.append(path)
                    if not self._answer(conn, path):
                        return
        except OSError:
            pass  # the client gave up: that is what most modes are for
        finally:
            with self._lock:
                self.open -= 1

    def _answer(self, conn: socket.socket, path: str) -> bool:
        """Serve one mode; True when the connection may serve another request."""
        pause = self.interval
        if path == "/ok":
            conn.sendall(_head(200, length=len(OK_BODY)) + OK_BODY)
            return True
        if path == "/drip":
            conn.sendall(_head(200, length=1000))
            for _ in range(1000):
                self._sleep(pause)
                conn.sendall(b" ")
            return False
        if path == "/trickle":
            for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 100000:
                self._sleep(pause)
                conn.sendall(bytes([byte]))
            return False
        if path == "/huge":
            conn.sendall(_head(200, length=self.huge_bytes))
            block = b"x" * 65536
            left = self.huge_bytes
            while left > 0 and not self._stopping.is_set():
                conn.sendall(block[:left])
                left -= len(block)
            return False
        if path == "/huge-chunked":
            conn.sendall(_head(200, chunked=True))
            block = b"x" * 65536
            chunk = b"%x\r\n" % len(block) + block + b"\r\n"
            for _ in range(self.huge_bytes // len(block)):
                conn.sendall(chunk)
            conn.sendall(b"0\r\n\r\n")
            return False
        if path == "/endless":
            conn.sendall(_head(200, chunked=True))
            while not self._stopping.is_set():
                conn.sendall(b"10\r\n" + b"y" * 16 + b"\r\n")
                self._sleep(pause / 10)
            return False
        if path == "/reset":
            conn.sendall(_head(200, length=1000) + b"z" * 100)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False  # closing with linger 0 sends RST
        if path in ("/short", "/short-large"):
            large = path == "/short-large"
            conn.sendall(_head(200, length=1 << 20 if large else 100) + b"z" * (300 * 1024 if large else 50))
            conn.shutdown(socket.SHUT_WR)
            return False
        if path == "/gzip":
            packed = gzip.compress(b" " * self.huge_bytes)
            head = _head(200, length=len(packed)).replace(b"\r\n\r\n", b"\r\nContent-Encoding: gzip\r\n\r\n")
            conn.sendall(head + packed)
            return True
        if path == "/long":
            conn.sendall(_head(200, length=len(OK_BODY)) + OK_BODY + b"GARBAGE AFTER THE BODY" * 10)
            return True  # kept open: the extra bytes must not be taken for the next answer
        conn.sendall(_head(404, length=0))
        return True

    def _sleep(self, seconds: float) -> None:
        if self._stopping.wait(seconds):
            raise OSError("server stopping")


def _head(status: int, length: int = -1, chunked: bool = False) -> bytes:
    reason = {200: "OK", 404: "Not Found"}.get(status, "Status")
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json"]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif length >= 0:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()

