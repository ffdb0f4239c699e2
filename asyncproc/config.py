"""Configuration: one OPTIONS table → a configargparse parser → frozen Settings, in
sections by what they configure (Redis, GCP, the gateway, retries, dispatch, messages,
operations); each option names its section, and each transport is given only its own.

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


def _between_float(low: float, high: float) -> Callable[[Any], Optional[str]]:
    return lambda v: None if low <= v <= high else f"must be between {low:g} and {high:g} (got {v:g})"


def _non_empty(v: str) -> Optional[str]:
    return None if v.strip() else "must not be empty"


def _header_name_or_empty(v: str) -> Optional[str]:
    return None if v == "" or re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", v) else f"not a header name: {v!r}"


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
    section: str = "processing"   # the part of Settings it configures (SECTIONS)


OPTIONS: Tuple[Option, ...] = (
    Option("--concurrency", int, 8, "requests in flight at once, over all workers", _at_least(1), section="processing"),
    Option("--workers", int, 0,
           "worker processes; 0 = one per CPU but one (left to the supervisor), at least 1, at most"
           " --concurrency", _at_least(0), section="processing"),
    Option("--inference-gateway", str, "http://localhost:8000",
           "gateway base URL, or a full endpoint URL whose path is used for every request",
           _http_url, section="gateway"),
    Option("--inference-objective", str, "",
           "sent as the x-gateway-inference-objective header when not empty", section="gateway"),
    # -- security: gateway authentication and TLS, Redis TLS and ACLs ------------------------
    Option("--gateway-header", str, None,
           "NAME=VALUE header sent with every gateway request; give it several times", _headers,
           append=True, section="gateway"),
    Option("--gateway-token", str, "",
           "bearer token sent as Authorization: Bearer ... (prefer the environment variable or"
           " --gateway-token-file: a flag shows in ps)", section="gateway"),
    Option("--gateway-token-file", str, "",
           "file holding the bearer token; read again whenever it changes (projected service-account"
           " tokens, rotated Secrets)", _readable_file, section="gateway"),
    Option("--gateway-ca-file", str, "",
           "PEM file of the CAs trusted for an https:// gateway, instead of the system's", _readable_file, section="gateway"),
    Option("--gateway-client-cert", str, "",
           "PEM client certificate presented to an https:// gateway (mutual TLS); may hold the key too",
           _readable_file, section="gateway"),
    Option("--gateway-client-key", str, "", "PEM private key of --gateway-client-cert", _readable_file, section="gateway"),
    Option("--gateway-tls-verify", parse_bool, True,
           "verify the gateway's certificate and host name; false is logged as a warning (true|false)", section="gateway"),
    Option("--redis-username", str, "", "Redis ACL user name (instead of the URL's)", section="redis"),
    Option("--redis-password", str, "",
           "Redis password (instead of the URL's; prefer the environment variable or --redis-password-file)", section="redis"),
    Option("--redis-password-file", str, "",
           "file holding the Redis password, read at each new connection (a rotated Secret is picked up)",
           _readable_file, section="redis"),
    Option("--redis-ca-file", str, "", "rediss://: PEM file of the CAs trusted for Redis", _readable_file, section="redis"),
    Option("--redis-client-cert", str, "", "rediss://: PEM client certificate presented to Redis",
           _readable_file, section="redis"),
    Option("--redis-client-key", str, "", "rediss://: PEM private key of --redis-client-cert", _readable_file, section="redis"),
    Option("--request-merge-policy", str, "random-robin",
           "how messages of several request queues are merged", choices=merge.POLICIES, section="dispatch"),
    Option("--message-queue-impl", str, "redis-pubsub",
           "the queue transport: redis-pubsub (channels), redis-sortedset, redis-streams, gcp-pubsub"
           " (Google Cloud Pub/Sub; the gcp extra)",
           choices=TRANSPORTS, section="processing"),
    Option("--redis-url", str, "redis://localhost:6379/0",
           "Redis URL (redis://, rediss://, unix://; redis+cluster:// or rediss+cluster:// for a Redis"
           " Cluster, seed nodes host:port[,host:port...]); REDIS_URL is honoured too", _redis_url, section="redis"),
    Option("--redis.cluster", parse_bool, False,
           "--redis-url names a seed node of a Redis Cluster (as redis+cluster:// does) (true|false)", section="redis"),
    Option("--redis.wait-replicas", int, 0,
           "WAIT until this many replicas have each claim, result, retry and acknowledgement; a"
           " write they do not confirm in --redis.wait-timeout is repeated; 0 = do not wait", _at_least(0), section="redis"),
    Option("--redis.wait-timeout", float, 2.0, "seconds --redis.wait-replicas waits for the replicas",
           _above(0), section="redis"),
    Option("--redis.request-queue-name", str, None,
           "request queue (channel, sorted set or stream); give it several times to consume several"
           " (default batch-queue)",
           _queue_names, append=True, section="processing"),
    Option("--redis.retry-queue-name", str, "batch-sortedset-retry",
           "Redis sorted set holding retries (and staged overflow), scored by due time", section="redis"),
    Option("--redis.result-queue-name", str, "batch-queue-result",
           "where results go: a channel (pub/sub), a list (sorted set) or a stream (streams)", section="redis"),
    Option("--redis.dead-letter-queue-name", str, "batch-queue-dead-letter",
           "where messages with no usable id go: a list (a stream for redis-streams)", section="redis"),
    Option("--redis.key-prefix", str, "asyncproc",
           "prefix of asyncproc's own Redis keys (claims, result markers, leases, held messages)", section="redis"),
    Option("--redis.claim", parse_bool, True,
           "claim each request id in Redis at intake so replicas on one channel process it once"
           " (true|false)", section="redis"),
    Option("--redis.claim-ttl", float, 3600.0, "seconds a claim on a request id lasts", _at_least(1), section="redis"),
    Option("--result-dedupe-window", float, 3600.0,
           "seconds during which a second result for the same id is not published; 0 = off",
           _at_least(0), section="redis"),
    Option("--redis.lease-seconds", float, 60.0,
           "a request held but not kept alive this long (its holder died) is taken up again: sorted-set"
           " and stream entries, pub/sub messages received and retries taken", _at_least(1), section="redis"),
    Option("--redis.consumer-group", str, "asyncproc", "redis-streams: the consumer group", section="redis"),
    Option("--max-deliveries", int, 5,
           "redis-streams: an entry delivered more often goes to the dead-letter stream", _at_least(1), section="redis"),
    Option("--redis.result-maxlen", int, 1000000,
           "redis-streams: the result stream is trimmed to about this many entries; 0 = never",
           _at_least(0), section="redis"),
    Option("--gcp.project", str, "",
           "gcp-pubsub: Google Cloud project of the subscriptions and topics given by short name;"
           " GOOGLE_CLOUD_PROJECT is honoured too", section="gcp"),
    Option("--gcp.subscription", str, None,
           "gcp-pubsub: request subscription (a name or projects/P/subscriptions/S); give it several"
           " times to consume several (queues-file names are subscriptions too)",
           _queue_names, append=True, section="processing"),
    Option("--gcp.result-topic", str, "", "gcp-pubsub: topic results are published to (required)", section="gcp"),
    Option("--gcp.dead-letter-topic", str, "",
           "gcp-pubsub: topic for messages with no usable id; empty = leave them unacknowledged for"
           " the subscription's dead-letter policy", section="gcp"),
    Option("--gcp.ack-deadline", int, 60,
           "gcp-pubsub: seconds of each lease asyncproc takes and keeps extending (10-600)", _between(10, 600), section="gcp"),
    Option("--queues-file", str, "",
           "JSON file of per-queue settings (name, gateway, path, objective, labels, weight,"
           " priority, gate, max_in_flight, allowed_endpoints, headers, token, token_file)", section="processing"),
    Option("--dispatch-order", str, "arrival",
           "order inside a queue: arrival, or deadline (earliest deadline first among the requests held)",
           choices=ledger.ORDERS, section="dispatch"),
    Option("--gate", str, "",
           "dispatch gate (a JSON object, see Choosing a gate) for every queue without its own in the"
           " queues file; empty = always open", section="dispatch"),
    Option("--gate-interval", float, 1.0,
           "seconds a gate reading is cached (a gate's own \"interval\" overrides it)", _above(0), section="dispatch"),
    Option("--gate-timeout", float, 0.25,
           "seconds one gate reading (Redis, scrape, Prometheus query) may take; a slower one fails",
           _above(0), section="dispatch"),
    Option("--adaptive-concurrency", parse_bool, False,
           "adapt the in-flight limit: additive increase on successes, multiplicative decrease"
           " when the gateway is overloaded (429 or 503) or slow (true|false)", section="dispatch"),
    Option("--adaptive-floor", int, 1, "adaptive concurrency: the lowest in-flight limit", _at_least(1), section="dispatch"),
    Option("--adaptive-decrease", float, 0.8,
           "adaptive concurrency: the limit is multiplied by this on a 429, a 503 or a slow answer",
           lambda v: None if 0 < v < 1 else f"must be between 0 and 1 exclusive (got {v:g})", section="dispatch"),
    Option("--adaptive-latency-target", float, 0.0,
           "adaptive concurrency: seconds; a success slower than this counts as overload; 0 = off",
           _at_least(0), section="dispatch"),
    Option("--priority-aging", float, 0.0,
           "priority merge policy: a waiting queue gains one priority level per this many seconds"
           " unserved, so none starves; 0 = strict priority", _at_least(0), section="dispatch"),
    Option("--retry-policy", str, "exponential", "back-off between attempts",
           choices=retry.POLICIES, section="retry"),
    Option("--retry-base-delay", float, 1.0,
           "seconds: the fixed delay, or the exponential policy's first ceiling", _above(0), section="retry"),
    Option("--retry-max-delay", float, 60.0, "seconds: cap on one exponential delay", _above(0), section="retry"),
    Option("--max-attempts", int, 0, "attempts per request; 0 = until the deadline",
           _at_least(0), section="retry"),
    Option("--request-timeout", float, 300.0,
           "seconds: cap on one whole attempt, connect, headers and body (also bounded by the deadline)", _above(0), section="retry"),
    Option("--connect-timeout", float, 5.0, "seconds to establish a gateway connection",
           _above(0), section="retry"),
    Option("--max-response-bytes", int, 64 * 1024 * 1024,
           "a larger gateway response gets the error result \"response too large\" (not retried)",
           _at_least(1024), section="messages"),
    Option("--max-message-bytes", int, 1048576,
           "larger request messages are not parsed: an error result when the id opens the message,"
           " else a dead letter", _at_least(64), section="messages"),
    Option("--max-deadline-horizon", float, messages.DEFAULT_HORIZON,
           "seconds: a deadline further ahead than this gets an error result (default 31 days)",
           _above(0), section="messages"),
    Option("--allowed-endpoints", str, ",".join(messages.DEFAULT_ENDPOINTS),
           "comma-separated paths a message's endpoint may name (a path ending in /* allows what is"
           " below it); anything else gets the error result 'endpoint not allowed'", _endpoints, section="messages"),
    Option("--max-result-bytes", int, 16 * 1048576,
           "an encoded result larger than this is replaced by an error result naming its size",
           _at_least(1024), section="messages"),
    Option("--result-format", str, "seed",
           "result shape: seed ({id, payload|error}) or llm-d-async", choices=messages.RESULT_FORMATS, section="messages"),
    Option("--request-headers", parse_bool, True,
           "send each request's own headers (llm-d-async's `headers`) after the queue's; hop-by-hop"
           " headers, Host and Content-Length are refused (per queue: request_headers in --queues-file)", section="gateway"),
    Option("--fairness-header", str, "x-llm-d-inference-fairness-id",
           "header set from the request metadata key --fairness-metadata-key, replacing the"
           " request's own (as llm-d-async does); empty = not set", _header_name_or_empty, section="gateway"),
    Option("--fairness-metadata-key", str, "userid", "metadata key whose value --fairness-header carries",
           _non_empty, section="gateway"),
    Option("--tracing", parse_bool, False,
           "record OpenTelemetry spans (receive, each attempt, result) and send each attempt's W3C"
           " traceparent to the gateway, continuing the request's own (headers or metadata);"
           " exported as the OTEL_* environment variables say; needs asyncproc[otel]", section="operations"),
    Option("--cancel-poll-interval", float, 0.5,
           "seconds between reads of cancellations (asyncproc cancel, llm-d-async's request-cancel"
           " markers) for what is held: one pipelined read each time; in flight ones are aborted",
           _between_float(0.05, 10.0), section="operations"),
    Option("--intake-buffer", int, 0,
           "requests held in memory beyond those in flight; more are staged in the retry set"
           " (0 = as many as --concurrency)", _at_least(0), section="processing"),
    Option("--metrics-port", int, 9090,
           "port for /metrics, /healthz and /readyz; 0 turns the server off", _port, section="operations"),
    Option("--metrics-host", str, "0.0.0.0", "address the metrics server listens on", section="operations"),
    Option("--shutdown-grace-period", float, 30.0,
           "seconds in-flight requests may finish after SIGTERM", _at_least(0), section="operations"),
    Option("--worker-timeout", float, 60.0,
           "seconds a worker may go silent before it is killed and replaced", _above(0), section="operations"),
    Option("--worker-max-requests", int, 0,
           "retire a worker (gracefully) after this many requests; 0 = never", _at_least(0), section="operations"),
    Option("--worker-max-rss", float, 0.0,
           "retire a worker (gracefully) when its resident memory passes this many MiB; 0 = never",
           _at_least(0), section="operations"),
    Option("--log-format", str, "text", "text or json lines", choices=LOG_FORMATS, section="operations"),
    Option("--log-level", str, "INFO", "log threshold", choices=LOG_LEVELS, section="operations"),
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
    result_queue: Optional[str] = None  # results go here, over a message's result_queue_name
    request_headers: Optional[bool] = None  # None: --request-headers


@dataclass(frozen=True)
class RedisConfig:
    """The Redis server and asyncproc's keys on it (--redis-url, --redis.*): how to reach it
    (URL, credentials and TLS, cluster, replicas to wait for), the queue names beside the
    request queues, and what guards exactly-once (claims, leases, result deduplication)."""

    url: str = field(default="redis://localhost:6379/0", repr=False)
    auth: RedisAuth = RedisAuth()
    cluster: bool = False
    wait_replicas: int = 0
    wait_timeout: float = 2.0
    retry_queue: str = "batch-sortedset-retry"
    result_queue: str = "batch-queue-result"
    dead_letter_queue: str = "batch-queue-dead-letter"
    key_prefix: str = "asyncproc"
    claim: bool = True
    claim_ttl: float = 3600.0
    result_dedupe_window: float = 3600.0
    lease_seconds: float = 60.0
    consumer_group: str = "asyncproc"   # redis-streams
    max_deliveries: int = 5             # redis-streams
    result_maxlen: int = 1000000        # redis-streams


@dataclass(frozen=True)
class GcpConfig:
    """Google Cloud Pub/Sub (--gcp.*): the project short names resolve in, where results and
    dead letters are published, and the lease asyncproc keeps on what it pulled."""

    project: str = ""
    result_topic: str = ""
    dead_letter_topic: str = ""
    ack_deadline: int = 60


@dataclass(frozen=True)
class GatewayConfig:
    """The inference gateway (--inference-gateway, --gateway-*): where requests go and the
    headers, credentials and TLS they go with; a queue's own (--queues-file) beat these."""

    url: str = field(default="http://localhost:8000", repr=False)
    objective: str = ""
    headers: Tuple[Tuple[str, str], ...] = field(default=(), repr=False)
    token: str = field(default="", repr=False)
    token_file: str = ""
    tls: TlsFiles = TlsFiles()
    request_headers: bool = True
    fairness_header: str = "x-llm-d-inference-fairness-id"
    fairness_metadata_key: str = "userid"


