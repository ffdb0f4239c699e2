"""What the daemon installs and imports, and where the version is written."""
import subprocess
import sys

import asyncproc
from tests.harness import ROOT


def test_the_daemon_imports_no_tool_dependency():
    code = ("import sys\n"
            "from asyncproc import cli, client, supervisor\n"
            "from asyncproc.transports import memory, redis_producer, redis_pubsub, redis_sortedset, redis_streams\n"
            "loaded = [m for m in ('aiohttp', 'tqdm') if m in sys.modules]\n"
            "sys.exit(f'imported: {loaded}' if loaded else 0)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_a_tool_without_its_extra_says_what_to_install():
    code = "import sys; sys.modules['aiohttp'] = None\nfrom asyncproc import cli\nsys.exit(cli.main(['sim']))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == ("asyncproc sim: needs aiohttp, which the daemon does not install:"
                                  " pip install 'asyncproc[tools]'")


def test_the_version_is_written_once():
    from setuptools.config.setupcfg import read_configuration

    assert "version = attr: asyncproc.__version__" in (ROOT / "setup.cfg").read_text()
    assert read_configuration(str(ROOT / "setup.cfg"))["metadata"]["version"] == asyncproc.__version__
    requires = read_configuration(str(ROOT / "setup.cfg"))["options"]["install_requires"]
    assert not [r for r in requires if r.startswith(("aiohttp", "tqdm"))]
