"""What the persisted Redis transports share: client, result writes with dedupe, errors."""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Tuple, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.credentials import CredentialProvider
from redis.exceptions import RedisClusterException

from asyncproc import redact
from asyncproc.transports.base import TransportError, Unconfirmed
from asyncproc.transports.keys import aux_key, cancel_key
from asyncproc.transports.retryset import in_pipeline, load_script, preload

SOCKET_TIMEOUT = 5.0
#: How long `claim_due` leaves a retry (or lease) set alone after finding nothing due there,
#: while a backlog keeps the intake asking every tick: another replica's retry, or one coming
#: due, waits this much longer at most (the intake's own pace while it finds work).
RETRIES_IDLE_SECONDS = 0.1
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
T = TypeVar("T")
log = logging.getLogger("asyncproc.redis")
ERRORS = (redis.RedisError, RedisClusterException, OSError)  # what a Redis call may raise


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


def cluster_url(url: str, cluster: bool = False) -> Tuple[str, bool]:
    """(the URL with a plain redis:// or rediss:// scheme, whether it names a Redis Cluster):
    `redis+cluster://` and `rediss+cluster://` do, and so does any URL with --redis.cluster."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in CLUSTER_SCHEMES:
        return f"{CLUSTER_SCHEMES[scheme]}://{rest}", True
    return url, cluster


def seed_nodes(url: str) -> Tuple[str, List[Tuple[str, int]]]:
    """A cluster URL may name several seed nodes, `redis+cluster://h1:p1,h2:p2`: (the URL
    with the first, every (host, port))."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    seeds = []
    for seed in filter(None, hosts.split(",")):
        host, colon, port = seed.rpartition(":")
        if not colon or not port.isdigit():
            host, port = seed, "6379"
        seeds.append((host, int(port)))
    first = f"{seeds[0][0]}:{seeds[0][1]}" if seeds else hosts
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{first}", path="")), seeds


def make_client(url: str, auth: Optional[Any] = None, timeout: float = SOCKET_TIMEOUT,
                keepalive: bool = True, cluster: bool = False):
    """A client for `url` with the ACL credentials and TLS files of `auth` (a
    config.RedisAuth): options given on their own win over the same in the URL. A cluster
    URL (or `cluster`) gives redis-py's RedisCluster: it discovers the nodes from the seed,
    follows MOVED/ASK and refreshes its slot map when a node fails."""
    url, cluster = cluster_url(url, cluster)
    # RESP2 (a URL's ?protocol=3 still wins): redis-py 8 speaks RESP3 by default, and there it
    # formats every pub/sub message into a debug log line whether or not DEBUG is on.
    kwargs: Dict[str, Any] = dict(socket_timeout=timeout, socket_connect_timeout=timeout, protocol=2)
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
    if cluster:
        url, seeds = seed_nodes(url)
        others = [ClusterNode(host, port) for host, port in seeds[1:]]
        return LazyCluster(lambda: RedisCluster.from_url(url, startup_nodes=others or None, **kwargs))
    return redis.Redis.from_url(url, **kwargs)


def arriving(pubsub, limit: int, completion: float) -> Iterator[dict]:
    """The messages already arriving on a subscription, up to `limit`, without waiting for
    new ones. A reply that has started to arrive gets `completion` seconds to finish:
    get_message(timeout=0) would give it none, and redis-py answers that timeout by
    reconnecting, which drops everything Redis had buffered for the subscriber (seen in a
    burst on a busy machine)."""
    taken = 0
    while taken < limit and pubsub.connection.can_read(timeout=0):
        message = pubsub.get_message(timeout=completion)
        if message is not None and message.get("type") == "message":
            taken += 1
            yield message


class LazyCluster:
    """A RedisCluster made on first use: making one asks the seed nodes for the slot map,
    and asyncproc must start (and keep retrying) while no node answers, as with one Redis."""

    def __init__(self, make: Callable[[], RedisCluster]) -> None:
        self._make, self._client = make, None

    @property
    def cluster(self) -> RedisCluster:
        if self._client is None:
            try:
                self._client = self._make()
            except ERRORS as exc:  # wherever it is first touched, it fails like a Redis call
                raise TransportError(describe(exc)) from None
        return self._client

    def register_script(self, script: str) -> Script:
        return Script(self, script.encode())  # bytes: its SHA needs no connection

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __getattr__(self, name: str):
        return getattr(self.cluster, name)