@dataclass(frozen=True)
class RetryConfig:
    """How long one attempt may take and how attempts are repeated until the deadline."""

    backoff: retry.Backoff = retry.Backoff("exponential", 1.0, 60.0)
    max_attempts: int = 0
    request_timeout: float = 300.0
    connect_timeout: float = 5.0


@dataclass(frozen=True)
class DispatchConfig:
    """Which waiting request goes next, and when: the merge of several queues, the order
    inside one, dispatch gates and adaptive concurrency (README: Choosing a gate)."""

    merge_policy: str = "random-robin"
    order: str = "arrival"
    default_gate: Any = gates.OPEN       # for every queue without its own gate
    adaptive: Optional[aimd.Policy] = None   # None: --adaptive-concurrency off
    priority_aging: float = 0.0


@dataclass(frozen=True)
class MessagesConfig:
    """What a request message may be and what comes back (README: Bad input): sizes, the
    deadline horizon, allowed endpoints, the gateway response cap and the result format."""

    max_message_bytes: int = 1048576
    max_deadline_horizon: float = messages.DEFAULT_HORIZON
    allowed_endpoints: messages.Endpoints = messages.Endpoints.parse(",".join(messages.DEFAULT_ENDPOINTS))
    max_result_bytes: int = 16 * 1048576
    max_response_bytes: int = 64 * 1024 * 1024
    result_format: str = "seed"


