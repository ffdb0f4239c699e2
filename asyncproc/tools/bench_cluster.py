"""`asyncproc bench --cluster`: 1, 2 and 3 asyncproc replicas on a 3-master Redis Cluster
against the same on one Redis: throughput and CPU per message.

redis-streams, three request queues (on the cluster, one per master), one result stream,
the stand-in gateway at zero latency (so what is measured is asyncproc and Redis, not the
gateway), one worker process per replica. CPU per message is summed over every asyncproc
process tree, and separately over the redis-server processes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import orjson
import psutil
import redis

from asyncproc.tools.bench import Collector, _pct, arrival_stats, tree_usage
from asyncproc.tools.local import Processes, cluster_ports, free_port, redis_answers, wait_for
from asyncproc.transports.keys import slot


@dataclass
class ClusterRow:
    redis: str          # "1 redis" or "cluster 3m"
    replicas: int
    concurrency: int
    messages: int
    rate: float
    p50: float
    p99: float
    cpu_us: float       # asyncproc trees, per message
    redis_cpu_us: float
    lost: int
    duplicates: int


HEADER = (f"{'redis':10} {'replicas':>8} {'inflight':>8} {'msgs':>6} {'msg/s':>7} {'p50 s':>6} {'p99 s':>6} "
          f"{'cpu us/msg':>10} {'redis us/msg':>12} {'lost':>4} {'dup':>4}")


def format_row(r: ClusterRow) -> str:
    return (f"{r.redis:10} {r.replicas:8d} {r.concurrency:8d} {r.messages:6d} {r.rate:7.0f} {r.p50:6.2f} "
            f"{r.p99:6.2f} {r.cpu_us:10.0f} {r.redis_cpu_us:12.0f} {r.lost:4d} {r.duplicates:4d}")


def find_cli(server: str) -> Optional[str]:
    beside = os.path.join(os.path.dirname(server), "redis-cli")
    return beside if os.path.exists(beside) else shutil.which("redis-cli")


def start_servers(procs: Processes, server: str, workdir: str, cluster: bool) -> tuple:
    """(URL for asyncproc, client, redis-server pids)."""
    ports = cluster_ports(3) if cluster else [free_port()]
    pids = []
    for port in ports:
        node_dir = os.path.join(workdir, f"redis-{port}")
        os.makedirs(node_dir)
        extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"] if cluster else []
        proc = procs.start([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                            "--dir", node_dir, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pids.append(proc.pid)
        wait_for(lambda p=port: redis_answers(redis.Redis(port=p, socket_timeout=2)), 10, "redis-server")
    if not cluster:
        return f"redis://127.0.0.1:{ports[0]}/0", redis.Redis(port=ports[0], socket_timeout=30), pids
    cli = find_cli(server)
    if cli is None:
        raise RuntimeError("redis-cli not found (needed for --cluster create)")
    subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0",
                    "--cluster-yes"], check=True, capture_output=True, timeout=60)

    def ok() -> bool:
        for port in ports:
            info = redis.Redis(port=port, socket_timeout=2).execute_command("CLUSTER", "INFO")
            if b"cluster_state:ok" not in info:
                return False
        return True

    wait_for(ok, 30, "cluster_state:ok")
    from redis.cluster import RedisCluster

    return f"redis+cluster://127.0.0.1:{ports[0]}", RedisCluster(host="127.0.0.1", port=ports[0],
                                                                  socket_timeout=30), pids


def queue_names() -> List[str]:
    """Three queue names in the three thirds of the slot space (one per master of a fresh
    3-master cluster made by `redis-cli --cluster create`)."""
    names: Dict[int, str] = {}
    n = 0
    while len(names) < 3:
        name = f"{{bench{n}}}:requests"
        names.setdefault(min(slot(name) * 3 // 16384, 2), name)
        n += 1
    return [names[i] for i in range(3)]


def run(server: str, cluster: bool, replicas: int, messages: int, concurrency: int, workdir: str) -> ClusterRow:
    procs = Processes()
    try:
        url, client, redis_pids = start_servers(procs, server, workdir, cluster)
        sim = procs.start([sys.executable, "-m", "asyncproc", "sim", "--port", "0", "--latency", "0"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        gateway = sim.stdout.readline().decode().strip().rsplit(" ", 1)[1]
        queues, results = queue_names(), "{bench-results}:results"
        collector = Collector(client, "redis-streams", results)
        collector.start()
        collector.ready.wait()
        roots = []
        for n in range(replicas):
            args = [sys.executable, "-m", "asyncproc", "--redis-url", url, "--inference-gateway", gateway,
                    "--message-queue-impl", "redis-streams", "--redis.result-queue-name", results,
                    "--concurrency", str(concurrency), "--workers", "1", "--metrics-port", "0",
                    "--log-level", "WARNING"]
            for queue in queues:
                args += ["--redis.request-queue-name", queue]
            proc = procs.start(args, stdout=subprocess.DEVNULL,
                               stderr=open(os.path.join(workdir, f"asyncproc-{n}.log"), "ab"))
            roots.append(psutil.Process(proc.pid))
        for root in roots:
            wait_for(lambda r=root: len(r.children()) >= 1, 30, "the workers")
        wait_for(lambda: all(client.exists(q) for q in queues), 30, "the consumer groups")
        time.sleep(1.0)  # workers import and build their sessions
        servers = [psutil.Process(pid) for pid in redis_pids]
        cpu_before = sum(tree_usage(r)[0] for r in roots)
        redis_before = sum(tree_usage(s)[0] for s in servers)
        sent: Dict[str, float] = {}
        deadline = int(time.time() + 3600)
        pipe = client.pipeline(transaction=False)
        for i in range(messages):
            rid = f"m{i}"
            pipe.xadd(queues[i % 3], {"message": orjson.dumps({"id": rid, "deadline": deadline,
                                                                "payload": {"model": "m", "prompt": f"p{i}"}})})
            sent[rid] = time.time()
            if len(pipe) >= 1000:
                pipe.execute()
        pipe.execute()
        give_up = time.time() + 300
        while len(collector.arrivals) < messages and time.time() < give_up:
            time.sleep(0.2)
        cpu = sum(tree_usage(r)[0] for r in roots) - cpu_before
        redis_cpu = sum(tree_usage(s)[0] for s in servers) - redis_before
        collector.running = False
        collector.join(5)
        rate, latencies, done = arrival_stats(collector.arrivals, sent)
        return ClusterRow("cluster 3m" if cluster else "1 redis", replicas, concurrency, messages, rate,
                          _pct(latencies, 50), _pct(latencies, 99), cpu / max(done, 1) * 1e6,
                          redis_cpu / max(done, 1) * 1e6, messages - done, collector.count - done)
    finally:
        procs.stop()


def main(server: str, messages: int, concurrency: int, replicas: List[int], json_path: Optional[str]) -> int:
    print(f"# cluster scenario: redis-streams, 3 queues, zero-latency gateway, --concurrency {concurrency} and"
          f" 1 worker per replica; the cluster has 3 masters and no replicas; {os.cpu_count()} CPUs")
    print(HEADER)
    rows = []
    for cluster in (False, True):
        for n in replicas:
            with tempfile.TemporaryDirectory(prefix="asyncproc-bench-") as workdir:
                rows.append(run(server, cluster, n, messages, concurrency, workdir))
            print(format_row(rows[-1]), flush=True)
            if json_path:
                with open(json_path, "ab") as out:
                    out.write(orjson.dumps(rows[-1].__dict__) + b"\n")
    return 0 if all(r.lost == 0 and r.duplicates == 0 for r in rows) else 1
