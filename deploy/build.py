#!/usr/bin/env python3
"""Builds the Grafana dashboard from the panel list below and copies it and the alert rules
into the Helm chart. Run `python3 deploy/build.py` after editing either; a test fails while
the files in the repository differ from what this writes.

Each panel answers one question an on-call person asks (is batch work flowing, is it
starving, is it hurting online traffic, is anything lost, is the gate stuck); every query
uses only series asyncproc exports (checked against a live /metrics by the tests).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "asyncproc-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "asyncproc-alerts.yaml"
CHART_FILES = ROOT / "helm" / "asyncproc" / "files"

DS = {"type": "prometheus", "uid": "${datasource}"}
#: selectors for the dashboard's variables
J = 'job=~"$job", instance=~"$instance"'
JQ = J + ', queue=~"$queue"'
RATE = "$__rate_interval"


def q(expr: str, legend: str) -> dict:
    return {"expr": expr, "legendFormat": legend}


def quantiles(metric: str, sel: str, prefix: str = "", levels=(0.5, 0.95, 0.99)) -> list:
    return [q(f"histogram_quantile({p}, sum by (queue, le) (rate({metric}_bucket{{{sel}}}[{RATE}])))",
              f"{prefix}p{round(p * 100)} {{{{queue}}}}") for p in levels]


# (row title, [(panel title, description, unit, [queries], width)])
ROWS = [
    ("Flow: is batch work moving?", [
        ("Results by outcome", "Results written per second, per queue and outcome.", "reqps", [
            q(f"sum by (queue, outcome) (rate(asyncproc_results_total{{{JQ}}}[{RATE}]))", "{{queue}} {{outcome}}"),
        ], 12),
        ("Requests received", "Request messages taken from the queues per second.", "reqps", [
            q(f"sum by (queue) (rate(asyncproc_requests_received_total{{{JQ}}}[{RATE}]))", "{{queue}}"),
        ], 12),
    ]),
    ("Backlog: is it starving or piling up?", [
        ("Backlog", "Requests waiting in persisted queues, leased (taken, not finished), held in memory"
                    " waiting for a worker, and entries in the pub/sub retry set.", "short", [
            q(f"sum by (queue) (asyncproc_queue_depth{{{JQ}}})", "waiting {{queue}}"),
            q(f"sum by (queue) (asyncproc_queue_leased{{{JQ}}})", "leased {{queue}}"),
            q(f"sum(asyncproc_waiting{{{J}}})", "in memory"),
            q(f"sum by (queue) (asyncproc_retry_set_size{{{J}}})", "retry set {{queue}}"),
        ], 12),
        ("Backlog age", "Age of the oldest request not yet taken (persisted queues), and how long"
                        " requests wait from receipt to first dispatch.", "s", [
            q(f"max by (queue) (asyncproc_queue_oldest_age_seconds{{{JQ}}})", "oldest {{queue}}"),
            *quantiles("asyncproc_queue_residence_seconds", JQ, "receipt to dispatch ", (0.95,)),
        ], 12),
    ]),
    ("Capacity: is it hurting online traffic?", [
        ("In flight vs limits", "Requests at workers, per queue; the adaptive concurrency limit when"
                                " --adaptive-concurrency is on.", "short", [
            q(f"sum by (queue) (asyncproc_in_flight{{{JQ}}})", "in flight {{queue}}"),
            q(f"sum(asyncproc_adaptive_limit{{{J}}} > 0)", "adaptive limit"),
        ], 8),
        ("Gate budget", "The budget each queue's gate gives, 0 (closed) to 1 (open).", "percentunit", [
            q(f"min by (queue) (asyncproc_gate_budget{{{JQ}}})", "{{queue}}"),
        ], 8),
        ("Held back by reason", "Requests waiting although workers have room, by what holds them.",
         "short", [
            q(f"sum by (queue, reason) (asyncproc_held_back{{{JQ}}})", "{{queue}} {{reason}}"),
        ], 8),
        ("Gate decisions", "Gate decisions per second by reason; failed-open / failed-closed mean"
                           " the gate source cannot be read.", "ops", [
            q(f"sum by (queue, reason) (rate(asyncproc_gate_decisions_total{{{JQ}}}[{RATE}]))",
              "{{queue}} {{reason}}"),
            q(f"sum by (source) (rate(asyncproc_gate_source_errors_total{{{J}}}[{RATE}]))", "errors {{source}}"),
        ], 12),
        ("Retries and sheds", "Retries scheduled by reason, attempts the gateway shed (429), requests"
                              " staged in the retry set for lack of room.", "ops", [
            q(f"sum by (queue, reason) (rate(asyncproc_retries_total{{{JQ}}}[{RATE}]))", "retry {{queue}} {{reason}}"),
            q(f"sum by (queue) (rate(asyncproc_shed_total{{{JQ}}}[{RATE}]))", "shed {{queue}}"),
            q(f"sum by (queue) (rate(asyncproc_staged_total{{{JQ}}}[{RATE}]))", "staged {{queue}}"),
        ], 12),
    ]),
    ("Latency", [
        ("End-to-end latency", "A request's creation (or receipt) to its result.", "s",
         quantiles("asyncproc_end_to_end_seconds", JQ), 12),
        ("Gateway latency", "One gateway attempt, measured in the worker.", "s",
         quantiles("asyncproc_gateway_latency_seconds", JQ), 12),
    ]),
    ("Health: is anything being lost?", [
        ("Workers", "Worker processes ready, and restarts (crashes, OOM kills, hung workers).", "short", [
            q(f"sum by (instance) (asyncproc_workers_alive{{{J}}})", "alive {{instance}}"),
            q(f"sum by (instance) (increase(asyncproc_worker_restarts_total{{{J}}}[{RATE}]))",
              "restarts {{instance}}"),
        ], 8),
        ("Queue system", "Errors talking to Redis / Pub/Sub per second, writes (results,"
                         " retries, acks) waiting in the outbox, and pub/sub subscriptions Redis"
                         " closed (what it held was lost).", "short", [
            q(f"sum by (instance) (rate(asyncproc_transport_errors_total{{{J}}}[{RATE}]))", "errors/s {{instance}}"),
            q(f"sum by (instance) (asyncproc_outbox{{{J}}})", "outbox {{instance}}"),
            q(f"sum by (instance) (increase(asyncproc_subscriber_dropped_total{{{J}}}[{RATE}]))",
              "pub/sub subscription dropped by Redis {{instance}}"),
        ], 8),
        ("Dead letters and bad input", "Messages dead-lettered, invalid messages by kind, and"
                                       " deliveries skipped (already in flight or answered elsewhere).", "short", [
            q(f"sum by (queue) (increase(asyncproc_dead_letters_total{{{JQ}}}[{RATE}]))", "dead letters {{queue}}"),
            q(f"sum by (queue, kind) (increase(asyncproc_bad_messages_total{{{JQ}}}[{RATE}]))",
              "bad {{queue}} {{kind}}"),
            q(f"sum by (queue, reason) (increase(asyncproc_skipped_deliveries_total{{{JQ}}}[{RATE}]))",
              "skipped {{queue}} {{reason}}"),
        ], 8),
    ]),
]

STATS = [
    ("Results/s", "reqps", f"sum(rate(asyncproc_results_total{{{JQ}}}[{RATE}]))"),
    ("Missed deadline", "percentunit",
     f'sum(rate(asyncproc_results_total{{{JQ}, outcome="deadline_exceeded"}}[{RATE}]))'
     f" / sum(rate(asyncproc_results_total{{{JQ}}}[{RATE}]))"),
    ("Backlog", "short",
     f"(sum(asyncproc_queue_depth{{{JQ}}}) or vector(0)) + (sum(asyncproc_waiting{{{J}}}) or vector(0))"),
    ("In flight", "short", f"sum(asyncproc_in_flight{{{JQ}}})"),
    ("Workers alive", "short", f"sum(asyncproc_workers_alive{{{J}}})"),
    ("Outbox", "short", f"sum(asyncproc_outbox{{{J}}})"),
]


def variable(name: str, label: str, query: str) -> dict:
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "query": {"query": query, "refId": name}, "definition": query, "refresh": 2,
        "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def build() -> dict:
    panels: list = []
    ids = iter(range(1, 1000))
    y = 0
    for x, (title, unit, expr) in zip(range(0, 24, 4), STATS):
        panels.append({
            "id": next(ids), "type": "stat", "title": title, "datasource": DS,
            "gridPos": {"h": 4, "w": 4, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area"},
            "targets": [{"refId": "A", "datasource": DS, "expr": expr, "instant": False}],
        })
    y += 4
    for row_title, row_panels in ROWS:
        panels.append({"id": next(ids), "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        y += 1
        x = 0
        for title, description, unit, queries, width in row_panels:
            if x + width > 24:
                x, y = 0, y + 8
            panels.append({
                "id": next(ids), "type": "timeseries", "title": title, "description": description,
                "datasource": DS, "gridPos": {"h": 8, "w": width, "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": unit, "custom": {"fillOpacity": 10}}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                            "tooltip": {"mode": "multi", "sort": "desc"}},
                "targets": [{"refId": chr(65 + i), "datasource": DS, **target} for i, target in enumerate(queries)],
            })
            x += width
        y += 8
    return {
        "uid": "asyncproc", "title": "asyncproc", "tags": ["asyncproc", "llm", "batch"],
        "description": "asyncproc: batch LLM requests dispatched into an inference pool's idle capacity",
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1,
        "time": {"from": "now-3h", "to": "now"}, "refresh": "30s",
        "annotations": {"list": []}, "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            variable("job", "Job", "label_values(asyncproc_workers_alive, job)"),
            variable("instance", "Instance", 'label_values(asyncproc_workers_alive{job=~"$job"}, instance)'),
            variable("queue", "Queue", 'label_values(asyncproc_requests_received_total{job=~"$job"}, queue)'),
        ]},
        "panels": panels,
    }


def expressions(dashboard: dict) -> list:
    """Every PromQL expression in the dashboard: panel targets and variable queries."""
    out = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"]
            out.append(query[len("label_values("):query.rindex(",")])  # the series selector inside
    return out


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> int:
    DASHBOARD.write_text(render())
    CHART_FILES.mkdir(exist_ok=True)
    shutil.copyfile(DASHBOARD, CHART_FILES / DASHBOARD.name)
    shutil.copyfile(RULES, CHART_FILES / RULES.name)
    print(f"wrote {DASHBOARD.relative_to(ROOT)} and the chart's copies in {CHART_FILES.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