@dataclass(frozen=True)
class OperationsConfig:
    """Running and watching the process: metrics server, logs, tracing, worker recycling,
    the shutdown grace period and how often cancellations are read."""

    metrics_port: int = 9090
    metrics_host: str = "0.0.0.0"
    log_format: str = "text"
    log_level: str = "INFO"
    tracing: bool = False
    shutdown_grace_period: float = 30.0
    worker_timeout: float = 60.0
    worker_max_requests: int = 0
    worker_max_rss: float = 0.0
    cancel_poll_interval: float = 0.5


#: OPTIONS' `section` → the part of Settings it configures ("processing": Settings itself).
SECTIONS = {"processing": "Settings", "redis": "RedisConfig", "gcp": "GcpConfig", "gateway": "GatewayConfig",
            "retry": "RetryConfig", "dispatch": "DispatchConfig", "messages": "MessagesConfig",
            "operations": "OperationsConfig"}


@dataclass(frozen=True)
class Settings:
    """Everything asyncproc runs with: what it processes (concurrency, workers, the transport,
    the request queues) and one section per thing it talks to or decides."""

    concurrency: int
    workers: int
    message_queue_impl: str
    request_queues: Tuple[QueueConfig, ...]
    intake_buffer: int
    redis: RedisConfig = RedisConfig()
    gcp: GcpConfig = GcpConfig()
    gateway: GatewayConfig = GatewayConfig()
    retry: RetryConfig = RetryConfig()
    dispatch: DispatchConfig = DispatchConfig()
    messages: MessagesConfig = MessagesConfig()
    operations: OperationsConfig = OperationsConfig()

    def message_limits(self) -> messages.Limits:
        """What every request message is checked against (README: Bad input)."""
        redis, limits = self.redis, self.messages
        own = {redis.retry_queue, redis.result_queue, redis.dead_letter_queue, *self.queue_names,
               *(q.result_queue for q in self.request_queues if q.result_queue)}
        return messages.Limits(
            limits.max_message_bytes, limits.max_deadline_horizon, limits.allowed_endpoints,
            {q.name: q.allowed_endpoints for q in self.request_queues if q.allowed_endpoints is not None},
            redis.key_prefix, frozenset(own - {redis.result_queue}))

    def gate_of(self, queue: QueueConfig) -> Any:
        return queue.gate if queue.gate is not None else self.dispatch.default_gate

    @property
    def queue_names(self) -> List[str]:
        return [q.name for q in self.request_queues]

    def capacity_per_worker(self) -> List[int]:
        """Spread --concurrency over the workers so in-flight requests equal it."""
        base, extra = divmod(self.concurrency, self.workers)
        return [base + (1 if i < extra else 0) for i in range(self.workers)]


