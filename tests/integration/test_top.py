"""`asyncproc top` in a pseudo-terminal, watching a real running asyncproc."""
import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import threading

import pytest

from asyncproc.tools import top
from tests.harness import ROOT, kill_group, request, wait_until

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """A program on the slave side of a pty (140x40); the master side is read in a thread."""

    def __init__(self, argv) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
        self.master, self.output, self._lock = master, b"", threading.Lock()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                                     start_new_session=True, env=dict(os.environ, TERM="xterm"))
        os.close(slave)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # the program exited: EIO on the master
                    return
                if not data:
                    return
                with self._lock:
                    self.output += data

    def raw(self) -> str:
        with self._lock:
            return self.output.decode(errors="replace")

    def screen(self) -> str:
        """The last complete frame, as the user sees it."""
        frames = self.raw().split(top.HOME)
        complete = [f for f in frames if top.CLEAR_BELOW in f]
        return ANSI.sub("", complete[-1]).replace("\r", "") if complete else ""

    def rows(self) -> dict:
        """The queue table of the last frame: queue -> {column: cell}."""
        lines = self.screen().splitlines()
        header = next((i for i, line in enumerate(lines) if line.startswith("QUEUE")), None)
        if header is None:
            return {}
        names = lines[header].split()
        out = {}
        for line in lines[header + 1:]:
            if not line.strip():
                break
            cells = line.split()
            out[cells[0]] = dict(zip(names, cells))
        return out

    def cell(self, queue: str, column: str) -> str:
        return self.rows().get(queue, {}).get(column, "")

    def close(self) -> None:
        kill_group(self.proc)
        self.proc.wait(10)
        os.close(self.master)


@pytest.fixture
def terminal():
    started = []

    def start(*args):
        term = Terminal([sys.executable, "-m", "asyncproc", "top", *args])
        started.append(term)
        return term

    yield start
    for term in started:
        if term.proc.poll() is None:
            term.close()


def test_top_shows_a_running_asyncproc_live(tmp_path, redis_server, sim, start_processor, terminal):
    queues = tmp_path / "queues.json"
    queues.write_text(json.dumps({"queues": [{"name": "open"},
                                             {"name": "closed", "gate": {"type": "constant", "budget": 0}}]}))
    proc = start_processor(sim.url, "--workers", "2", "--concurrency", "8", "--queues-file", str(queues))
    term = terminal(str(proc.metrics_port))
    wait_until(lambda: "ready" in term.screen() and "workers 2 alive" in term.screen()
               and {"open", "closed"} <= set(term.rows()), what=f"the first frames:\n{term.screen()}")

    client = redis_server.client()
    for i in range(3):  # held by the gateway for a while: in flight
        client.publish("open", request(f"slow-{i}", {"prompt": "x", "x_sim": {"latency": 30}}))
    for i in range(4):  # the closed gate holds these back
        client.publish("closed", request(f"held-{i}"))
    wait_until(lambda: term.cell("open", "IN_FLIGHT") == "3" and term.cell("closed", "HELD_BACK") == "gate:4",
               what=f"in flight and held back:\n{term.screen()}")
    rows = term.rows()
    assert rows["open"]["BUDGET"] == "100%" and rows["closed"]["BUDGET"] == "0%"
    assert rows["closed"]["IN_FLIGHT"] == "0"

    for i in range(10):
        client.publish("open", request(f"fast-{i}"))
    wait_until(lambda: term.cell("open", "DONE/S") not in ("", "-", "0.0") and re.search(r"gateway p50 \d", term.screen()),
               what=f"a results rate and the gateway latency:\n{term.screen()}")
    wait_until(lambda: "success 10" in term.screen(), what=f"10 results counted:\n{term.screen()}")

    proc.kill()  # top keeps running and says so
    wait_until(lambda: "unreachable" in term.screen(), what=f"unreachable:\n{term.screen()}")

    os.write(term.master, b"q")
    assert term.proc.wait(10) == 0
    wait_until(lambda: term.raw().endswith(top.MAIN_SCREEN), 5, what="the terminal restored")


def test_top_prints_plain_frames_when_not_on_a_terminal(redis_server, sim, start_processor):
    proc = start_processor(sim.url, "--workers", "1")
    out = subprocess.run([sys.executable, "-m", "asyncproc", "top", f"http://127.0.0.1:{proc.metrics_port}/metrics",
                          "--count", "2", "--interval", "0.2"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout
    assert out.stdout.count("asyncproc top") == 2 and "batch-queue" in out.stdout
