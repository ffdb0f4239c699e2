"""Secure by default, end to end with real processes: no secret in anything asyncproc or its
tools print or serve; a rotated token file reaches the gateway; mutual TLS to the gateway;
the first failed gateway connection is logged once with its cause."""
import os
import subprocess
import sys
import time

import orjson
import pytest

from tests.gatewaystub import SecureGateway
from tests.harness import ROOT, RedisServer, request, wait_until
from tests.tls import make_pki

REDIS_SECRET = "redis-pass-Zq81x"
GATEWAY_SECRET = "gw-pass-Hk29v"
HEADER_SECRET = "hdr-key-Ww73n"
TOKEN_SECRET = "token-file-Pp55m"
SCRAPE_SECRET = "scrape-pass-Jj14q"
QUERY_SECRET = "query-token-Rr66z"
DEAD_SECRET = "dead-gw-pass-Tt08k"
WRONG_SECRET = "wrong-pass-Mm47c"
BAD_CONFIG_SECRET = "bad-config-pass-Nn90d"
SECRETS = [REDIS_SECRET, GATEWAY_SECRET, HEADER_SECRET, TOKEN_SECRET, SCRAPE_SECRET, QUERY_SECRET, DEAD_SECRET,
           WRONG_SECRET, BAD_CONFIG_SECRET]


@pytest.fixture
def secured_redis(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    server.client().config_set("requirepass", REDIS_SECRET)
    yield server
    server.stop()


@pytest.fixture
def gateways():
    """Starts SecureGateways; they are stopped after the test."""
    started = []

    def start(*args, **kwargs):
        started.append(SecureGateway(*args, **kwargs))
        return started[-1]

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path / "pki")


def run(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "asyncproc", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_in_any_output(tmp_path, secured_redis, processors, gateways, log_format):
    import redis

    basic = "Basic " + __import__("base64").b64encode(f"gw:{GATEWAY_SECRET}".encode()).decode()
    gateway = gateways(accept={basic, f"Bearer {TOKEN_SECRET}"})
    host = gateway.url.split("://", 1)[1]
    redis_url = f"redis://:{REDIS_SECRET}@127.0.0.1:{secured_redis.port}/0"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN_SECRET)
    queues = tmp_path / "queues.json"
    queues.write_text(orjson.dumps({"queues": [
        {"name": "batch-queue"},
        {"name": "bearer", "gateway": gateway.url, "token_file": str(token_file)},
        {"name": "dead", "gateway": f"http://gw:{DEAD_SECRET}@127.0.0.1:1"},
    ]}).decode())
    gate = orjson.dumps({"type": "endpoint-scrape", "fail_open": True, "metric": "x", "capacity": 4,
                         "url": f"http://scraper:{SCRAPE_SECRET}@127.0.0.1:1/metrics?token={QUERY_SECRET}"})
    proc = processors(redis_url, f"http://gw:{GATEWAY_SECRET}@{host}", "--message-queue-impl", "redis-streams",
                      "--queues-file", str(queues), "--gateway-header", f"X-Api-Key={HEADER_SECRET}",
                      "--gate", gate.decode(), "--log-level", "DEBUG", "--log-format", log_format)
    admin = redis.Redis(port=secured_redis.port, password=REDIS_SECRET, socket_timeout=5)
    admin.xadd("bearer", {"message": request("b1")})
    admin.xadd("dead", {"message": request("d1", deadline_in=1.5)})
    admin.xadd("batch-queue", {"message": request("hostile\nINFO forged line", deadline="soon")})
    wait_until(lambda: admin.xlen("batch-queue-result") >= 3, 30, 0.05, what="3 results")
    wait_until(lambda: proc.metric("asyncproc_gate_source_errors_total") >= 1, 10, 0.05, what="a gate error")

    outputs = [proc.get("/metrics").text, proc.get("/readyz").text, proc.get("/healthz").text]
    requests_in = tmp_path / "in.jsonl"
    requests_in.write_bytes(b"\n".join(orjson.dumps({"id": f"s{i}", "payload": {"p": i}}) for i in range(3)))
    common = ["--redis-url", redis_url, "--message-queue-impl", "redis-streams"]
    submitted = run("submit", str(requests_in), "--batch", "sec", *common)
    assert submitted.returncode == 0, submitted.stderr
    steps = [
        submitted,
        run("status", *common),
        run("status", "--json", *common),
        run("collect", "--batch", "sec", "--wait", "--timeout", "30", "-o", str(tmp_path / "c.jsonl"), *common),
        run("run-batch", str(requests_in), "-o", str(tmp_path / "r.jsonl"), "--timeout", "30", "--no-progress",
            *common),
        run("cancel", "--batch", "sec", *common),
        run("status", "--redis-url", f"redis://:{WRONG_SECRET}@127.0.0.1:{secured_redis.port}/0"),
        run("status", "--redis-url", f"http://:{BAD_CONFIG_SECRET}@127.0.0.1/0"),
        run("--inference-gateway", f"ftp://u:{BAD_CONFIG_SECRET}@gw"),
        run("--gateway-tokn", BAD_CONFIG_SECRET),
        run("submit", str(requests_in), "--redis-url", f"redis://:{WRONG_SECRET}@127.0.0.1:1/0"),
    ]
    assert [s.returncode for s in steps] == [0, 0, 0, 0, 0, 0, 1, 2, 2, 2, 1], [s.stderr for s in steps]
    assert "authentication failed" in steps[6].stderr and "connection refused" in steps[10].stderr
    assert "redis://:***@127.0.0.1" in steps[1].stdout
    for step in steps:
        outputs += [step.stdout, step.stderr]
    outputs.append(proc.get("/metrics").text)
    assert proc.terminate() == 0
    log = proc.log.read_text()
    outputs.append(log)
    everything = "\n".join(outputs)
    leaked = [s for s in SECRETS if s in everything]
    assert leaked == []
    assert 'source="http://scraper:***@127.0.0.1:1/metrics?token=***"' in outputs[0]
    # the first failed connection to each gateway: once, at ERROR, with its cause
    dead = [line for line in log.splitlines() if "127.0.0.1:1: connection refused" in line]
    assert len(dead) == 1 and ("ERROR" in dead[0] or '"error"' in dead[0]), dead
    if log_format == "text":  # an id with a line break stays on its line
        assert not any(line.startswith("INFO forged") for line in log.splitlines())
        assert "hostile\\nINFO forged line" in log
    seen = gateway.requests()
    assert {r["headers"].get("Authorization") for r in seen} == {basic, f"Bearer {TOKEN_SECRET}"}
    assert all(r["headers"]["X-Api-Key"] == HEADER_SECRET for r in seen)