def default_workers(concurrency: int, cpu_count: Optional[int] = None) -> int:
    """One worker per CPU but one, which the supervisor keeps busy (a third or more of the
    tree's CPU in front of a fast gateway): one worker per CPU as well put three busy
    processes on two cores, at about a fifth more CPU per message and fewer messages a
    second (README: Performance). At least one, at most one per request in flight."""
    return max(1, min((cpu_count or os.cpu_count() or 1) - 1, concurrency))


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
    workers = ns.workers or default_workers(concurrency, cpu_count)
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
    if ns.tracing:
        from asyncproc import tracing

        problem = tracing.exporter_problem(environ)
        if problem:
            raise ConfigError(f"--tracing: {problem}")
    register_secrets(ns, queues, default_gate, gateway_headers)
    settings = Settings(
        concurrency=concurrency,
        workers=workers,
        message_queue_impl=ns.message_queue_impl,
        request_queues=queues,
        intake_buffer=ns.intake_buffer or concurrency,
        redis=RedisConfig(
            url=ns.redis_url,
            auth=redis_auth,
            cluster=cluster,
            wait_replicas=ns.redis_wait_replicas,
            wait_timeout=ns.redis_wait_timeout,
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
        ),
        gcp=GcpConfig(
            project=ns.gcp_project,
            result_topic=ns.gcp_result_topic,
            dead_letter_topic=ns.gcp_dead_letter_topic,
            ack_deadline=ns.gcp_ack_deadline,
        ),
        gateway=GatewayConfig(
            url=ns.inference_gateway,
            objective=ns.inference_objective,
            headers=gateway_headers,
            token=ns.gateway_token.strip(),
            token_file=token_file,
            tls=gateway_tls,
            request_headers=ns.request_headers,
            fairness_header=ns.fairness_header,
            fairness_metadata_key=ns.fairness_metadata_key,
        ),
        retry=RetryConfig(
            backoff=retry.Backoff(ns.retry_policy, ns.retry_base_delay, ns.retry_max_delay),
            max_attempts=ns.max_attempts,
            request_timeout=ns.request_timeout,
            connect_timeout=ns.connect_timeout,
        ),
        dispatch=DispatchConfig(
            merge_policy=ns.request_merge_policy,
            order=ns.dispatch_order,
            default_gate=default_gate,
            adaptive=aimd.Policy(ns.adaptive_floor, concurrency, ns.adaptive_decrease, ns.adaptive_latency_target)
            if ns.adaptive_concurrency else None,
            priority_aging=ns.priority_aging,
        ),
        messages=MessagesConfig(
            max_message_bytes=ns.max_message_bytes,
            max_deadline_horizon=ns.max_deadline_horizon,
            allowed_endpoints=messages.Endpoints.parse(ns.allowed_endpoints),
            max_result_bytes=ns.max_result_bytes,
            max_response_bytes=ns.max_response_bytes,
            result_format=ns.result_format,
        ),
        operations=OperationsConfig(
            metrics_port=ns.metrics_port,
            metrics_host=ns.metrics_host,
            log_format=ns.log_format,
            log_level=ns.log_level,
            tracing=ns.tracing,
            shutdown_grace_period=ns.shutdown_grace_period,
            worker_timeout=ns.worker_timeout,
            worker_max_requests=ns.worker_max_requests,
            worker_max_rss=ns.worker_max_rss,
            cancel_poll_interval=ns.cancel_poll_interval,
        ),
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
              "allowed_endpoints", "headers", "token", "token_file", "result_queue", "request_headers"}


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
        result_queue = entry.get("result_queue")
        if result_queue is not None and (not isinstance(result_queue, str) or not result_queue.strip()):
            raise ConfigError(f"{at}: result_queue must be a non-empty string")
        request_headers = entry.get("request_headers")
        if request_headers is not None and not isinstance(request_headers, bool):
            raise ConfigError(f"{at}: request_headers must be true or false")
        queues.append(QueueConfig(name.strip(), gateway, path_, objective, labels, float(weight), priority,
                                  gate, max_in_flight, endpoints, dict(headers), token and token.strip(),
                                  token_file, result_queue and result_queue.strip(), request_headers))
    known = {q.name for q in queues}
    queues.extend(QueueConfig(n) for n in flag_names if n not in known)
    if len({q.name for q in queues}) != len(queues):
        raise ConfigError(f"{where}: a queue name appears twice")
    return tuple(queues)


def print_error(message: str, prog: str = "asyncproc") -> None:
    print(f"{prog}: error: {redact.escape(redact.scrub(message))}", file=sys.stderr)
