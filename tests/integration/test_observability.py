"""What operators look at: the Grafana dashboard and the alert rules, checked against a live
asyncproc's /metrics, parsed and unit-tested by promtool, and fired for real by a Prometheus
scraping a running asyncproc (Debian's `prometheus` package)."""
import importlib.util
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import redis
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import ROOT, ServerProcess, Sim, free_port, request, wait_until

RULES = ROOT / "deploy" / "prometheus" / "asyncproc-alerts.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "asyncproc-alerts.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "asyncproc-dashboard.json"

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: apt-get install prometheus")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus missing: apt-get install prometheus")

_spec = importlib.util.spec_from_file_location("deploy_build", ROOT / "deploy" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
            "offset"}
LABEL_LISTS = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"


def rule_exprs():
    return [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_exprs():
    return build.expressions(json.loads(DASHBOARD.read_text()))


def metric_names(expr: str) -> set:
    """The series names a PromQL expression reads: identifiers outside strings, label
    matchers, ranges and label lists that are neither functions nor keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(LABEL_LISTS, " ", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        before, after = expr[:match.start()], expr[match.end():].lstrip()
        if match.group() in KEYWORDS or after.startswith("(") or re.search(r"[0-9.]$", before):
            continue  # a keyword, a function, or the exponent of a number
        names.add(match.group())
    return names


def label_names(expr: str) -> set:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    out = {m.strip() for group in re.findall(LABEL_LISTS, expr) for m in group.split(",") if m.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        out |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    return out


def exported(text: str):
    """Series names and label names in an exposition, including the samples a labelled
    family declares but has not produced yet."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("_count", "_sum", "_created", "")}
    names, labels = set(), set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        for sample in family.samples:
            names.add(sample.name)
            labels |= set(sample.labels)
    return names, labels


def test_metric_names_are_read_from_expressions():
    expr = ('sum by (queue, le) (rate(a_total{job=~"$x", b="c{d}"}[5m])) / on (queue) group_left (x) '
            "b_count > 1e3 unless histogram_quantile(0.5, c_bucket) or vector(0)")
    assert metric_names(expr) == {"a_total", "b_count", "c_bucket"}
    assert label_names(expr) == {"queue", "le", "job", "b", "x"}


def test_dashboard_and_chart_copies_are_current():
    assert DASHBOARD.read_text() == build.render(), "run python3 deploy/build.py"
    files = ROOT / "helm" / "asyncproc" / "files"
    assert (files / DASHBOARD.name).read_text() == DASHBOARD.read_text(), "run python3 deploy/build.py"
    assert (files / RULES.name).read_text() == RULES.read_text(), "run python3 deploy/build.py"


def test_dashboard_covers_what_an_operator_asks():
    text = " ".join(dashboard_exprs())
    for series in ("asyncproc_results_total", "asyncproc_queue_depth", "asyncproc_queue_oldest_age_seconds",
                   "asyncproc_in_flight", "asyncproc_gate_budget", "asyncproc_adaptive_limit", "asyncproc_held_back",
                   "asyncproc_retries_total", "asyncproc_shed_total", "asyncproc_end_to_end_seconds_bucket",
                   "asyncproc_gateway_latency_seconds_bucket", "asyncproc_workers_alive",
                   "asyncproc_worker_restarts_total", "asyncproc_transport_errors_total", "asyncproc_outbox",
                   "asyncproc_dead_letters_total"):
        assert series in text
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels)


def test_every_query_and_alert_reads_only_what_asyncproc_exports(redis_server, sim, start_processor):
    # a gate reading a key nobody sets: failed readings (fail_open, so work still flows)
    gate = '{"type": "redis", "key": "no-such-key", "fail_open": true, "interval": 0.1}'
    proc = start_processor(sim.url, "--workers", "1", "--concurrency", "2", "--gate", gate)
    client = redis_server.client()
    client.publish("batch-queue", request("ok"))
    client.publish("batch-queue", b'{"payload": {}}')  # no id: a dead letter
    wait_until(lambda: proc.metric("asyncproc_results_total") == 1 and proc.metric("asyncproc_dead_letters_total"),
               what="a result and a dead letter")
    wait_until(lambda: proc.metric("asyncproc_gate_source_errors_total"), what="a failed gate reading")
    names, labels = exported(proc.get("/metrics").text)
    labels |= {"job", "instance", "le"}  # added by Prometheus on scraping, and the histogram's own
    missing = {}
    for expr in dashboard_exprs() + rule_exprs():
        read = metric_names(expr)
        assert read, f"reads no series: {expr}"
        unknown = (read - names) | {f"label {name}" for name in label_names(expr) - labels}
        if unknown:
            missing[expr] = sorted(unknown)
    assert missing == {}


