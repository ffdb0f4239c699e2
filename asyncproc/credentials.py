"""Gateway credentials: the headers each route sends (static headers, Basic auth from the URL,
a bearer token given or read from a file), and token files read again when they change.

The supervisor owns these and puts the headers in every Assignment, so a rotated token
reaches the workers with the next dispatch and workers never read files.
"""
from __future__ import annotations

import base64
import logging
import os
from typing import Dict, Optional, Sequence, Tuple
from urllib.parse import unquote, urlsplit

from asyncproc import redact

log = logging.getLogger("asyncproc.credentials")


class TokenFile:
    """A file holding a token; `changed()` re-reads it when its identity, size or mtime moved
    (Kubernetes swaps a projected token's symlink; an editor rewrites the file)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.token = ""
        self._stamp: Optional[tuple] = None
        self._failing = False
        self.changed()

    def changed(self) -> bool:
        """Read the token again if the file changed; True when the token is new. A file that
        is briefly missing or empty (mid-rotation) keeps the last token, logged once."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)
            if stamp == self._stamp:
                return False
            with open(self.path, "rb") as handle:
                token = handle.read().decode("utf-8", "replace").strip()
            if not token:
                raise OSError("the file is empty")
            if not token.isprintable():
                raise OSError("the token holds control characters (a line break?)")
        except OSError as exc:
            if not self._failing:
                self._failing = True
                log.error("token file %s cannot be read (%s); keeping the last token", self.path,
                          exc.strerror or exc)
            return False
        if self._failing:
            log.info("token file %s readable again", self.path)
        self._failing = False
        self._stamp = stamp
        redact.register(token)
        if token == self.token:
            return False
        if self.token:
            log.info("token file %s changed; using the new token", self.path)
        self.token = token
        return True


def basic_auth(url: str) -> Optional[str]:
    """The Authorization value for credentials written in a URL, or None."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return None
    pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


def origin(url: str) -> str:
    """scheme://host:port of a URL, without its credentials."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


class RouteAuth:
    """The headers of one route: base headers + static ones + Authorization (one source)."""

    def __init__(self, base: Dict[str, str], url: str, headers: Sequence[Tuple[str, str]],
                 token: str = "", token_file: Optional[TokenFile] = None) -> None:
        self.base = dict(base)
        self.base.update(headers)
        basic = basic_auth(url)
        if basic:
            redact.register(basic.split(" ", 1)[1])
            self.base["Authorization"] = basic
        elif token:
            self.base["Authorization"] = f"Bearer {token}"
        self.token_file = token_file
        self.headers: Dict[str, str] = self._build()

    def _build(self) -> Dict[str, str]:
        headers = dict(self.base)
        if self.token_file is not None and self.token_file.token:
            headers["Authorization"] = f"Bearer {self.token_file.token}"
        return headers

    def refresh(self) -> bool:
        """New headers (a new dict: assignments already sent keep theirs) if the token changed."""
        if self.token_file is not None and self.token_file.token != self.headers.get("Authorization", "")[7:]:
            self.headers = self._build()
            return True
        return False
