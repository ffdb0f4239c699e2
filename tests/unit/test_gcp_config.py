"""gcp-pubsub options: what is required, where names come from, the missing-extra error."""
import subprocess
import sys

import orjson
import pytest

from asyncproc import config
from asyncproc.config import ConfigError
from asyncproc.transports.gcp_pubsub import _seconds, resource_path

GCP = ["--message-queue-impl", "gcp-pubsub", "--gcp.project", "p1", "--gcp.result-topic", "results"]


def load(argv=(), env=None):
    return config.load_settings(list(argv), env or {}, cpu_count=2)


def test_subscriptions_are_the_request_queues():
    s = load([*GCP, "--gcp.subscription", "a", "--gcp.subscription", "b", "--gcp.subscription", "a",
              "--redis.request-queue-name", "ignored"])
    assert s.queue_names == ["a", "b"] and s.gcp.project == "p1" and s.gcp.result_topic == "results"
    assert s.gcp.dead_letter_topic == "" and s.gcp.ack_deadline == 60


def test_queues_file_names_subscriptions(tmp_path):
    path = tmp_path / "queues.json"
    path.write_bytes(orjson.dumps({"queues": [{"name": "food", "objective": "food-review"}]}))
    s = load([*GCP, "--queues-file", str(path), "--gcp.subscription", "bulk"])
    assert s.queue_names == ["food", "bulk"] and s.request_queues[0].objective == "food-review"


def test_project_from_google_cloud_project_and_env_vars():
    s = load(["--message-queue-impl", "gcp-pubsub", "--gcp.result-topic", "r", "--gcp.subscription", "s"],
             env={"GOOGLE_CLOUD_PROJECT": "from-env"})
    assert s.gcp.project == "from-env"
    s = load([], env={"ASYNCPROC_MESSAGE_QUEUE_IMPL": "gcp-pubsub", "ASYNCPROC_GCP_PROJECT": "p",
                      "ASYNCPROC_GCP_RESULT_TOPIC": "r", "ASYNCPROC_GCP_SUBSCRIPTION": "[s1, s2]",
                      "ASYNCPROC_GCP_ACK_DEADLINE": "30", "ASYNCPROC_GCP_DEAD_LETTER_TOPIC": "dead"})
    assert s.queue_names == ["s1", "s2"] and s.gcp.ack_deadline == 30 and s.gcp.dead_letter_topic == "dead"


def test_full_paths_need_no_project():
    s = load(["--message-queue-impl", "gcp-pubsub", "--gcp.subscription", "projects/a/subscriptions/s",
              "--gcp.result-topic", "projects/b/topics/r"])
    assert s.gcp.project == ""
    assert resource_path("x", "subscriptions", s.queue_names[0]) == "projects/a/subscriptions/s"
    assert resource_path("x", "topics", "r") == "projects/x/topics/r"


@pytest.mark.parametrize("argv, names", [
    (["--message-queue-impl", "gcp-pubsub", "--gcp.project", "p", "--gcp.result-topic", "r"], "--gcp.subscription"),
    (["--message-queue-impl", "gcp-pubsub", "--gcp.project", "p", "--gcp.subscription", "s"], "--gcp.result-topic"),
    (["--message-queue-impl", "gcp-pubsub", "--gcp.subscription", "s", "--gcp.result-topic", "r"], "--gcp.project"),
    ([*GCP, "--gcp.subscription", "s", "--gcp.ack-deadline", "5"], "--gcp.ack-deadline"),
    ([*GCP, "--gcp.subscription", "s", "--gcp.ack-deadline", "601"], "--gcp.ack-deadline"),
])
def test_bad_gcp_options_name_the_option(argv, names):
    with pytest.raises(ConfigError) as err:
        load(argv)
    assert names in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("delay, seconds", [(-1, 0), (0, 0), (0.01, 1), (1.0, 1), (1.2, 2), (599.5, 600), (5000, 600)])
def test_retry_delay_as_ack_deadline_is_never_early(delay, seconds):
    assert _seconds(delay) == seconds


def test_missing_library_exits_2_naming_the_extra():
    code = ("import sys; sys.modules['google.cloud.pubsub_v1'] = None; from asyncproc.cli import main; "
            "sys.exit(main(['--message-queue-impl', 'gcp-pubsub', '--gcp.project', 'p', '--gcp.subscription', 's',"
            " '--gcp.result-topic', 'r']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "asyncproc: error: --message-queue-impl gcp-pubsub: google-cloud-pubsub is not installed"
        " (pip install 'asyncproc[gcp]')"]
