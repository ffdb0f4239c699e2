"""Configuration: one OPTIONS table → a configargparse parser → frozen Settings.

Every option is a flag, an environment variable (`ASYNCPROC_` + the flag in capitals,
`-` and `.` as `_`) and a config-file key (the flag without dashes). A bad value fails
fast with one line naming the option (exit 2). Nothing reads the environment at import.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import re
import ssl
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import configargparse
import orjson

from asyncproc import aimd, gates, ledger, merge, messages, redact, retry

ENV_PREFIX = "ASYNCPROC_"
TRANSPORTS = ("redis-pubsub", "redis-sortedset", "redis-streams", "gcp-pubsub")
GCP_EXTRA = "pip install 'asyncproc[gcp]'"
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(Exception):
    """A bad option or config file; the message names it and fits on one line."""


def _at_least(low: float) -> Callable[[Any], Optional[str]]:
    return lambda v: None if v >= low else f"must be at least {low:g} (got {v:g})"


def _above(low: float) -> Callable[[Any], Optional[str]]:
    return lambda v: None if v > low else f"must be greater than {low:g} (got {v:g})"


def _between(low: int, high: int) -> Callable[[Any], Optional[str]]:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high} (got {v})"


def _port(v: int) -> Optional[str]:
    return None if 0 <= v <= 65535 else f"must be a port number 0-65535 (got {v})"


def _http_url(v: str) -> Optional[str]:
    try:
        parts = urlsplit(v)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - a malformed port raises
    except ValueError:
        ok = False
    return None if ok else f"must be an http:// or https:// URL (got {redact.url(v)!r})"


def _redis_url(v: str) -> Optional[str]:
    try:
        ok = urlsplit(v).scheme in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
    except ValueError:
        ok = False
    return None if ok else (f"must be a redis://, rediss://, unix://, redis+cluster:// or rediss+cluster://"
                            f" URL (got {redact.url(v)!r})")


def _readable_file(v: str) -> Optional[str]:
    if v and not os.access(v, os.R_OK):
        return f"cannot read {v}" + ("" if os.path.exists(v) else " (no such file)")
    return None


HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def parse_header(text: str) -> Tuple[str, str]:
    """NAME=VALUE (or NAME: VALUE) → (name, value); the error never shows the value."""
    name, sep, value = text.partition("=")
    if not sep or ":" in name:
        name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not HEADER_NAME.match(name):
        raise ValueError("must be NAME=VALUE with a valid header name")
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"{name}: the value must not hold line breaks")
    return name, value


def _headers(v: Sequence[str]) -> Optional[str]:
    for text in v:
        try:
            parse_header(text)
        except ValueError as exc:
            return str(exc)
    return None


def _endpoints(v: str) -> Optional[str]:
    try:
        messages.Endpoints.parse(v)
    except ValueError as exc:
        return str(exc)
    return None


def _queue_names(v: Sequence[str]) -> Optional[str]:
    bad = [name for name in v if not name.strip()]
    return "queue names must not be empty" if bad else None


def parse_bool(value: str) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


parse_bool.__name__ = "boolean"  # argparse names the type in its error: "invalid boolean value"


class Option(NamedTuple):
    flag: str
    type: Any
    default: Any
    help: str
    check: Optional[Callable[[Any], Optional[str]]] = None
    choices: Optional[Tuple[str, ...]] = None
    append: bool = False


OPTIONS: Tuple[Option, ...] = (
    Option("--concurrency", int, 8, "requests in flight at once, over all workers", _at_least(1)),
    Option("--workers", int, 0,
           "worker processes; 0 = one per CPU, at most --concurrency", _at_least(0)),
    Option("--inference-gateway", str, "http://localhost:8000",
           "gateway base URL, or a full endpoint URL whose path is used for every request",
           _http_url),
    Option("--inference-objective", str, "",
           "sent as the x-gateway-inference-objective header when not empty"),
    # -- security: gateway authentication and TLS, Redis TLS and ACLs ------------------------
    Option("--gateway-header", str, None,
           "NAME=VALUE header sent with every gateway request; give it several times", _headers,
           append=True),
    Option("--gateway-token", str, "",
           "bearer token sent as Authorization: Bearer ... (prefer the environment variable or"
           " --gateway-token-file: a flag shows in ps)"),
    Option("--gateway-token-file", str, "",
           "file holding the bearer token; read again whenever it changes (projected service-account"
           " tokens, rotated Secrets)", _readable_file),
    Option("--gateway-ca-file", str, "",
           "PEM file of the CAs trusted for an https:// gateway, instead of the system's", _readable_file),
    Option("--gateway-client-cert", str, "",
           "PEM client certificate presented to an https:// gateway (mutual TLS); may hold the key too",
           _readable_file),
    Option("--gateway-client-key", str, "", "PEM private key of --gateway-client-cert", _readable_file),
    Option("--gateway-tls-verify", parse_bool, True,
           "verify the gateway's certificate and host name; false is logged as a warning (true|false)"),
    Option("--redis-username", str, "", "Redis ACL user name (instead of the URL's)"),
    Option("--redis-password", str, "",
           "Redis password (instead of the URL's; prefer the environment variable or --redis-password-file)"),
    Option("--redis-password-file", str, "",
           "file holding the Redis password, read at each new connection (a rotated Secret is picked up)",
           _readable_file),
    Option("--redis-ca-file", str, "", "rediss://: PEM file of the CAs trusted for Redis", _readable_file),
    Option("--redis-client-cert", str, "", "rediss://: PEM client certificate presented to Redis",
           _readable_file),
    Option("--redis-client-key", str, "", "rediss://: PEM private key of --redis-client-cert", _readable_file),
    Option("--request-merge-policy", str, "random-robin",
           "how messages of several request queues are merged", choices=merge.POLICIES),
    Option("--message-queue-impl", str, "redis-pubsub",
           "the queue transport: redis-pubsub (channels), redis-sortedset, redis-streams, gcp-pubsub"
           " (Google Cloud Pub/Sub; the gcp extra)",
           choices=TRANSPORTS),
    Option("--redis-url", str, "redis://localhost:6379/0",
           "Redis URL (redis://, rediss://, unix://; redis+cluster:// or rediss+cluster:// for a Redis"
           " Cluster, seed nodes host:port[,host:port...]); REDIS_URL is honoured too", _redis_url),
    Option("--redis.cluster", parse_bool, False,
           "--redis-url names a seed node of a Redis Cluster (as redis+cluster:// does) (true|false)"),
    Option("--redis.wait-replicas", int, 0,
           "WAIT until this many replicas have each claim, result, retry and acknowledgement; a"
           " write they do not confirm in --redis.wait-timeout is repeated; 0 = do not wait", _at_least(0)),
    Option("--redis.wait-timeout", float, 2.0, "seconds --redis.wait-replicas waits for the replicas",
           _above(0)),
    Option("--redis.request-queue-name", str, None,
           "request queue (channel, sorted set or stream); give it several times to consume several"
           " (default batch-queue)",
           _queue_names, append=True),
    Option("--redis.retry-queue-name", str, "batch-sortedset-retry",
           "Redis sorted set holding retries (and staged overflow), scored by due time"),
    Option("--redis.result-queue-name", str, "batch-queue-result",
           "where results go: a channel (pub/sub), a list (sorted set) or a stream (streams)"),
    Option("--redis.dead-letter-queue-name", str, "batch-queue-dead-letter",
           "where messages with no usable id go: a list (a stream for redis-streams)"),
    Option("--redis.key-prefix", str, "asyncproc",
           "prefix of asyncproc's own Redis keys (claims, result markers, leases, held messages)"),
    Option("--redis.claim", parse_bool, True,
           "claim each request id in Redis at intake so replicas on one channel process it once"
           " (true|false)"),
    Option("--redis.claim-ttl", float, 3600.0, "seconds a claim on a request id lasts", _at_least(1)),
    Option("--result-dedupe-window", float, 3600.0,
           "seconds during which a second result for the same id is not published; 0 = off",
           _at_least(0)),
    Option("--redis.lease-seconds", float, 60.0,
           "a request held but not kept alive this long (its holder died) is taken up again: sorted-set"
           " and stream entries, pub/sub messages received and retries taken", _at_least(1)),
    Option("--redis.consumer-group", str, "asyncproc", "redis-streams: the consumer group"),
    Option("--max-deliveries", int, 5,
           "redis-streams: an entry delivered more often goes to the dead-letter stream", _at_least(1)),
    Option("--redis.result-maxlen", int, 1000000,
           "redis-streams: the result stream is trimmed to about this many entries; 0 = never",
           _at_least(0)),
    Option("--gcp.project", str, "",
           "gcp-pubsub: Google Cloud project of the subscriptions and topics given by short name;"
           " GOOGLE_CLOUD_PROJECT is honoured too"),
    Option("--gcp.subscription", str, None,
           "gcp-pubsub: request subscription (a name or projects/P/subscriptions/S); give it several"
           " times to consume several (queues-file names are subscriptions too)",
           _queue_names, append=True),
    Option("--gcp.result-topic", str, "", "gcp-pubsub: topic results are published to (required)"),
    Option("--gcp.dead-letter-topic", str, "",
           "gcp-pubsub: topic for messages with no usable id; empty = leave them unacknowledged for"
           " the subscription's dead-letter policy"),
    Option("--gcp.ack-deadline", int, 60,
           "gcp-pubsub: seconds of each lease asyncproc takes and keeps extending (10-600)", _between(10, 600)),
    Option("--queues-file", str, "",
           "JSON file of per-queue settings (name, gateway, path, objective, labels, weight,"
           " priority, gate, max_in_flight, allowed_endpoints, headers, token, token_file)"),
    Option("--dispatch-order", str, "arrival",
           "order inside a queue: arrival, or deadline (earliest deadline first among the requests held)",
           choices=ledger.ORDERS),
    Option("--gate", str, "",
           "dispatch gate (a JSON object, see Choosing a gate) for every queue without its own in the"
           " queues file; empty = always open"),
    Option("--gate-interval", float, 1.0,
           "seconds a gate reading is cached (a gate's own \"interval\" overrides it)", _above(0)),
    Option("--gate-timeout", float, 0.25,
           "seconds one gate reading (Redis, scrape, Prometheus query) may take; a slower one fails",
           _above(0)),
    Option("--adaptive-concurrency", parse_bool, False,
           "adapt the in-flight limit: additive increase on successes, multiplicative decrease"
           " when the gateway is overloaded (429 or 503) or slow (true|false)"),
    Option("--adaptive-floor", int, 1, "adaptive concurrency: the lowest in-flight limit", _at_least(1)),
    Option("--adaptive-decrease", float, 0.8,
           "adaptive concurrency: the limit is multiplied by this on a 429, a 503 or a slow answer",
           lambda v: None if 0 < v < 1 else f"must be between 0 and 1 exclusive (got {v:g})"),
    Option("--adaptive-latency-target", float, 0.0,
           "adaptive concurrency: seconds; a success slower than this counts as overload; 0 = off",
           _at_least(0)),
    Option("--priority-aging", float, 0.0,
           "priority merge policy: a waiting queue gains one priority level per this many seconds"
           " unserved, so none starves; 0 = strict priority", _at_least(0)),
    Option("--retry-policy", str, "exponential", "back-off between attempts",
           choices=retry.POLICIES),
    Option("--retry-base-delay", float, 1.0,
           "seconds: the fixed delay, or the exponential policy's first ceiling", _above(0)),
    Option("--retry-max-delay", float, 60.0, "seconds: cap on one exponential delay", _above(0)),
    Option("--max-attempts", int, 0, "attempts per request; 0 = until the deadline",
           _at_least(0)),
    Option("--request-timeout", float, 300.0,
           "seconds: cap on one whole attempt, connect, headers and body (also bounded by the deadline)", _above(0)),
    Option("--connect-timeout", float, 5.0, "seconds to establish a gateway connection",
           _above(0)),
    Option("--max-response-bytes", int, 64 * 1024 * 1024,
           "a larger gateway response gets the error result \"response too large\" (not retried)",
           _at_least(1024)),
    Option("--max-message-bytes", int, 1048576,
           "larger request messages are not parsed: an error result when the id opens the message,"
           " else a dead letter", _at_least(64)),
    Option("--max-deadline-horizon", float, messages.DEFAULT_HORIZON,
           "seconds: a deadline further ahead than this gets an error result (default 31 days)",
           _above(0)),
    Option("--allowed-endpoints", str, ",".join(messages.DEFAULT_ENDPOINTS),
           "comma-separated paths a message's endpoint may name (a path ending in /* allows what is"
           " below it); anything else gets the error result 'endpoint not allowed'", _endpoints),
    Option("--max-result-bytes", int, 16 * 1048576,
           "an encoded result larger than this is replaced by an error result naming its size",
           _at_least(1024)),
    Option("--result-format", str, "seed",
           "result shape: seed ({id, payload|error}) or llm-d-async", choices=messages.RESULT_FORMATS),
    Option("--intake-buffer", int, 0,
           "requests held in memory beyond those in flight; more are staged in the retry set"
           " (0 = as many as --concurrency)", _at_least(0)),
    Option("--metrics-port", int, 9090,
           "port for /metrics, /healthz and /readyz; 0 turns the server off", _port),
    Option("--metrics-host", str, "0.0.0.0", "address the metrics server listens on"),
    Option("--shutdown-grace-period", float, 30.0,
           "seconds in-flight requests may finish after SIGTERM", _at_least(0)),
    Option("--worker-timeout", float, 60.0,
           "seconds a worker may go silent before it is killed and replaced", _above(0)),
    Option("--worker-max-requests", int, 0,
           "retire a worker (gracefully) after this many requests; 0 = never", _at_least(0)),
    Option("--worker-max-rss", float, 0.0,
           "retire a worker (gracefully) when its resident memory passes this many MiB; 0 = never",
           _at_least(0)),
    Option("--log-format", str, "text", "text or json lines", choices=LOG_FORMATS),
    Option("--log-level", str, "INFO", "log threshold", choices=LOG_LEVELS),
)


def env_var(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").replace(".", "_").upper()


def dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_").replace(".", "_")


class _Parser(configargparse.ArgumentParser):
    """argparse prints usage and the error; an operator wants the one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        line = message.splitlines()[0] if message else "bad configuration"
        if line.startswith("unrecognized arguments:"):  # name the flags, never echo values (secrets)
            flags = [a.split("=", 1)[0] for a in line.split(":", 1)[1].split() if a.startswith("-")]
            line = "unrecognized arguments: " + (" ".join(flags) or "(values without a flag)")
        raise ConfigError(line)


