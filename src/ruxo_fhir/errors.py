"""One root exception and a small tree under it, classed by what the caller does next."""
from __future__ import annotations

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


@dataclass(frozen=True)
class OutcomeIssue:
    """One OperationOutcome issue as the server sent it, so callers decide on ``code`` and the
    HTTP status rather than on the wording of ``diagnostics`` (which varies by server)."""

    severity: str = ""
    code: str = ""
    diagnostics: str = ""
    expression: tuple[str, ...] = ()


class ServerError(RuxoError):
    """A FHIR server refused or failed a request.

    ``issues`` are readable summary lines (for messages); ``outcome`` holds the same issues
    structured (severity, code, diagnostics, expression) for decisions.
    """

    exit_code = 4

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        issues: list[str] | None = None,
        case_id: str | None = None,
        url: str | None = None,
        outcome: tuple[OutcomeIssue, ...] = (),
    ) -> None:
        self.reason = reason
        self.status = status
        self.issues = [redact(i) for i in issues or []]
        self.outcome = tuple(
            OutcomeIssue(i.severity, i.code, redact(i.diagnostics), tuple(redact(e) for e in i.expression))
            for i in outcome
        )
        self.case_id = case_id
        self.url = url
        head = f"HTTP {status}: " if status else ""
        tail = f" (case {case_id})" if case_id else ""
        detail = f" — {'; '.join(self.issues)}" if self.issues else ""
        super().__init__(f"{head}{reason}{detail}{tail}")


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
