import dataclasses
import subprocess
import sys

import orjson
import pytest

from asyncproc import aimd, config, gates
from asyncproc.config import ConfigError


def load(argv=(), env=None, cpus=4):
    return config.load_settings(list(argv), env or {}, cpu_count=cpus)


def test_seed_defaults():
    s = load()
    assert s.concurrency == 8 and s.workers == 3   # one CPU of four left to the supervisor
    assert s.queue_names == ["batch-queue"]
    assert s.redis.retry_queue == "batch-sortedset-retry"
    assert s.redis.result_queue == "batch-queue-result"
    assert s.dispatch.merge_policy == "random-robin"
    assert s.message_queue_impl == "redis-pubsub"
    assert s.redis.url == "redis://localhost:6379/0"
    assert s.gateway.objective == "" and s.retry.max_attempts == 0
    assert s.operations.metrics_port == 9090


@pytest.mark.parametrize("concurrency, cpus, workers, capacity", [
    (8, 4, 3, [3, 3, 2]),
    (2, 16, 2, [1, 1]),
    (10, 3, 2, [5, 5]),
    (10, 2, 1, [10]),
    (10, 1, 1, [10]),
])
def test_workers_capacity_covers_concurrency(concurrency, cpus, workers, capacity):
    s = load(["--concurrency", str(concurrency)], cpus=cpus)
    assert s.workers == workers and s.capacity_per_worker() == capacity
    assert sum(s.capacity_per_worker()) == concurrency


def test_flag_env_and_file(tmp_path):
    cfg = tmp_path / "asyncproc.conf"
    cfg.write_text("concurrency = 12\nredis.request-queue-name = [a, b]\nretry-policy = fixed\n")
    s = load(["-c", str(cfg)])
    assert s.concurrency == 12 and s.queue_names == ["a", "b"] and s.retry.backoff.policy == "fixed"
    s = load(["-c", str(cfg), "--concurrency", "3"], env={"ASYNCPROC_CONCURRENCY": "5"})
    assert s.concurrency == 3  # flag beats env beats file
    s = load(["-c", str(cfg)], env={"ASYNCPROC_CONCURRENCY": "5"})
    assert s.concurrency == 5


def test_redis_url_env():
    assert load(env={"REDIS_URL": "redis://r:1/2"}).redis.url == "redis://r:1/2"
    assert load(env={"REDIS_URL": "redis://r:1/2", "ASYNCPROC_REDIS_URL": "redis://s:1/0"}).redis.url == "redis://s:1/0"


def test_repeated_request_queues():
    s = load(["--redis.request-queue-name", "a", "--redis.request-queue-name", "b",
              "--redis.request-queue-name", "a"])
    assert s.queue_names == ["a", "b"]


@pytest.mark.parametrize("argv, names", [
    (["--concurrency", "0"], "--concurrency"),
    (["--concurrency", "many"], "--concurrency"),
    (["--workers", "9"], "--workers"),
    (["--retry-policy", "linear"], "--retry-policy"),
    (["--inference-gateway", "localhost:8000"], "--inference-gateway"),
    (["--redis-url", "http://x"], "--redis-url"),
    (["--metrics-port", "70000"], "--metrics-port"),
    (["--retry-base-delay", "0"], "--retry-base-delay"),
    (["--retry-base-delay", "5", "--retry-max-delay", "1"], "--retry-max-delay"),
    (["--no-such-flag"], "--no-such-flag"),
    (["-c", "/does/not/exist"], "/does/not/exist"),
    (["--queues-file", "/does/not/exist"], "--queues-file"),
])
def test_bad_options_name_the_option(argv, names):
    with pytest.raises(ConfigError) as err:
        load(argv)
    assert names in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("doc, problem", [
    ({"queues": []}, "non-empty"),
    ({"queues": [{"nmae": "a"}]}, "unknown key 'nmae'"),
    ({"queues": [{"name": ""}]}, "name"),
    ({"queues": [{"name": "a", "gateway": "ftp://x"}]}, "gateway"),
    ({"queues": [{"name": "a", "path": "v1"}]}, "path"),
    ({"queues": [{"name": "a", "weight": 0}]}, "weight"),
    ({"queues": [{"name": "a"}, {"name": "a"}]}, "twice"),
])
def test_bad_queues_file(tmp_path, doc, problem):
    path = tmp_path / "queues.json"
    path.write_bytes(orjson.dumps(doc))
    with pytest.raises(ConfigError) as err:
        load(["--queues-file", str(path)])
    assert problem in str(err.value)


def test_queues_file(tmp_path):
    path = tmp_path / "queues.json"
    path.write_bytes(orjson.dumps({"queues": [
        {"name": "food", "path": "/v1/chat/completions", "objective": "food-review"},
        {"name": "bulk", "gateway": "http://gw:8000", "labels": {"team": "x"}, "weight": 2}]}))
    s = load(["--queues-file", str(path), "--redis.request-queue-name", "extra"])
    assert s.queue_names == ["food", "bulk", "extra"]
    assert s.request_queues[0].objective == "food-review"
    assert s.request_queues[1].gateway == "http://gw:8000" and s.request_queues[1].weight == 2


def test_every_option_has_help_and_env():
    for opt in config.OPTIONS:
        assert opt.help and config.env_var(opt.flag).startswith("ASYNCPROC_")


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "asyncproc", *argv], capture_output=True, text=True,
                          timeout=60)