class _RedactingFormatter(configargparse.ArgumentDefaultsHelpFormatter):
    """--help shows defaults, some from the environment (REDIS_URL): never their passwords."""

    def _expand_help(self, action):  # type: ignore[override]
        if isinstance(action.default, str) and "://" in action.default:
            action = copy.copy(action)
            action.default = redact.url(action.default)
        return super()._expand_help(action)


DESCRIPTION = ("Pull LLM requests from queues, dispatch them to an inference gateway,"
               " retry until the deadline, write one result each.")


def build_parser(environ: Mapping[str, str], prog: str = "asyncproc", description: str = DESCRIPTION) -> _Parser:
    parser = _Parser(
        prog=prog,
        description=description,
        formatter_class=_RedactingFormatter,
        config_file_parser_class=configargparse.DefaultConfigFileParser,
    )
    parser.add_argument("-c", "--config", is_config_file=True, env_var=env_var("--config"),
                        help="config file of `option = value` lines (keys are flag names)")
    for opt in OPTIONS:
        default = opt.default
        if opt.flag == "--redis-url" and environ.get("REDIS_URL"):
            default = environ["REDIS_URL"]
        if opt.flag == "--gcp.project" and environ.get("GOOGLE_CLOUD_PROJECT"):
            default = environ["GOOGLE_CLOUD_PROJECT"]
        kwargs: Dict[str, Any] = dict(
            dest=dest(opt.flag), default=default, help=opt.help, env_var=env_var(opt.flag),
        )
        if opt.append:
            kwargs["action"] = "append"
        else:
            kwargs["type"] = opt.type
        if opt.choices:
            kwargs["choices"] = opt.choices
        parser.add_argument(opt.flag, **kwargs)
    return parser


