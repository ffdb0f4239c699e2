"""Redis over TLS with client certificates, requirepass and an ACL user: a real redis-server
started with --tls-port (skipped, with the reason, when no redis-server here has TLS)."""
import time

import orjson
import pytest
import requests

from asyncproc import config, redact
from asyncproc.transports.base import TransportError
from asyncproc.transports.redisbase import guarded, make_client
from tests.harness import request, wait_until
from tests.tls import ADMIN_PASSWORD, APP_PASSWORD, APP_USER, TlsRedisServer, make_pki, tls_redis_binary

BINARY = tls_redis_binary()
pytestmark = pytest.mark.skipif(BINARY is None, reason="no redis-server built with TLS here"
                                " (Debian's redis-server package has it)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory, pki):
    server = TlsRedisServer(tmp_path_factory.mktemp("tls-redis"), pki, BINARY).start()
    yield server
    server.stop()


def metric(proc, name):
    try:
        return proc.metric(name)
    except requests.RequestException:
        return 0.0


def settings(server, pki, *extra):
    return config.load_settings([
        "--redis-url", server.url, "--redis-ca-file", str(pki.ca), "--redis-client-cert", str(pki.client_cert),
        "--redis-client-key", str(pki.client_key), *extra], environ={})


def test_acl_user_over_mutual_tls(tls_redis, pki):
    s = settings(tls_redis, pki, "--redis-username", APP_USER, "--redis-password", APP_PASSWORD)
    client = make_client(s.redis.url, s.redis.auth)
    assert client.acl_whoami() == APP_USER


def test_password_file_is_read_at_each_new_connection(tls_redis, pki, tmp_path):
    secret = tmp_path / "password"
    secret.write_text("wrong-password-1\n")
    s = settings(tls_redis, pki, "--redis-password-file", str(secret))
    client = make_client(s.redis.url, s.redis.auth)
    with pytest.raises(TransportError) as err:
        guarded(client.ping)
    assert redact.cause(str(err.value)) == "authentication failed"
    secret.write_text(ADMIN_PASSWORD + "\n")  # the Secret was rotated
    assert guarded(client.ping)


def test_options_win_over_the_url_credentials(tls_redis, pki):
    url = f"rediss://{APP_USER}:not-the-password@127.0.0.1:{tls_redis.port}/0"
    s = config.load_settings(["--redis-url", url, "--redis-ca-file", str(pki.ca), "--redis-client-cert",
                              str(pki.client_cert), "--redis-client-key", str(pki.client_key),
                              "--redis-password", APP_PASSWORD], environ={})
    assert make_client(s.redis.url, s.redis.auth).acl_whoami() == APP_USER


@pytest.mark.parametrize("case, cause", [
    ("untrusted CA", "TLS verification failed"),
    ("no client certificate", "TLS handshake failed"),
    ("wrong password", "authentication failed"),
])
def test_failures_say_why(tls_redis, pki, case, cause):
    argv = ["--redis-url", tls_redis.url, "--redis-password", ADMIN_PASSWORD]
    if case == "untrusted CA":
        argv += ["--redis-ca-file", str(pki.other_ca), "--redis-client-cert", str(pki.client_cert),
                 "--redis-client-key", str(pki.client_key)]
    elif case == "no client certificate":
        argv += ["--redis-ca-file", str(pki.ca)]
    else:
        argv = [*argv[:2], "--redis-password", "nope-nope", "--redis-ca-file", str(pki.ca),
                "--redis-client-cert", str(pki.client_cert), "--redis-client-key", str(pki.client_key)]
    s = config.load_settings(argv, environ={})
    with pytest.raises(TransportError) as err:
        guarded(make_client(s.redis.url, s.redis.auth).ping)
    assert redact.cause(str(err.value)) == cause, str(err.value)


def test_processor_over_tls_with_an_acl_user(tls_redis, pki, processors, sim, tmp_path):
    password = tmp_path / "redis-password"
    password.write_text(APP_PASSWORD)
    admin = tls_redis.client()
    queue, results = f"tls-{time.time_ns()}", f"tls-results-{time.time_ns()}"
    admin.set(f"{queue}-budget", "0.5")
    gate = orjson.dumps({"type": "redis", "key": f"{queue}-budget", "interval": 0.1}).decode()
    proc = processors(tls_redis.url, sim.url, "--message-queue-impl", "redis-streams", "--gate", gate,
                      "--redis.request-queue-name", queue, "--redis.result-queue-name", results,
                      "--redis-ca-file", str(pki.ca), "--redis-client-cert", str(pki.client_cert),
                      "--redis-client-key", str(pki.client_key), "--redis-username", APP_USER,
                      "--redis-password-file", str(password))
    for i in range(5):
        admin.xadd(queue, {"message": request(f"r{i}")})
    wait_until(lambda: admin.xlen(results) >= 5, 30, 0.05, what="5 results over TLS")
    got = [orjson.loads(f[b"message"]) for _, f in admin.xrange(results)]
    assert sorted(r["id"] for r in got) == [f"r{i}" for i in range(5)]
    assert proc.metric("asyncproc_transport_errors_total") == 0
    # the redis gate reads the same server with the same credentials and TLS files
    assert proc.metric("asyncproc_gate_budget", queue=queue) == 0.5
    assert proc.metric("asyncproc_gate_source_errors_total") == 0


def test_a_wrong_password_at_start_is_logged_once_with_its_cause(tls_redis, pki, processors, sim):
    proc = processors(tls_redis.url, sim.url, "--message-queue-impl", "redis-streams",
                      "--redis-ca-file", str(pki.ca), "--redis-client-cert", str(pki.client_cert),
                      "--redis-client-key", str(pki.client_key), "--redis-username", APP_USER,
                      env={"ASYNCPROC_REDIS_PASSWORD": "wrong-password-42"}, wait_ready=False)
    wait_until(lambda: metric(proc, "asyncproc_transport_errors_total") >= 3, 30, 0.1,
               what="three failed connects")
    lines = [line for line in proc.log.read_text().splitlines() if "ERROR" in line]
    assert len(lines) == 1, lines
    assert "cannot connect to the queue system: redis: authentication failed" in lines[0]
    assert "wrong-password-42" not in proc.log.read_text()
    assert proc.get("/readyz").status_code == 503
