"""What goes to stderr: logging set-up (levels from -v/-q, plain or JSON lines), status lines, progress."""
from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

from ruxo_fhir.redact import redact

__all__ = ["ProgressLine", "progress_text", "redact", "setup_logging", "status_line"]


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(f"{record.levelname.lower()}: {record.getMessage()}")


def _json_line(created: float, level: str, logger: str, message: str) -> str:
    payload = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + "Z",
        "level": level,
        "logger": logger,
        "msg": redact(message),
    }
    return json.dumps(payload, ensure_ascii=False)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _json_line(record.created, record.levelname.lower(), record.name, record.getMessage())


def status_line(message: str, fmt: str = "plain", *, level: str = "info") -> str:
    """A summary or error line for stderr: as is, or (``--log-format json``) one JSON object like the logs.

    Log collectors then get every stderr line as JSON: `accepted 12, rejected 0, total 12` becomes
    {"level": "info", "logger": "ruxo_fhir.summary", "msg": "accepted 12, ..."}.
    """
    if fmt != "json":
        return message
    return _json_line(time.time(), level, "ruxo_fhir.summary", message)


def setup_logging(verbosity: int = 0, fmt: str = "plain") -> None:
    """verbosity: -1 quiet (errors), 0 warnings, 1 info, 2+ debug."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _PlainFormatter())
    root = logging.getLogger("ruxo_fhir")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


# --- progress on a terminal: done/total, percent, rate and ETA ------------------------------

def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def progress_text(label: str, done: int, total: int | None, elapsed: float) -> str:
    """`pushed 1200/7400 (16 %), 35/s, ETA 0:02:57` (no ETA before there is a rate)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    if not total:
        return f"{label} {done}" + (f", {rate:.0f}/s" if rate else "")
    text = f"{label} {done}/{total} ({min(100, done * 100 // total)} %)"
    if rate and done < total:
        text += f", {rate:.0f}/s, ETA {_duration((total - done) / rate)}"
    elif done >= total:
        text += f", {_duration(elapsed)}"
    return text


class ProgressLine:
    """Feeds counts, redraws at most `hz` times a second through `write` (a `\\r` line)."""

    def __init__(self, label: str, write: Callable[[str], None], total: int | None = None, *, hz: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.write, self.total = label, write, total
        self.done = 0
        self._clock = clock
        self._start = clock()
        self._every = 1.0 / hz
        self._last = float("-inf")
        self._width = 0

    def __call__(self, n: int, total: int | None = None) -> None:
        self.done += n
        if total:
            self.total = total
        now = self._clock()
        if now - self._last >= self._every or (self.total and self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        text = progress_text(self.label, self.done, self.total, now - self._start)
        pad = max(0, self._width - len(text))
        self._width = len(text)
        self.write("\r" + text + " " * pad)

    def close(self) -> None:
        if self.done:
            self._draw(self._clock())
            self.write("\n")
