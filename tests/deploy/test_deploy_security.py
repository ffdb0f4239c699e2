"""Exposure is a choice: the systemd example keeps the metrics port on this host; the image
installs pinned versions on a pinned base tag."""
import re
from pathlib import Path

from asyncproc import config

ROOT = Path(__file__).resolve().parents[2]


def test_systemd_example_binds_metrics_to_localhost():
    settings = config.load_settings(["-c", str(ROOT / "deploy" / "systemd" / "asyncproc.conf")], {})
    assert settings.operations.metrics_host == "127.0.0.1"


def test_image_pins_its_base_tag_and_dependency_versions():
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), base
    assert "pip install -c constraints.txt ." in dockerfile and "constraints.txt" in dockerfile.split("COPY", 1)[1]
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][^=\s]*", p) for p in pins), pins
    pinned = {p.split("==")[0].lower().replace("_", "-") for p in pins}
    from setuptools.config.setupcfg import read_configuration

    requires = read_configuration(str(ROOT / "setup.cfg"))["options"]["install_requires"]
    names = {re.split(r"[<>=!~; \[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requires}
    assert names <= pinned, names - pinned
