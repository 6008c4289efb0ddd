"""One root exception and a small tree under it, classed by what the caller does next."""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ruxo_fhir.redact import redact


class RuxoError(Exception):
    """Root of every error ruxo-fhir raises on purpose; the CLI turns it into one line.

    The message passes the redaction step when the error is made, so no secret a server
    echoed back (or a caller quoted) can reach the terminal, a log or a report through it.
    """

    exit_code: int = 1

    def __init__(self, *args: Any) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class UsageError(RuxoError):
    """The command line or a setting is wrong (exit 2): what to change."""

    exit_code = 2


class ConfigError(UsageError):
    """A local setting is unusable (key file unreadable or not a usable key, client id or token
    missing, unknown auth kind): fix the configuration; the server was never asked (exit 2)."""


class WorkerError(RuxoError):
    """A worker process of `import --jobs` died (killed, out of memory): rerun, with fewer jobs;
    nothing was written. Exit 71 (EX_OSERR): the system took the process, which is not a bug of
    ours (70 stays for those)."""

    exit_code = 71


class InputError(RuxoError):
    """An input file (or one row of it) is unusable: names file, row, column and why."""

    exit_code = 3

    def __init__(
        self,
        reason: str,
        *,
        file: str | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        self.reason = reason
        self.file = file
        self.row = row
        self.column = column
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.file:
            where.append(str(self.file))
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column:
            where.append(f"column {self.column}")
        prefix = ", ".join(where)
        return f"{prefix}: {self.reason}" if prefix else self.reason


class MappingError(RuxoError):
    """A mapping file is unusable: names the file, the key and why."""

    exit_code = 3

    def __init__(self, reason: str, *, file: str | None = None, key: str | None = None) -> None:
        self.reason = reason
        self.file = file
        self.key = key
        where = ", ".join(x for x in (file, f"key {key}" if key else None) if x)
        super().__init__(f"{where}: {reason}" if where else reason)


class ValidationError(RuxoError):
    """A FHIR resource does not conform: names the resource, a FHIRPath-like location and why."""

    exit_code = 1

    def __init__(self, reason: str, *, resource: str | None = None, location: str | None = None) -> None:
        self.reason = reason
        self.resource = resource
        self.location = location
        where = " ".join(x for x in (resource, f"at {location}" if location else None) if x)
        super().__init__(f"{where}: {reason}" if where else reason)


_WHITESPACE = re.compile(r"\s+")
MAX_ISSUE_CHARS = 500


def one_line(text: str, limit: int = MAX_ISSUE_CHARS) -> str:
    """Whitespace folded to single spaces, cut to `limit` characters (an ellipsis marks the cut)."""
    text = _WHITESPACE.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class OutcomeIssue:
    """One OperationOutcome issue as the server sent it, so callers decide on ``code`` and the
    HTTP status rather than on the wording of ``diagnostics`` (which varies by server).

    ``str(issue)`` (= ``summary``) is the one readable line messages and reports show.
    """

    severity: str = ""
    code: str = ""
    diagnostics: str = ""
    expression: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        """``severity code: diagnostics (at expression, ...)``; missing parts left out."""
        line = " ".join(x for x in (self.severity, self.code) if x) or "issue"
        if self.diagnostics:
            line += f": {self.diagnostics}"
        if self.expression:
            line += f" (at {', '.join(self.expression)})"
        return one_line(line)

    def __str__(self) -> str:
        return self.summary

    def redacted(self) -> OutcomeIssue:
        """The same issue with secrets and patient data a server may echo back taken out."""
        return OutcomeIssue(redact(self.severity), redact(self.code), redact(self.diagnostics),
                            tuple(redact(e) for e in self.expression))


class ServerError(RuxoError):
    """A FHIR server refused or failed a request.

    ``issues`` are the OperationOutcome's issues, structured (severity, code, diagnostics,
    expression) and redacted: decide on ``status`` and ``issue.code``; render ``summaries``
    (or ``str(issue)``). ``outcome`` is the same tuple under its earlier name.
    """

    exit_code = 4

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        issues: Iterable[OutcomeIssue] = (),
        case_id: str | None = None,
        url: str | None = None,
    ) -> None:
        self.reason = reason
        self.status = status
        self.issues: tuple[OutcomeIssue, ...] = tuple(i.redacted() for i in issues)
        self.case_id = case_id
        self.url = url
        head = f"HTTP {status}: " if status else ""
        tail = f" (case {case_id})" if case_id else ""
        detail = f" — {'; '.join(self.summaries)}" if self.issues else ""
        super().__init__(f"{head}{reason}{detail}{tail}")

    @property
    def summaries(self) -> list[str]:
        """One readable line per issue (``severity code: diagnostics (at expression)``)."""
        return [i.summary for i in self.issues]

    @property
    def outcome(self) -> tuple[OutcomeIssue, ...]:
        """The structured issues (the earlier name of ``issues``)."""
        return self.issues


class TemporaryServerError(ServerError):
    """408, 429, 5xx or a broken connection: worth retrying with backoff."""


class AuthError(ServerError):
    """401 after one re-authentication, or 403: credentials or scopes are wrong."""


class FatalServerError(ServerError):
    """Any other 4xx: retrying the same request cannot help."""


class NotFound(FatalServerError):
    """404 or 410: the resource (or endpoint) is not there, or is gone."""


class CapabilityError(ServerError):
    """The server lacks something needed (FHIR version, interaction, operation)."""

    exit_code = 5