@needs_promtool
def test_every_query_parses_and_the_rules_check(tmp_path):
    assert subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True).returncode == 0
    # the dashboard's queries, as recording rules (Grafana's $__rate_interval filled in)
    rules = [{"record": f"asyncproc:dashboard_{i}", "expr": expr.replace("$__rate_interval", "1m")}
             for i, expr in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout


@needs_promtool
def test_alert_unit_tests_pass_and_cover_every_alert():
    out = subprocess.run([PROMTOOL, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                         cwd=RULE_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for t in case["alert_rule_test"] if t.get("exp_alerts")}
    assert tested == alerts
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["annotations"]["summary"] and rule["labels"]["severity"]
            assert f"\n{rule['alert']}\n" in (ROOT / "README.rst").read_text(), f"no runbook for {rule['alert']}"


# -- a real Prometheus -----------------------------------------------------------------------

class Prometheus(ServerProcess):
    """`prometheus` scraping one target every second and evaluating `rules` every second."""

    log_name = "prometheus.log"

    def __init__(self, workdir: Path, target: str, rules: dict) -> None:
        self.dir = workdir
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "rules.yaml").write_text(yaml.safe_dump(rules))
        (workdir / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": [str(workdir / "rules.yaml")],
            "scrape_configs": [{"job_name": "asyncproc", "static_configs": [{"targets": [target]}]}],
        }))
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=open(workdir / self.log_name, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(self._ready, 30, 0.1, what="prometheus to be ready")
        except AssertionError:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}: {self.log_text()[-2000:]}")
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/-/ready", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def alerts(self) -> dict:
        """alertname -> state (pending, firing) of the alerts active now."""
        reply = requests.get(f"http://127.0.0.1:{self.port}/api/v1/alerts", timeout=5).json()
        return {a["labels"]["alertname"]: a["state"] for a in reply["data"]["alerts"]}

    def query(self, expr: str) -> list:
        reply = requests.get(f"http://127.0.0.1:{self.port}/api/v1/query", params={"query": expr}, timeout=5).json()
        assert reply["status"] == "success", (expr, reply)
        return reply["data"]["result"]

    def wait_alert(self, name: str, state, timeout: float = 60.0) -> None:
        wait_until(lambda: self.alerts().get(name) == state, timeout, 0.25,
                   what=f"{name} {state or 'resolved'} (active now: {self.alerts()})")


def fast_rules(window: str = "10s", hold: str = "1s") -> dict:
    """The shipped rules with their ranges and `for:` shrunk, so a test sees them fire in seconds."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["expr"] = re.sub(r"\[\d+[smh]\]", f"[{window}]", rule["expr"])
            rule["for"] = hold
    return rules


class Feeder:
    """Publishes a request every 50 ms (deadline 2 s) until stopped; rides out a Redis outage."""

    def __init__(self, port: int) -> None:
        self.port, self.sent, self._stop = port, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        while not self._stop.wait(0.05):
            try:
                client.publish("batch-queue", request(f"r{self.sent}", deadline_in=2))
                self.sent += 1
            except redis.RedisError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@needs_prometheus
def test_alerts_fire_and_resolve_on_a_real_prometheus(tmp_path, redis_server, start_processor):
    gateway_port = free_port()
    sim = Sim("--port", str(gateway_port))
    prometheus = feeder = None
    try:
        proc = start_processor(sim.url, "--workers", "1", "--concurrency", "8",
                               "--retry-base-delay", "0.2", "--retry-max-delay", "0.5")
        prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{proc.metrics_port}", fast_rules())
        feeder = Feeder(redis_server.port)
        wait_until(lambda: proc.metric("asyncproc_results_total", outcome="success") >= 20, what="results flowing")
        assert prometheus.alerts() == {}

        # the dashboard's queries, with its variables at "All", answer from what was scraped
        def grafana(expr):
            return re.sub(r'"\$(job|instance|queue)"', '".*"', expr).replace("$__rate_interval", "5s")

        wait_until(lambda: prometheus.query(grafana(dashboard_exprs()[0])), what="Prometheus to have results")
        answered = {expr for expr in dashboard_exprs() if prometheus.query(grafana(expr))}
        for series in ("asyncproc_results_total", "asyncproc_in_flight", "asyncproc_gate_budget",
                       "asyncproc_end_to_end_seconds_bucket", "asyncproc_workers_alive", "asyncproc_outbox"):
            assert any(series in expr for expr in answered), series

        # the gateway goes away: every request is retried until its deadline passes
        sim.stop()
        prometheus.wait_alert("AsyncprocDeadlineExceeded", "firing")
        sim = Sim("--port", str(gateway_port))
        prometheus.wait_alert("AsyncprocDeadlineExceeded", None)
        assert proc.metric("asyncproc_results_total", outcome="deadline_exceeded") > 0

        # Redis goes away: asyncproc keeps serving /metrics, counting failed reconnects
        redis_server.stop()
        prometheus.wait_alert("AsyncprocQueueSystemUnreachable", "firing")
        assert proc.get("/readyz").text == "queue system unreachable\n"
        redis_server.start()
        proc.wait_ready()
        prometheus.wait_alert("AsyncprocQueueSystemUnreachable", None)
        results = proc.metric("asyncproc_results_total", outcome="success")
        wait_until(lambda: proc.metric("asyncproc_results_total", outcome="success") > results,
                   what="results flowing again")
    finally:
        for part in (feeder, sim, prometheus):
            if part is not None:
                part.stop()
