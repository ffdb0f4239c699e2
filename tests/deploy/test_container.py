"""The Dockerfile cannot be built here (no Docker engine); check what the chart relies on."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_runs_asyncproc_as_the_charts_non_root_user():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert lines[[i for i, x in enumerate(lines) if x.startswith("FROM ")][0]].endswith("-slim")
    assert "USER 10001:10001" in lines
    assert 'ENTRYPOINT ["asyncproc"]' in lines
    assert any(x.startswith("RUN pip install") and x.split("&&")[0].rstrip().endswith(" .") for x in lines)
    values = yaml.safe_load((ROOT / "helm" / "asyncproc" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 10001
    assert values["image"]["repository"] in (ROOT / "Dockerfile").read_text()