class TlsFiles(NamedTuple):
    """CA bundle, client certificate and key (paths; empty: none) and whether to verify."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    verify: bool = True

    @property
    def configured(self) -> bool:
        return bool(self.ca_file or self.cert_file or self.key_file or not self.verify)


class RedisAuth(NamedTuple):
    """Redis ACL credentials and TLS files, beside (and over) what the URL says."""

    username: str = ""
    password: str = ""
    password_file: str = ""
    tls: TlsFiles = TlsFiles()

    def __repr__(self) -> str:
        return f"RedisAuth(username={self.username!r}, password={'***' if self.password else ''!r}," \
               f" password_file={self.password_file!r}, tls={self.tls!r})"


@dataclass(frozen=True)
class QueueConfig:
    name: str
    gateway: Optional[str] = field(default=None, repr=False)
    path: Optional[str] = None
    objective: Optional[str] = None
    labels: Dict[str, str] = field(default_factory=dict)
    weight: float = 1.0
    priority: int = 0
    gate: Optional[Any] = None          # a gates.Gate; None: the default gate (--gate)
    max_in_flight: int = 0              # 0: no limit of its own (--concurrency)
    allowed_endpoints: Optional[messages.Endpoints] = None  # None: --allowed-endpoints
    headers: Dict[str, str] = field(default_factory=dict, repr=False)  # over --gateway-header
    token: Optional[str] = field(default=None, repr=False)             # over --gateway-token
    token_file: Optional[str] = None                                   # over --gateway-token-file


@dataclass(frozen=True)
class Settings:
    concurrency: int
    workers: int
    inference_gateway: str = field(repr=False)
    inference_objective: str
    request_merge_policy: str
    message_queue_impl: str
    redis_url: str = field(repr=False)
    request_queues: Tuple[QueueConfig, ...]
    retry_queue: str
    result_queue: str
    dead_letter_queue: str
    key_prefix: str
    claim: bool
    claim_ttl: float
    result_dedupe_window: float
    lease_seconds: float
    consumer_group: str
    max_deliveries: int
    result_maxlen: int
    gcp_project: str
    gcp_result_topic: str
    gcp_dead_letter_topic: str
    gcp_ack_deadline: int
    backoff: retry.Backoff
    max_attempts: int
    request_timeout: float
    connect_timeout: float
    max_message_bytes: int
    max_deadline_horizon: float
    allowed_endpoints: messages.Endpoints
    max_result_bytes: int
    result_format: str
    intake_buffer: int
    metrics_port: int
    metrics_host: str
    shutdown_grace_period: float
    worker_timeout: float
    worker_max_requests: int
    worker_max_rss: float
    log_format: str
    log_level: str
    default_gate: Any = gates.OPEN
    adaptive: Optional[aimd.Policy] = None
    priority_aging: float = 0.0
    dispatch_order: str = "arrival"
    gateway_headers: Tuple[Tuple[str, str], ...] = field(default=(), repr=False)
    gateway_token: str = field(default="", repr=False)
    gateway_token_file: str = ""
    gateway_tls: TlsFiles = TlsFiles()
    redis_auth: RedisAuth = RedisAuth()
    max_response_bytes: int = 64 * 1024 * 1024
    redis_cluster: bool = False
    wait_replicas: int = 0
    wait_timeout: float = 2.0

    def message_limits(self) -> messages.Limits:
        """What every request message is checked against (README: Bad input)."""
        return messages.Limits(
            self.max_message_bytes, self.max_deadline_horizon, self.allowed_endpoints,
            {q.name: q.allowed_endpoints for q in self.request_queues if q.allowed_endpoints is not None})

    def gate_of(self, queue: QueueConfig) -> Any:
        return queue.gate if queue.gate is not None else self.default_gate

    @property
    def queue_names(self) -> List[str]:
        return [q.name for q in self.request_queues]

    def threads_per_worker(self) -> List[int]:
        """Spread --concurrency over the workers so in-flight requests equal it."""
        base, extra = divmod(self.concurrency, self.workers)
        return [base + (1 if i < extra else 0) for i in range(self.workers)]


def load_settings(
    argv: Sequence[str], environ: Optional[Mapping[str, str]] = None, cpu_count: Optional[int] = None
) -> Settings:
    """Parse and check everything; raise ConfigError with one line on the first problem."""
    return parse_args(argv, environ, cpu_count)[0]


def parse_args(
    argv: Sequence[str], environ: Optional[Mapping[str, str]] = None, cpu_count: Optional[int] = None,
    parser: Optional[configargparse.ArgumentParser] = None,
) -> Tuple[Settings, configargparse.Namespace]:
    """Like load_settings, with a caller's parser (a tool's own arguments beside the
    processor's options, so one config file serves both); returns the namespace too."""
    environ = os.environ if environ is None else environ
    parser = parser or build_parser(environ)
    ns = parser.parse_args(list(argv), env_vars=environ)
    for opt in OPTIONS:
        value = getattr(ns, dest(opt.flag))
        if opt.check is not None and value is not None:
            problem = opt.check(value)
            if problem:
                raise ConfigError(f"{opt.flag}: {problem}")
    gcp = ns.message_queue_impl == "gcp-pubsub"
    flag_names = _dedupe((ns.gcp_subscription if gcp else ns.redis_request_queue_name) or [])
    gate_url = ns.redis_url  # a Redis gate on --redis-url's server: a cluster client there too
    if ns.redis_cluster and urlsplit(gate_url).scheme in ("redis", "rediss"):
        gate_url = gate_url.replace("://", "+cluster://", 1)
    gate_defaults = gates.Defaults(gate_url, ns.gate_interval, ns.gate_timeout)
    default_gate = gates.OPEN
    if ns.gate.strip():
        try:
            doc = orjson.loads(ns.gate)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"--gate: not valid JSON ({exc})") from None
        try:
            default_gate = gates.parse(doc, gate_defaults, "--gate")
        except gates.GateError as exc:
            raise ConfigError(str(exc)) from None
    if ns.queues_file:
        queues = load_queues_file(ns.queues_file, flag_names, gate_defaults)
    elif gcp and not flag_names:
        check_gcp(ns, [])
        raise ConfigError("--gcp.subscription: required with --message-queue-impl gcp-pubsub"
                          " (or name the subscriptions in --queues-file)")
    else:
        queues = tuple(QueueConfig(n) for n in flag_names or ["batch-queue"])
    if gcp:
        check_gcp(ns, [q.name for q in queues])
    concurrency = ns.concurrency
    workers = ns.workers or min(cpu_count or os.cpu_count() or 1, concurrency)
    if workers > concurrency:
        raise ConfigError(f"--workers: must be at most --concurrency ({concurrency}), got {workers}")
    if ns.adaptive_concurrency and ns.adaptive_floor > concurrency:
        raise ConfigError(f"--adaptive-floor: must be at most --concurrency ({concurrency}), got {ns.adaptive_floor}")
    if ns.retry_max_delay < ns.retry_base_delay:
        raise ConfigError("--retry-max-delay: must not be below --retry-base-delay")
    gateway_headers = tuple(parse_header(h) for h in ns.gateway_header or [])
    gateway_tls = TlsFiles(ns.gateway_ca_file, ns.gateway_client_cert, ns.gateway_client_key,
                           ns.gateway_tls_verify)
    check_tls(gateway_tls, "--gateway")
    redis_auth = RedisAuth(ns.redis_username, ns.redis_password, ns.redis_password_file,
                           TlsFiles(ns.redis_ca_file, ns.redis_client_cert, ns.redis_client_key))
    check_tls(redis_auth.tls, "--redis")
    cluster = check_cluster(ns, queues)
    if redis_auth.tls.configured and not ns.redis_url.startswith(("rediss://", "rediss+cluster://")):
        raise ConfigError("--redis-ca-file/--redis-client-cert: need a rediss:// --redis-url")
    token_file = ns.gateway_token_file
    check_token_file(token_file, "--gateway-token-file")
    check_token(ns.gateway_token, "--gateway-token")
    check_gateway_auth("--inference-gateway", ns.inference_gateway, gateway_headers, ns.gateway_token, token_file)
    for q in queues:
        if q.gateway or q.headers or q.token or q.token_file:
            check_token_file(q.token_file, f"--queues-file: queue {q.name} token_file")
            check_token(q.token, f"--queues-file: queue {q.name} token")
            merged = dict(gateway_headers, **q.headers)
            token = q.token if q.token is not None else ns.gateway_token
            check_gateway_auth(f"--queues-file: queue {q.name} gateway", q.gateway or ns.inference_gateway,
                               tuple(merged.items()), token, q.token_file or token_file)
    register_secrets(ns, queues, default_gate, gateway_headers)
    settings = Settings(
        concurrency=concurrency,
        workers=workers,
        inference_gateway=ns.inference_gateway,
        inference_objective=ns.inference_objective,
        request_merge_policy=ns.request_merge_policy,
        message_queue_impl=ns.message_queue_impl,
        redis_url=ns.redis_url,
        request_queues=queues,
        retry_queue=ns.redis_retry_queue_name,
        result_queue=ns.redis_result_queue_name,
        dead_letter_queue=ns.redis_dead_letter_queue_name,
        key_prefix=ns.redis_key_prefix,
        claim=ns.redis_claim,
        claim_ttl=ns.redis_claim_ttl,
        result_dedupe_window=ns.result_dedupe_window,
        lease_seconds=ns.redis_lease_seconds,
        consumer_group=ns.redis_consumer_group,
        max_deliveries=ns.max_deliveries,
        result_maxlen=ns.redis_result_maxlen,
        gcp_project=ns.gcp_project,
        gcp_result_topic=ns.gcp_result_topic,
        gcp_dead_letter_topic=ns.gcp_dead_letter_topic,
        gcp_ack_deadline=ns.gcp_ack_deadline,
        backoff=retry.Backoff(ns.retry_policy, ns.retry_base_delay, ns.retry_max_delay),
        max_attempts=ns.max_attempts,
        request_timeout=ns.request_timeout,
        connect_timeout=ns.connect_timeout,
        max_message_bytes=ns.max_message_bytes,
        max_deadline_horizon=ns.max_deadline_horizon,
        allowed_endpoints=messages.Endpoints.parse(ns.allowed_endpoints),
        max_result_bytes=ns.max_result_bytes,
        result_format=ns.result_format,
        intake_buffer=ns.intake_buffer or concurrency,
        metrics_port=ns.metrics_port,
        metrics_host=ns.metrics_host,
        shutdown_grace_period=ns.shutdown_grace_period,
        worker_timeout=ns.worker_timeout,
        worker_max_requests=ns.worker_max_requests,
        worker_max_rss=ns.worker_max_rss,
        log_format=ns.log_format,
        log_level=ns.log_level,
        default_gate=default_gate,
        adaptive=aimd.Policy(ns.adaptive_floor, concurrency, ns.adaptive_decrease, ns.adaptive_latency_target)
        if ns.adaptive_concurrency else None,
        priority_aging=ns.priority_aging,
        dispatch_order=ns.dispatch_order,
        gateway_headers=gateway_headers,
        gateway_token=ns.gateway_token.strip(),
        gateway_token_file=token_file,
        gateway_tls=gateway_tls,
        redis_auth=redis_auth,
        max_response_bytes=ns.max_response_bytes,
        redis_cluster=cluster,
        wait_replicas=ns.redis_wait_replicas,
        wait_timeout=ns.redis_wait_timeout,
    )
    return settings, ns