def test_token_file_rotation_and_mutual_tls_to_the_gateway(tmp_path, pki, gateways, redis_server, start_processor):
    gateway = gateways(pki, require_client_cert=True, accept={"Bearer first-token", "Bearer second-token"})
    token = tmp_path / "token"
    token.write_text("first-token\n")
    start_processor(gateway.url, "--message-queue-impl", "redis-streams", "--gateway-token-file", str(token),
                    "--gateway-ca-file", str(pki.ca), "--gateway-client-cert", str(pki.client_cert),
                    "--gateway-client-key", str(pki.client_key))
    client = redis_server.client()
    client.xadd("batch-queue", {"message": request("one")})
    wait_until(lambda: client.xlen("batch-queue-result") >= 1, 30, 0.05, what="the first result")
    (tmp_path / "token.new").write_text("second-token\n")
    os.replace(tmp_path / "token.new", token)  # how a projected token or a Secret is rotated

    def rotated():
        client.xadd("batch-queue", {"message": request(f"n{time.monotonic_ns()}")})
        return gateway.requests()[-1]["headers"]["Authorization"] == "Bearer second-token"

    wait_until(rotated, 10, 0.2, what="the rotated token at the gateway")
    results = [orjson.loads(f[b"message"]) for _, f in client.xrange("batch-queue-result")]
    assert all(r.get("error") is None for r in results), results
    assert {r["peer"] for r in gateway.requests()} == {"client"}

def test_an_untrusted_gateway_certificate_is_logged_once_with_its_cause(tmp_path, pki, gateways, redis_server, start_processor):
    gateway = gateways(pki)
    proc = start_processor(gateway.url, "--message-queue-impl", "redis-streams",
                           "--gateway-ca-file", str(pki.other_ca), "--retry-base-delay", "0.05",
                           "--retry-max-delay", "0.1")
    client = redis_server.client()
    client.xadd("batch-queue", {"message": request("t1", deadline_in=1.5)})
    client.xadd("batch-queue", {"message": request("t2", deadline_in=1.5)})
    wait_until(lambda: client.xlen("batch-queue-result") >= 2, 30, 0.05, what="2 deadline results")
    errors = [line for line in proc.log.read_text().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "TLS verification failed" in errors[0], errors
    assert gateway.requests() == []

def test_verification_turned_off_works_and_is_a_warning(tmp_path, pki, gateways, redis_server, start_processor):
    gateway = gateways(pki)
    proc = start_processor(gateway.url, "--message-queue-impl", "redis-streams", "--gateway-tls-verify", "false")
    client = redis_server.client()
    client.xadd("batch-queue", {"message": request("v1")})
    wait_until(lambda: client.xlen("batch-queue-result") >= 1, 30, 0.05, what="a result")
    (_, fields), = client.xrange("batch-queue-result")
    assert orjson.loads(fields[b"message"]).get("error") is None
    warnings = [line for line in proc.log.read_text().splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "--gateway-tls-verify false" in warnings[0], warnings
