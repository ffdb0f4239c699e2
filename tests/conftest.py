import pytest
from hypothesis import HealthCheck, settings

from tests.harness import PERSISTENT, Processor, PubSubEmulator, PubSubQueues, RedisServer, Results, Sim, pubsub_emulator_missing

# The suite runs in several processes on a couple of cores: a property test's examples are
# checked in full, but how fast Hypothesis draws them or one runs is the machine's load, not
# the code's behaviour (benchmarks measure speed).
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")

#: Tests that share an expensive server run on one xdist worker (`--dist loadgroup`), so the
#: server starts once per session, not once per worker: fixture name -> group.
SHARED_SERVERS = {"pubsub_emulator": "pubsub-emulator", "shared_cluster": "redis-cluster"}


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
        elif "faults" in str(item.fspath):
            item.add_marker(pytest.mark.faults)
        for fixture, group in SHARED_SERVERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(group))
                break


@pytest.fixture
def redis_server(request, tmp_path):
    """This test's redis-server (persistent when the test asks for `persistent_redis`)."""
    server = RedisServer(tmp_path / "redis").start(*(PERSISTENT if "persistent_redis" in request.fixturenames else ()))
    yield server
    server.stop()


@pytest.fixture
def persistent_redis(redis_server):
    """This test's redis-server with an append-only file synced on every write: a test that
    stops, kills or restarts it loses nothing Redis acknowledged."""
    return redis_server


@pytest.fixture
def sim():
    gateway = Sim()
    yield gateway
    gateway.stop()


@pytest.fixture
def results(redis_server):
    collector = Results(redis_server.port)
    yield collector
    collector.close()


@pytest.fixture
def processors(tmp_path):
    """Starts asyncproc process trees (logs in the test's temp dir); every one started is
    killed at teardown."""
    started = []

    def start(redis_url, gateway, *args, wait_ready=True, env=None, command=None, cwd=None):
        proc = Processor(redis_url, gateway, *args, log=tmp_path / f"asyncproc-{len(started)}.log",
                         env=env, command=command, cwd=cwd)
        started.append(proc)
        if wait_ready:
            proc.wait_ready()
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def start_processor(processors, redis_server):
    """Start asyncproc against this test's Redis."""
    return lambda gateway, *args, **kwargs: processors(redis_server.url, gateway, *args, **kwargs)


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory):
    """One Pub/Sub emulator for the session; each test makes its own topics (PubSubQueues)."""
    missing = pubsub_emulator_missing()
    if missing:
        pytest.skip(f"Pub/Sub emulator unavailable: {missing}")
    emulator = PubSubEmulator(tmp_path_factory.mktemp("pubsub")).start()
    yield emulator
    emulator.stop()


@pytest.fixture
def pubsub(pubsub_emulator):
    queues = PubSubQueues(pubsub_emulator)
    yield queues
    queues.close()


@pytest.fixture
def start_gcp_processor(processors, pubsub):
    """Start asyncproc on this test's Pub/Sub queues (no Redis)."""
    return lambda gateway, *args, **kwargs: processors("redis://127.0.0.1:1/0", gateway, *pubsub.args(*args),
                                                       env=pubsub.env(), **kwargs)
