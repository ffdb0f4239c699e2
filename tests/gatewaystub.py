"""A real HTTP(S) server standing in for a secured gateway: TLS with a test CA, optionally
requiring a client certificate, answering 401 unless the Authorization header is accepted.
It records what it saw (path, headers, client certificate subject)."""
from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional, Set

from tests.tls import Pki


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "SecureGateway.Server"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        peer = None
        if isinstance(self.connection, ssl.SSLSocket):
            cert = self.connection.getpeercert()
            peer = dict(x[0] for x in cert["subject"])["commonName"] if cert else None
        owner = self.server.owner
        with owner.lock:
            owner.seen.append({"path": self.path, "headers": dict(self.headers), "peer": peer, "body": body})
        accepted = owner.accept is None or self.headers.get("Authorization") in owner.accept
        status, out = (200, json.dumps({"choices": [{"text": "ok"}]}).encode()) if accepted else \
            (401, owner.reject_body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


class SecureGateway:
    """Start with `pki` for https (and `client_ca` to require client certificates)."""

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        owner: "SecureGateway"

    def __init__(self, pki: Optional[Pki] = None, require_client_cert: bool = False,
                 accept: Optional[Set[str]] = None, reject_body: bytes = b'{"error": "unauthorized"}') -> None:
        self.lock = threading.Lock()
        self.seen: List[dict] = []
        self.accept = accept
        self.reject_body = reject_body
        self.httpd = self.Server(("127.0.0.1", 0), _Handler)
        self.httpd.owner = self
        scheme = "http"
        if pki is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(pki.server_cert, pki.server_key)
            if require_client_cert:
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(pki.ca)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def requests(self) -> List[dict]:
        with self.lock:
            return list(self.seen)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