def check_cluster(ns, queues) -> bool:
    """Whether --redis-url is a Redis Cluster; if it is, refuse what cannot run there."""
    from asyncproc.transports.keys import slot_problem

    scheme = urlsplit(ns.redis_url).scheme
    cluster = ns.redis_cluster or scheme.endswith("+cluster")
    if not cluster or ns.message_queue_impl == "gcp-pubsub":
        return False
    if scheme == "unix":
        raise ConfigError("--redis.cluster: a Redis Cluster is reached over TCP (redis+cluster://host:port),"
                          " not a unix:// socket")
    if urlsplit(ns.redis_url).path.strip("/") not in ("", "0"):
        raise ConfigError("--redis-url: a Redis Cluster has only database 0")
    if ns.message_queue_impl == "redis-pubsub":
        raise ConfigError("--message-queue-impl: redis-pubsub does not run on a Redis Cluster (a PUBLISH there"
                          " goes to every node, and asyncproc does not use sharded pub/sub); use"
                          " redis-streams or redis-sortedset")
    problem = slot_problem(ns.redis_key_prefix, "q")
    if problem:
        raise ConfigError(f"--redis.key-prefix: {problem}")
    named = [("--redis.request-queue-name", q.name) for q in queues]
    named += [("--redis.result-queue-name", ns.redis_result_queue_name)]
    for flag, name in named:
        problem = slot_problem(ns.redis_key_prefix, name)
        if problem:
            raise ConfigError(f"{flag}: {problem}")
    return True