def is_cluster(client) -> bool:
    return isinstance(client, (RedisCluster, LazyCluster))


def refresh(client) -> None:
    """On a (re)connect: a cluster client asks the nodes for the slot map again, so a
    failover or a resharding since the last one is followed at once."""
    if is_cluster(client):
        client.nodes_manager.initialize()


class Replication:
    """--redis.wait-replicas: WAIT until N replicas have what was just written.

    WAIT counts the writes of the connection it is sent on, so it must follow the writes on
    theirs: it is sent right after them, to the node holding the keys (on a cluster, after
    redirections, the node that holds them now), from the same single thread, and redis-py's
    connection pools hand back the connection released last (LIFO), the one that wrote.
    """

    def __init__(self, client, replicas: int, timeout: float) -> None:
        self.client, self.replicas, self.timeout_ms = client, replicas, max(int(timeout * 1000), 1)
        self._warned_at = 0.0

    def confirm(self, keys, strict: bool = True) -> None:
        """Raise TransportError (strict) or log a warning when fewer replicas than wanted
        acknowledged the writes to `keys` in time. Strict for what replaces a request
        (results, retries, acknowledgements): the write is repeated, and deduplicated."""
        if not self.replicas or not keys:
            return
        if is_cluster(self.client):
            nodes = {}
            for key in keys:
                node = self.client.get_node_from_key(key)
                nodes.setdefault(node.name, node)
            acks = [(name, self.client.execute_command("WAIT", self.replicas, self.timeout_ms, target_nodes=node))
                    for name, node in nodes.items()]
        else:
            acks = [("redis", self.client.execute_command("WAIT", self.replicas, self.timeout_ms))]
        short = [(name, int(n)) for name, n in acks if int(n) < self.replicas]
        if not short:
            return
        text = ", ".join(f"{name}: {n}" for name, n in short)
        message = (f"redis: fewer replicas than --redis.wait-replicas {self.replicas} acknowledged"
                   f" the writes within {self.timeout_ms} ms ({text})")
        if strict:
            raise Unconfirmed(message)
        now = time.monotonic()
        if now >= self._warned_at + 10:
            self._warned_at = now
            log.warning("%s; going on (a failover may hand this work out twice)", message)


RESHARD_PAUSE = 1.0  # seconds a queue whose slot is mid-migration is left alone


class Resharding:
    """Claims per queue that step aside while the queue's slot is being migrated.

    A claim script touches a queue's keys together; while a resharding has moved some of
    them and not the others, Redis answers TRYAGAIN (redis-py retries, then gives up). That
    queue waits a moment; the other queues, and every write, go on: not an outage."""

    def __init__(self) -> None:
        self.until: Dict[str, float] = {}
        self._logged = 0.0

    def claim(self, queue: str, call: Callable[[], List[T]]) -> List[T]:
        now = time.monotonic()
        if self.until.get(queue, 0.0) > now:
            return []
        try:
            return call()
        except ERRORS as exc:
            if not isinstance(exc, redis.exceptions.TryAgainError) and not (
                    isinstance(exc, redis.exceptions.ClusterError)
                    and not isinstance(exc, redis.exceptions.ClusterDownError)):
                raise TransportError(describe(exc)) from None
            self.until[queue] = now + RESHARD_PAUSE
            if now >= self._logged + 10:
                self._logged = now
                log.warning("queue %s: its cluster slot is being migrated (%s); claiming from it again in"
                            " %gs, the other queues go on", queue, f"{type(exc).__name__}: {redact.escape(str(exc))}",
                            RESHARD_PAUSE)
            return []


def execute(pipe, replication: Optional[Replication] = None, keys=(), strict: bool = True):
    """Run a pipeline; then, with --redis.wait-replicas, WAIT for its writes to `keys`."""
    replies = pipe.execute()
    if replication is not None:
        replication.confirm(keys, strict)
    return replies


def owner_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def guarded(call: Callable[[], T]) -> T:
    """Run a Redis call; its errors become TransportError (the edge of the transport)."""
    try:
        return call()
    except ERRORS as exc:
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
