"""The README is the front door: it must name every option asyncproc accepts."""
from pathlib import Path

from asyncproc import config

README = (Path(__file__).resolve().parents[2] / "README.rst").read_text()


def test_every_option_is_documented():
    missing = [o.flag for o in config.OPTIONS if f"``{o.flag}``" not in README]
    assert missing == []


def test_every_env_var_is_documented():
    missing = [config.env_var(o.flag) for o in config.OPTIONS if config.env_var(o.flag) not in README]
    assert missing == []


def test_readme_renders_without_warnings():
    import docutils.core
    from docutils.writers.null import Writer

    docutils.core.publish_string(README, writer=Writer(),
                                 settings_overrides={"halt_level": 2, "report_level": 2})


def test_every_batch_command_option_is_documented(capsys):
    import re

    import pytest

    from asyncproc.tools import batch

    processor_flags = {o.flag for o in config.OPTIONS} | {"--config", "--help"}
    missing = []
    for command in batch.COMMANDS:
        with pytest.raises(SystemExit):
            batch.main(command, ["--help"])
        flags = set(re.findall(r"--[a-z][a-z.-]*[a-z]", capsys.readouterr().out)) - processor_flags
        missing += [f"{command} {flag}" for flag in sorted(flags) if f"``{flag}" not in README]
    assert missing == []