def check_tls(tls: TlsFiles, prefix: str) -> None:
    """Load what was given the way the connection will, so a bad file is a config error."""
    if tls.key_file and not tls.cert_file:
        raise ConfigError(f"{prefix}-client-key: needs {prefix}-client-cert")
    try:
        context = ssl.create_default_context(cafile=tls.ca_file or None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{prefix}-ca-file: {tls.ca_file} holds no usable PEM certificate"
                          f" ({getattr(exc, 'reason', None) or exc})") from None
    if tls.cert_file:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file or None, password=b"")
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{prefix}-client-cert: cannot load the certificate and its key"
                              f" ({getattr(exc, 'reason', None) or exc}; an encrypted key is not supported)") from None


def check_token_file(path: Optional[str], where: str) -> None:
    if not path:
        return
    try:
        with open(path, "rb") as handle:
            token = handle.read().decode("utf-8", "replace").strip()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path} ({exc.strerror})") from None
    if not token:
        raise ConfigError(f"{where}: {path} is empty")
    check_token(token, f"{where} {path}")


def check_token(token: Optional[str], where: str) -> None:
    """A token goes into a header: one printable line (a line break would fail every request
    and put the token in a traceback)."""
    if token and not token.strip().isprintable():
        raise ConfigError(f"{where}: the token holds control characters (a line break?)")


