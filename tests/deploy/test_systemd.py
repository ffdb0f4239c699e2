"""The systemd unit, its example configuration, and sd_notify over a real datagram socket."""
import shlex
import shutil
import signal
import socket
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from asyncproc import config
from asyncproc.notify import Notifier
from tests.harness import wait_until

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "systemd"


def unit(path=DEPLOY / "asyncproc.service"):
    sections = defaultdict(lambda: defaultdict(list))
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        else:
            key, _, value = line.partition("=")
            sections[current][key].append(value)
    return sections


def test_unit_is_type_notify_hardened_and_outlasts_the_drain(tmp_path):
    service = unit()["Service"]
    assert service["Type"] == ["notify"]
    assert service["Restart"] == ["on-failure"] and service["RestartPreventExitStatus"] == ["2"]
    assert service["EnvironmentFile"] == ["-/etc/asyncproc/asyncproc.env"]
    for hardening in ("NoNewPrivileges", "DynamicUser", "ProtectHome", "PrivateTmp"):
        assert service[hardening] == ["yes"], hardening
    assert service["ProtectSystem"] == ["strict"]
    argv = shlex.split(service["ExecStart"][0])
    assert argv[0].endswith("/asyncproc") and argv[1:] == ["-c", "/etc/asyncproc/asyncproc.conf"]
    settings = config.load_settings(["-c", str(DEPLOY / "asyncproc.conf")], {})
    stop_timeout = int(service["TimeoutStopSec"][0])
    assert stop_timeout > settings.operations.shutdown_grace_period + 10  # drain, then the wait for Redis
    assert service["KillMode"] == ["mixed"]  # SIGTERM to the supervisor, which stops its workers
    assert int(service["WatchdogSec"][0]) >= 10


def test_example_environment_file_sets_only_known_variables():
    known = {config.env_var(o.flag) for o in config.OPTIONS} | {"REDIS_URL", config.env_var("--config")}
    lines = [line for line in (DEPLOY / "asyncproc.env").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    names = {line.split("=", 1)[0] for line in lines}
    assert names and names <= known
    env = dict(line.split("=", 1) for line in lines)
    settings = config.load_settings(["-c", str(DEPLOY / "asyncproc.conf")], env)
    assert settings.redis.url.startswith("redis://") and settings.workers == 4


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path):
    target = tmp_path / "asyncproc.service"
    target.write_text((DEPLOY / "asyncproc.service").read_text().replace("/opt/asyncproc/bin/asyncproc", "/bin/true"))
    out = subprocess.run(["systemd-analyze", "verify", str(target)], capture_output=True, text=True)
    assert "asyncproc.service" not in out.stderr or out.returncode == 0, out.stderr


@pytest.mark.parametrize("env, address, interval", [
    ({}, None, None),
    ({"NOTIFY_SOCKET": "/run/x.sock"}, "/run/x.sock", None),
    ({"NOTIFY_SOCKET": "@abstract", "WATCHDOG_USEC": "4000000"}, "\0abstract", 2.0),
    ({"NOTIFY_SOCKET": "/s", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}, "/s", None),
])
def test_notifier_reads_the_environment(env, address, interval):
    notifier = Notifier(env)
    assert notifier.address == address and notifier.watchdog_interval == interval


def test_ready_watchdog_and_stopping_reach_the_notify_socket(tmp_path, redis_server, sim, start_processor):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.1)
    received = []

    def drain():
        try:
            while True:
                received.append(sock.recv(4096).decode())
        except (socket.timeout, BlockingIOError):
            pass
        return received

    try:
        proc = start_processor(sim.url, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "500000"})
        wait_until(lambda: sum("WATCHDOG=1" in m for m in drain()) >= 3, timeout=20, what="watchdog pings")
        assert received[0].splitlines()[0] == "READY=1"
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(30) == 0
        drain()
        assert any(m.startswith("STOPPING=1") for m in received)
    finally:
        sock.close()