def test_cli_bad_option_exits_2_with_one_line():
    proc = run_cli("--concurrency", "-1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "asyncproc: error: --concurrency: must be at least 1 (got -1)"]


def test_cli_help_lists_every_option():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for opt in config.OPTIONS:
        assert opt.flag in proc.stdout


@pytest.mark.parametrize("gate, problem", [
    ({"type": "endpiont-scrape"}, "queues[0].gate: unknown gate type 'endpiont-scrape'"),
    ({"type": "redis", "key": "b", "fail_opne": True}, "queues[0].gate: unknown parameter 'fail_opne'"),
    ({"type": "endpoint-scrape", "url": "http://vllm:8000/metrics", "metric": "m", "capacity": -1},
     "queues[0].gate.capacity"),
])
def test_bad_gate_in_queues_file(tmp_path, gate, problem):
    path = tmp_path / "queues.json"
    path.write_bytes(orjson.dumps({"queues": [{"name": "a", "gate": gate}]}))
    with pytest.raises(ConfigError) as err:
        load(["--queues-file", str(path)])
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_gates_limits_and_merge_options(tmp_path):
    path = tmp_path / "queues.json"
    path.write_bytes(orjson.dumps({"queues": [
        {"name": "online-ish", "priority": 2, "max_in_flight": 3},
        {"name": "bulk", "gate": {"type": "redis", "key": "bulk-budget", "fail_open": True}}]}))
    s = load(["--queues-file", str(path), "--gate", '{"type": "constant", "budget": 0.5}', "--gate-interval", "2",
              "--gate-timeout", "0.1", "--adaptive-concurrency", "true", "--adaptive-floor", "2",
              "--request-merge-policy", "priority", "--priority-aging", "30", "--redis-url", "redis://r:1/0"])
    online, bulk = s.request_queues
    assert s.gate_of(online) == gates.Constant(0.5) and online.max_in_flight == 3
    assert s.gate_of(bulk) == gates.RedisGate(2.0, True, gates.RedisKey("redis://r:1/0", "bulk-budget", 0.1))
    assert s.dispatch.adaptive == aimd.Policy(2, 8, 0.8, 0.0)
    assert s.dispatch.merge_policy == "priority" and s.dispatch.priority_aging == 30
    assert load().dispatch.adaptive is None and load().dispatch.default_gate == gates.OPEN


@pytest.mark.parametrize("argv, problem", [
    (["--gate", "{not json"], "--gate: not valid JSON"),
    (["--gate", '{"type": "reddis", "key": "x"}'], "--gate: unknown gate type 'reddis'"),
    (["--gate", '{"type": "redis", "kye": "x"}'], "--gate: unknown parameter 'kye'"),
    (["--adaptive-floor", "9", "--adaptive-concurrency", "true"], "--adaptive-floor"),
    (["--adaptive-decrease", "1"], "--adaptive-decrease"),
    (["--adaptive-concurrency", "maybe"], "--adaptive-concurrency"),
    (["--request-merge-policy", "fifo"], "--request-merge-policy"),
])
def test_bad_gate_options(argv, problem):
    with pytest.raises(ConfigError) as err:
        load(argv)
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_cli_misspelled_gate_exits_2_with_one_line(tmp_path):
    path = tmp_path / "queues.json"
    path.write_bytes(orjson.dumps({"queues": [{"name": "a", "gate": {
        "type": "endpoint-scrape", "url": "http://vllm:8000/metrics", "metirc": "vllm:num_requests_waiting"}}]}))
    proc = run_cli("--queues-file", str(path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "queues[0].gate: unknown parameter 'metirc' for gate type endpoint-scrape" in lines[0]
    proc = run_cli("--gate", '{"type": "prometheus"}')
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--gate: unknown gate type 'prometheus'" in proc.stderr


def test_gate_from_config_file_and_env(tmp_path):
    cfg = tmp_path / "asyncproc.conf"
    cfg.write_text('gate = {"type": "redis", "key": "x", "interval": 2}\n')
    assert load(["-c", str(cfg)]).dispatch.default_gate == gates.RedisGate(
        2.0, False, gates.RedisKey("redis://localhost:6379/0", "x", 0.25))
    env = {"ASYNCPROC_GATE": '{"type": "constant", "budget": 0.3}'}
    assert load(env=env).dispatch.default_gate == gates.Constant(0.3)


def test_every_option_names_a_section_of_settings():
    sections = {f.name for f in dataclasses.fields(config.Settings)} | {"processing"}
    assert {o.section for o in config.OPTIONS} == set(config.SECTIONS) <= sections


def test_a_section_built_by_hand_starts_from_the_option_defaults():
    """Tests and embedders build one section (RedisConfig(url=...)): its defaults are the options'."""
    s = load()
    for name in set(config.SECTIONS) - {"processing"}:
        section = getattr(s, name)
        assert type(section)() == section, name


def test_a_transport_takes_its_own_section():
    from asyncproc.transports.redis_sortedset import RedisSortedSet

    redis = config.RedisConfig(url="redis://localhost:1/0", key_prefix="p")
    transport = RedisSortedSet(redis, ["a", "b"], "llm-d-async")
    try:
        assert list(transport.sets) == ["a", "b"] and transport.results.mode == "lpush"
    finally:
        transport.close()