def check_gateway_auth(where: str, url: str, headers: Sequence[Tuple[str, str]], token: str,
                       token_file: Optional[str]) -> None:
    """URL credentials are sent as Basic auth; two sources of Authorization are refused."""
    sources = []
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        sources.append("credentials in the URL (sent as Basic auth)")
    if token or token_file:
        sources.append("a bearer token (--gateway-token or --gateway-token-file)")
    if any(name.lower() == "authorization" for name, _ in headers):
        sources.append("an Authorization header (--gateway-header)")
    if len(sources) > 1:
        raise ConfigError(f"{where}: {' and '.join(sources)} both set Authorization; keep one")


def register_secrets(ns, queues: Sequence[QueueConfig], default_gate, headers) -> None:
    """Everything secret asyncproc was given, so logs scrub it wherever it shows up."""
    redact.register(ns.gateway_token.strip(), ns.redis_password, *(v for _, v in headers))
    for url in (ns.redis_url, ns.inference_gateway):
        redact.register_url(url)
    gate_list = [default_gate]
    for q in queues:
        redact.register(q.token, *q.headers.values())
        redact.register_url(q.gateway)
        gate_list.append(q.gate)
    for gate in gate_list:
        if gate is not None:
            for source in gates.sources(gate):
                redact.register_url(source.url)


