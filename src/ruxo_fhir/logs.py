"""Logging set-up: levels from -v/-q, plain or JSON lines, on stderr only."""
from __future__ import annotations

import json
import logging
import sys
import time

from ruxo_fhir.redact import redact

__all__ = ["redact", "setup_logging"]


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(f"{record.levelname.lower()}: {record.getMessage()}")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        return json.dumps(payload, ensure_ascii=False)


def setup_logging(verbosity: int = 0, fmt: str = "plain") -> None:
    """verbosity: -1 quiet (errors), 0 warnings, 1 info, 2+ debug."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _PlainFormatter())
    root = logging.getLogger("ruxo_fhir")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
