import pytest

from tests.harness import Processor, RedisServer, Results, Sim


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
        elif "faults" in str(item.fspath):
            item.add_marker(pytest.mark.faults)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


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
def start_processor(tmp_path, redis_server):
    """Start asyncproc against this test's Redis; every one started is killed at teardown."""
    started = []

    def start(gateway, *args, wait_ready=True, env=None, command=None, cwd=None):
        proc = Processor(redis_server.url, gateway, *args, log=tmp_path / f"asyncproc-{len(started)}.log",
                         env=env, command=command, cwd=cwd)
        started.append(proc)
        if wait_ready:
            proc.wait_ready()
        return proc

    yield start
    for proc in started:
        proc.kill()