def check_gcp(ns, subscriptions: Sequence[str]) -> None:
    """gcp-pubsub needs its library (the gcp extra), a result topic and a project."""
    try:
        found = importlib.util.find_spec("google.cloud.pubsub_v1") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(f"--message-queue-impl gcp-pubsub: google-cloud-pubsub is not installed ({GCP_EXTRA})")
    if not ns.gcp_result_topic.strip():
        raise ConfigError("--gcp.result-topic: required with --message-queue-impl gcp-pubsub")
    names = [*subscriptions, ns.gcp_result_topic, ns.gcp_dead_letter_topic]
    if not ns.gcp_project.strip() and any(n and not n.startswith("projects/") for n in names):
        raise ConfigError("--gcp.project: required with --message-queue-impl gcp-pubsub unless every"
                          " subscription and topic is a full projects/... path (or set GOOGLE_CLOUD_PROJECT)")


def _dedupe(names: Sequence[str]) -> List[str]:
    seen: List[str] = []
    for name in names:
        name = name.strip()
        if name not in seen:
            seen.append(name)
    return seen


QUEUE_KEYS = {"name", "gateway", "path", "objective", "labels", "weight", "priority", "gate", "max_in_flight",
              "allowed_endpoints", "headers", "token", "token_file"}


def load_queues_file(path: str, flag_names: Sequence[str] = (),
                     gate_defaults: Optional[gates.Defaults] = None) -> Tuple[QueueConfig, ...]:
    """Per-queue settings: `{"queues": [{"name": ..., ...}]}` or a bare list of those."""
    gate_defaults = gate_defaults or gates.Defaults("redis://localhost:6379/0")
    where = f"--queues-file {path}"
    try:
        with open(path, "rb") as handle:
            doc = orjson.loads(handle.read())
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc})") from None
    entries = doc.get("queues") if isinstance(doc, dict) else doc
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: expected a non-empty list of queues under \"queues\"")
    queues: List[QueueConfig] = []
    for i, entry in enumerate(entries):
        at = f"{where}: queues[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: must be an object")
        unknown = sorted(set(entry) - QUEUE_KEYS)
        if unknown:
            raise ConfigError(f"{at}: unknown key {unknown[0]!r} (known: {', '.join(sorted(QUEUE_KEYS))})")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{at}: name must be a non-empty string")
        gateway = entry.get("gateway")
        if gateway is not None and (not isinstance(gateway, str) or _http_url(gateway)):
            raise ConfigError(f"{at}: gateway must be an http:// or https:// URL")
        path_ = entry.get("path")
        if path_ is not None and not (isinstance(path_, str) and path_.startswith("/")):
            raise ConfigError(f"{at}: path must start with '/'")
        objective = entry.get("objective")
        if objective is not None and not isinstance(objective, str):
            raise ConfigError(f"{at}: objective must be a string")
        labels = entry.get("labels", {})
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise ConfigError(f"{at}: labels must be an object of strings")
        weight = entry.get("weight", 1.0)
        priority = entry.get("priority", 0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ConfigError(f"{at}: weight must be a positive number")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ConfigError(f"{at}: priority must be an integer")
        gate = None
        if "gate" in entry:
            try:
                gate = gates.parse(entry["gate"], gate_defaults, f"{at}.gate")
            except gates.GateError as exc:
                raise ConfigError(str(exc)) from None
        max_in_flight = entry.get("max_in_flight", 0)
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 0:
            raise ConfigError(f"{at}: max_in_flight must be a whole number, 0 = no limit of its own")
        endpoints = None
        if "allowed_endpoints" in entry:
            listed = entry["allowed_endpoints"]
            if not isinstance(listed, list):
                raise ConfigError(f"{at}: allowed_endpoints must be a list of paths")
            try:
                endpoints = messages.Endpoints.parse(listed)
            except ValueError as exc:
                raise ConfigError(f"{at}: allowed_endpoints: {exc}") from None
        headers = entry.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise ConfigError(f"{at}: headers must be an object of strings")
        for header, value in headers.items():
            try:
                parse_header(f"{header}={value}")
            except ValueError as exc:
                raise ConfigError(f"{at}: headers: {exc}") from None
        token, token_file = entry.get("token"), entry.get("token_file")
        if token is not None and (not isinstance(token, str) or not token.strip()):
            raise ConfigError(f"{at}: token must be a non-empty string")
        if token_file is not None and (not isinstance(token_file, str) or not token_file.strip()):
            raise ConfigError(f"{at}: token_file must be a path")
        if token is not None and token_file is not None:
            raise ConfigError(f"{at}: give token or token_file, not both")
        queues.append(QueueConfig(name.strip(), gateway, path_, objective, labels, float(weight), priority,
                                  gate, max_in_flight, endpoints, dict(headers), token and token.strip(),
                                  token_file))
    known = {q.name for q in queues}
    queues.extend(QueueConfig(n) for n in flag_names if n not in known)
    if len({q.name for q in queues}) != len(queues):
        raise ConfigError(f"{where}: a queue name appears twice")
    return tuple(queues)


def print_error(message: str, prog: str = "asyncproc") -> None:
    print(f"{prog}: error: {redact.escape(redact.scrub(message))}", file=sys.stderr)
