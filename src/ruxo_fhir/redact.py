"""One redaction step for every string that leaves the process (terminal, logs, reports, files).

It knows the live secrets of this run (bearer token, basic password and its base64 form,
SMART client assertion and access token), registered by the auth objects that hold them, and
the generic shapes of secrets (``Bearer ...``, ``Basic ...``, ``eyJ...`` JWTs, PEM blocks,
``password=`` style query values). A server that echoes our Authorization header in an error
body therefore cannot make us print it.
"""
from __future__ import annotations

import base64
import re
import threading
from typing import Any

MASK = "[redacted]"
_MIN_SECRET = 4  # shorter "secrets" would blank out ordinary words; the shapes below still apply

_lock = threading.Lock()
_live: set[str] = set()
_live_re: re.Pattern[str] | None = None

_SHAPES = re.compile(
    r"-----BEGIN [A-Z0-9 ]*-----.*?(?:-----END [A-Z0-9 ]*-----|\Z)"  # PEM blocks (even cut off)
    r"|\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*)?"  # JWT / JWS / JWE compact form
    r"|(?i:\b(?:bearer|basic|negotiate|dpop)\s+)"  # auth scheme + credentials (8+ chars, not a word)
    r"(?=[A-Za-z0-9._~+/-]*[0-9._~+/=-])[A-Za-z0-9._~+/=-]{8,}"
    r"|(?i:\b(?:access_token|refresh_token|id_token|password|passwd|client_secret|client_assertion"
    r"|assertion|api_key|apikey)\b[\"']?\s*[=:]\s*[\"']?)[^\s&\"',;}]+"  # key=value / "key": "value"
    r"|(?<=://)[^/\s:@]+:[^/\s@]+(?=@)",  # user:password@ in URLs
    re.DOTALL,
)


def remember(*secrets: str | bytes | None) -> None:
    """Register live secrets of this run; every later ``redact`` call blanks them out."""
    global _live_re
    added = False
    with _lock:
        for secret in secrets:
            if isinstance(secret, bytes):
                secret = secret.decode("utf-8", "replace")
            if not secret or len(secret) < _MIN_SECRET:
                continue
            for form in (secret, secret.strip()):
                if len(form) >= _MIN_SECRET and form not in _live:
                    _live.add(form)
                    added = True
        if added:
            ordered = sorted(_live, key=len, reverse=True)  # longest first: no partial leftovers
            _live_re = re.compile("|".join(re.escape(s) for s in ordered))


def remember_basic(user: str, password: str) -> None:
    """The password and the base64 ``user:password`` that goes on the wire."""
    remember(password, base64.b64encode(f"{user}:{password}".encode()).decode("ascii"))


def forget_all() -> None:
    """Drop every live secret (tests; a long-lived process switching credentials)."""
    global _live_re
    with _lock:
        _live.clear()
        _live_re = None


def redact(text: str) -> str:
    """``text`` with live secrets and secret-shaped substrings replaced by ``[redacted]``."""
    if not text:
        return text
    live = _live_re
    if live is not None:
        text = live.sub(MASK, text)
    return _SHAPES.sub(_mask_shape, text)


def _mask_shape(match: re.Match[str]) -> str:
    found = match.group(0)
    if found.startswith("-----BEGIN"):
        return MASK
    head = re.match(r"(?is)((?:bearer|basic|negotiate|dpop)\s+|[^=:]*[=:]\s*[\"']?)", found)
    if head and not found.startswith("eyJ") and "@" not in found and head.end() < len(found):
        return head.group(1) + MASK
    return MASK


def redact_obj(value: Any) -> Any:
    """``redact`` applied to every string inside a JSON-like structure (reports, ledger rows)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_obj(k): redact_obj(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_obj(v) for v in value]
    return value


class RedactingStream:
    """A text stream (stdout/stderr) whose every ``write`` passes ``redact`` first.

    The CLI installs it over both standard streams, so nothing it prints (messages, log lines,
    a debug traceback) can carry a secret, whichever code path produced the text.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    @property
    def inner(self) -> Any:
        return self._inner

    def write(self, text: str) -> int:
        if isinstance(text, str):
            self._inner.write(redact(text))
            return len(text)
        return int(self._inner.write(text))  # bytes: the inner text stream raises TypeError

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def install_on_std_streams() -> None:
    """Wrap sys.stdout and sys.stderr in RedactingStream (once)."""
    import sys

    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
