"""Logging set-up shared by the supervisor and workers: human text or JSON lines on stderr.

Both formats pass every line through `redact.scrub` (no registered secret is ever printed);
the text format also escapes control characters in the message, so nothing that came
from outside (an id, a gateway's body, a reason) can start a forged line.
"""
from __future__ import annotations

import logging
import sys
import time

import orjson

from asyncproc import redact

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra={...}` fields (such as `id`) become keys."""

    def __init__(self, process_name: str) -> None:
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": self.process_name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact.scrub(orjson.dumps(out, default=str).decode())


class TextFormatter(logging.Formatter):
    """One line per record: the message's control characters escaped (a traceback, ours,
    keeps its lines), registered secrets scrubbed."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = redact.escape(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        return redact.scrub(super().format(record))


def configure(fmt: str, level: str, process_name: str = "supervisor") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process_name))
    else:
        formatter = TextFormatter(
            f"%(asctime)s.%(msecs)03dZ %(levelname)-7s {process_name} %(message)s",
            "%Y-%m-%dT%H:%M:%S",
        )
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "requests"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
