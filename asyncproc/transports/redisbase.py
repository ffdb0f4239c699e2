"""What the persisted Redis transports share: client, result writes with dedupe, errors."""
from __future__ import annotations

import os
import socket
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
from redis.credentials import CredentialProvider

from asyncproc import redact
from asyncproc.transports.base import TransportError
from asyncproc.transports.keys import aux_key, cancel_key
from asyncproc.transports.retryset import in_pipeline, load_script, preload

SOCKET_TIMEOUT = 5.0
T = TypeVar("T")


class PasswordFile(CredentialProvider):
    """The password read from a file at each new connection, so a rotated Secret is used
    from the next reconnect on (redis-py asks the provider whenever it authenticates)."""

    def __init__(self, path: str, username: str = "") -> None:
        self.path, self.username = path, username

    def get_credentials(self):
        with open(self.path, "rb") as handle:
            password = handle.read().decode("utf-8", "replace").strip()
        redact.register(password)
        return (self.username, password) if self.username else (password,)


def make_client(url: str, auth: Optional[Any] = None, timeout: float = SOCKET_TIMEOUT,
                keepalive: bool = True) -> redis.Redis:
    """A client for `url` with the ACL credentials and TLS files of `auth` (a
    config.RedisAuth): options given on their own win over the same in the URL."""
    kwargs: Dict[str, Any] = dict(socket_timeout=timeout, socket_connect_timeout=timeout)
    if keepalive:
        kwargs["socket_keepalive"] = True
    if auth is not None:
        parts = urlsplit(url)
        if auth.username or auth.password or auth.password_file:
            username = auth.username or unquote(parts.username or "")
            url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
            if auth.password_file:
                kwargs["credential_provider"] = PasswordFile(auth.password_file, username)
            else:
                kwargs.update(username=username or None,
                              password=auth.password or unquote(parts.password or "") or None)
        if parts.scheme == "rediss":
            tls = auth.tls
            kwargs.update({k: v for k, v in (("ssl_ca_certs", tls.ca_file), ("ssl_certfile", tls.cert_file),
                                             ("ssl_keyfile", tls.key_file)) if v})
    return redis.Redis.from_url(url, **kwargs)


def owner_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def guarded(call: Callable[[], T]) -> T:
    """Run a Redis call; its errors become TransportError (the edge of the transport)."""
    try:
        return call()
    except (redis.RedisError, OSError) as exc:
        raise TransportError(describe(exc)) from None


def describe(exc: BaseException) -> str:
    """`redis: <cause>: <what redis-py said>`: why first, no secret, one line."""
    text = redact.escape(redact.scrub(str(exc) or type(exc).__name__))
    return f"redis: {redact.cause(f'{type(exc).__name__} {text}')}: {text}"


class ResultWriter:
    """Appends results to a list or a stream, once per id within the dedupe window."""

    def __init__(self, client: redis.Redis, prefix: str, key: str, mode: str, window: float,
                 maxlen: int = 0) -> None:
        self.key = key
        self.mode = mode
        self.window = int(window)
        self.maxlen = maxlen
        self._prefix = prefix
        self._script = client.register_script(load_script("push_results.lua"))

    def done_key(self, id_key: str) -> str:
        return aux_key(self._prefix, self.key, f"done:{id_key}")

    def preload(self, client) -> None:
        preload(client, self._script)

    def add(self, pipe, results: List, routes: Optional[Dict[str, Any]] = None) -> None:
        """Queue on `pipe` the (id key, encoded result, delivery) items, each to the result
        queue its route names (`routes`: id key -> ResultRoute), else to this writer's."""
        for key, items in group_by_destination(results, routes, self.key).items():
            in_pipeline(self._script, pipe, [key, *(self._done_key(key, k) for k, _, _ in items)],
                        [self.window, self.mode, self.maxlen, *(raw for _, raw, _ in items)])

    def _done_key(self, destination: str, id_key: str) -> str:
        return aux_key(self._prefix, destination, f"done:{id_key}")


def group_by_destination(results: List, routes: Optional[Dict[str, Any]], default: str) -> Dict[str, list]:
    """Results by the queue (list, stream or channel) each goes to, in their order."""
    grouped: Dict[str, list] = {}
    for item in results:
        route = routes.get(item[0]) if routes else None
        grouped.setdefault(route.queue if route is not None and route.queue else default, []).append(item)
    return grouped


def by_queue(items, delivery_of) -> Dict[str, list]:
    grouped: Dict[str, list] = {}
    for item in items:
        delivery = delivery_of(item)
        if delivery is not None and delivery.token is not None:
            grouped.setdefault(delivery.queue, []).append(item)
    return grouped


def read_cancellations(client: redis.Redis, prefix: str, now: float) -> Tuple[FrozenSet[str], FrozenSet[str]]:
    """(cancelled batch ids, cancelled id keys) that have not lapsed."""
    batches, ids = set(), set()
    for member in client.zrangebyscore(cancel_key(prefix), now, "+inf"):
        kind, _, name = member.decode("utf-8", "replace").partition(":")
        (batches if kind == "batch" else ids).add(name)
    return frozenset(batches), frozenset(ids)
