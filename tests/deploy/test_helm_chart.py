"""The Helm chart, rendered by Helm's own engine (helm-python-sdk) and validated offline.

helm itself cannot be installed here; helm-python-sdk bundles Helm's Go library, so
`Chart.render` is `helm template`. Every non-CRD manifest is validated strictly against
the Kubernetes schemas (kubernetes-validate); CRDs are checked field by field here.
"""
from pathlib import Path

import pytest
import yaml

from asyncproc import config

helm = pytest.importorskip("helm_python", reason="helm-python-sdk ships only an x86_64 wheel")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

CHART = Path(__file__).resolve().parents[2] / "helm" / "asyncproc"
KUBE_VERSION = "1.30.0"


def render(values=None):
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values=values or {}, name="batch", namespace="llm")
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return {(d["kind"]): d for d in docs}, docs


def validate(docs):
    for doc in docs:
        if doc["apiVersion"].startswith(("monitoring.coreos.com", "keda.sh")):
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def config_file(kinds):
    return kinds["ConfigMap"]["data"]["asyncproc.conf"]


def accepted_by_asyncproc(tmp_path, kinds, env=None):
    """The rendered config file is one asyncproc accepts (no unknown or bad option)."""
    path = tmp_path / "asyncproc.conf"
    path.write_text(config_file(kinds))
    argv = ["-c", str(path)]
    if "queues.json" in kinds["ConfigMap"]["data"]:
        queues = tmp_path / "queues.json"
        queues.write_text(kinds["ConfigMap"]["data"]["queues.json"])
        path.write_text(config_file(kinds).replace("/etc/asyncproc/queues.json", str(queues)))
    return config.load_settings(argv, env or {"ASYNCPROC_REDIS_URL": "redis://r:6379/0"})


def test_defaults_render_valid_manifests(tmp_path):
    kinds, docs = render()
    assert sorted(kinds) == ["ConfigMap", "Deployment", "Secret", "Service"]
    validate(docs)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["-c", "/etc/asyncproc/asyncproc.conf"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    settings = accepted_by_asyncproc(tmp_path, kinds)
    assert pod["terminationGracePeriodSeconds"] > settings.operations.shutdown_grace_period
    assert settings.concurrency == 16 and settings.operations.metrics_port == 9090
    env = {e["name"]: e for e in container["env"]}
    assert env["ASYNCPROC_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == kinds["Secret"]["metadata"]["name"]
    assert kinds["Secret"]["stringData"]["redis-url"] == "redis://redis-master:6379/0"
    assert kinds["Service"]["spec"]["ports"][0]["targetPort"] == "metrics"


def test_every_config_key_in_values_is_an_asyncproc_option():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    flags = {o.flag.lstrip("-") for o in config.OPTIONS}
    assert set(values["config"]) <= flags


PRODUCTION = {
    "replicaCount": 3,
    "config": {"concurrency": 64, "message-queue-impl": "redis-streams",
               "redis.request-queue-name": ["{batch}:food", "{batch}:bulk"],
               "redis.result-queue-name": "{batch}:results", "redis.claim": False,
               "shutdown-grace-period": 120, "worker-max-rss": 800, "retry-policy": "fixed"},
    "queues": [{"name": "{batch}:food", "objective": "food-review"}],
    "redis": {"existingSecret": "redis-credentials", "existingSecretKey": "url"},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
    "podMonitor": {"enabled": True},
    "podDisruptionBudget": {"enabled": True},
    "keda": {"enabled": True, "maxReplicaCount": 8},
}


def test_production_values(tmp_path):
    kinds, docs = render(PRODUCTION)
    validate(docs)
    assert "Secret" not in kinds  # the existing one is used
    assert "replicas" not in kinds["Deployment"]["spec"]  # KEDA owns the replica count
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 150
    ref = pod["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "redis-credentials", "key": "url"}
    settings = accepted_by_asyncproc(tmp_path, kinds)
    assert settings.message_queue_impl == "redis-streams" and settings.redis.claim is False
    assert settings.queue_names == ["{batch}:food", "{batch}:bulk"]
    assert settings.request_queues[0].objective == "food-review"
    monitor = kinds["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert kinds["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    assert kinds["PodDisruptionBudget"]["spec"]["minAvailable"] == 1
    scaled = kinds["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    assert [t["type"] for t in scaled["triggers"]] == ["redis-streams", "redis-streams"]
    assert scaled["triggers"][1]["metadata"]["stream"] == "{batch}:bulk"
    assert scaled["triggers"][0]["metadata"]["consumerGroup"] == "asyncproc"


def test_keda_on_sorted_sets_scales_on_the_depth_metric():
    kinds, _ = render({"config": {"message-queue-impl": "redis-sortedset"}, "keda": {"enabled": True}})
    (trigger,) = kinds["ScaledObject"]["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == 'sum(asyncproc_queue_depth{queue=~"batch-queue"})'


@pytest.mark.parametrize("values, message", [
    ({"keda": {"enabled": True}}, "pub/sub keeps no queue"),
    ({"keda": {"enabled": True}, "config": {"message-queue-impl": "gcp-pubsub"}}, "not for gcp-pubsub"),
    ({"terminationGracePeriodSeconds": 10}, "must be larger than config.shutdown-grace-period"),
    ({"config": {"redis-url": "redis://x"}}, "config.redis-url"),
])
def test_bad_values_fail_with_a_clear_message(values, message):
    with pytest.raises(helm.HelmError) as err:
        render(values)
    assert message in str(err.value)


def test_lint():
    report = helm.lint(str(CHART), strict=True, kube_version="v" + KUBE_VERSION)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []


CLUSTER = {"config": {"message-queue-impl": "redis-streams", "redis.request-queue-name": ["{a}:requests", "{b}:requests"],
                      "redis.wait-replicas": 1},
           "redis": {"url": "redis://redis-cluster:6379", "cluster": True},
           "keda": {"enabled": True, "redisClusterAddresses": ["redis-cluster-0:6379", "redis-cluster-1:6379"]}}


def test_cluster_mode(tmp_path):
    kinds, docs = render(CLUSTER)
    validate(docs)
    env = {e["name"]: e.get("value") for e in kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["ASYNCPROC_REDIS_CLUSTER"] == "true"
    settings = accepted_by_asyncproc(tmp_path, kinds, env={"ASYNCPROC_REDIS_CLUSTER": "true"})
    assert settings.redis.cluster and settings.redis.wait_replicas == 1
    triggers = kinds["ScaledObject"]["spec"]["triggers"]
    assert [t["type"] for t in triggers] == ["redis-cluster-streams"] * 2
    assert triggers[0]["metadata"]["addresses"] == "redis-cluster-0:6379,redis-cluster-1:6379"
    assert [t["metadata"]["stream"] for t in triggers] == ["{a}:requests", "{b}:requests"]
    default_seed = dict(CLUSTER, keda={"enabled": True, "redisAddress": "seed:6379"})
    triggers = render(default_seed)[0]["ScaledObject"]["spec"]["triggers"]
    assert triggers[0]["metadata"]["addresses"] == "seed:6379"


def test_cluster_mode_refuses_pubsub():
    with pytest.raises(helm.HelmError) as err:
        render({"redis": {"cluster": True}})
    assert "redis-pubsub does not run on a Redis Cluster" in str(err.value)
