"""The chart's Grafana dashboard ConfigMap and PrometheusRule: off by default, and when on,
the very dashboard and rules the repository ships (rendered by Helm's own engine)."""
import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("helm_python", reason="helm-python-sdk ships only an x86_64 wheel")

from tests.deploy.test_helm_chart import render, validate  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "asyncproc-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "asyncproc-alerts.yaml"
RULE_KEYS = {"alert", "record", "expr", "for", "labels", "annotations"}


def test_off_by_default():
    _, docs = render()
    assert "PrometheusRule" not in {d["kind"] for d in docs}
    assert not any("asyncproc.json" in d.get("data", {}) for d in docs)


def test_dashboard_configmap_for_grafanas_sidecar():
    _, docs = render({"grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "LLM"},
                                           "namespace": "monitoring"}})
    validate(docs)
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and "asyncproc.json" in d["data"]]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["name"] == "batch-asyncproc-dashboard"
    assert json.loads(configmap["data"]["asyncproc.json"]) == json.loads(DASHBOARD.read_text())


def test_prometheus_rule_holds_the_shipped_alerts():
    kinds, docs = render({"prometheusRule": {"enabled": True, "labels": {"release": "prom"}}})
    validate(docs)
    rule = kinds["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "prom"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    for group in rule["spec"]["groups"]:
        assert set(group) == {"name", "rules"}
        for item in group["rules"]:
            assert set(item) <= RULE_KEYS and {"alert", "expr"} <= set(item)


def test_lint_with_both_on():
    import helm_python

    from tests.deploy.test_helm_chart import CHART, KUBE_VERSION

    values = {"grafanaDashboard": {"enabled": True}, "prometheusRule": {"enabled": True}}
    report = helm_python.lint(str(CHART), values, strict=True, kube_version="v" + KUBE_VERSION)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
