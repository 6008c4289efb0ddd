"""Server answers into readable lines and exceptions: the ONE place mapping HTTP status → error."""
from __future__ import annotations

import http
import json
from collections.abc import Mapping
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlsplit

from ruxo_fhir.errors import AuthError, FatalServerError, NotFound, OutcomeIssue, ServerError, TemporaryServerError
from ruxo_fhir.errors import one_line as _one_line

# Statuses worth retrying with backoff. 408/429/502/503/504 are transient by definition. 500 is
# included on field evidence (cumulus-fhir-support retries it for the same reason): some EHRs
# answer 500 for transient failures (overload, lock or upstream timeouts) that succeed on the
# next try. Retries are bounded (RetryPolicy), so a genuine server bug costs only a few seconds.
# 501 (Not Implemented) and the rarer 5xx are NOT here: asking again cannot help.
TEMPORARY_STATUSES: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504})
AUTH_STATUSES: frozenset[int] = frozenset({401, 403})
NOT_FOUND_STATUSES: frozenset[int] = frozenset({404, 410})

_MAX_OUTCOME_BYTES = 2_000_000


def summarize_outcome(oo: Mapping[str, Any]) -> list[str]:
    """One readable line per OperationOutcome issue: ``severity code: diagnostics (at expression)``.

    Missing fields are skipped; ``details.text`` (then a coding's display/code) stands in for
    ``diagnostics``, and the deprecated ``location`` for ``expression``. Anything that is not an
    OperationOutcome-shaped mapping gives no lines.
    """
    return [issue.summary for issue in structured_issues(oo)]


def structured_issues(oo: Mapping[str, Any]) -> tuple[OutcomeIssue, ...]:
    """The OperationOutcome's issues as OutcomeIssue values (fallbacks: see summarize_outcome)."""
    issues = oo.get("issue") if isinstance(oo, Mapping) else None
    if not isinstance(issues, list):
        return ()
    return tuple(_structured(issue) for issue in issues if isinstance(issue, Mapping))


def _structured(issue: Mapping[str, Any]) -> OutcomeIssue:
    where: tuple[str, ...] = ()
    for key in ("expression", "location"):
        values = issue.get(key)
        if isinstance(values, list):
            where = tuple(_one_line(v) for v in values if isinstance(v, str))
            if where:
                break
    return OutcomeIssue(
        severity=_text(issue.get("severity")),
        code=_text(issue.get("code")),
        diagnostics=_one_line(_issue_text(issue)),
        expression=where,
    )


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def _issue_text(issue: Mapping[str, Any]) -> str:
    diagnostics = issue.get("diagnostics")
    if isinstance(diagnostics, str) and diagnostics.strip():
        return diagnostics
    details = issue.get("details")
    if not isinstance(details, Mapping):
        return ""
    if isinstance(details.get("text"), str) and details["text"].strip():
        return str(details["text"])
    for coding in details.get("coding") or []:
        if isinstance(coding, Mapping):
            for key in ("display", "code"):
                if isinstance(coding.get(key), str):
                    return str(coding[key])
    return ""


def redact_url(url: str) -> str:
    """The URL without user info and query VALUES (which may be PHI): ``https://h/fhir/Patient?identifier&_count``."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    names = [name for name, _ in parse_qsl(parts.query, keep_blank_values=True)]
    query = f"?{'&'.join(names)}" if names else ""
    origin = f"{parts.scheme}://{host}{port}" if parts.scheme else ""
    return f"{origin}{parts.path}{query}"


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header value looked up case-insensitively, whatever mapping holds the headers."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lowered:
            return candidate
    return None


def outcome_issues(headers: Mapping[str, str], body: bytes) -> list[str]:
    """Summary lines of an OperationOutcome body; [] for anything else (never other body content)."""
    doc = _outcome_doc(body)
    return summarize_outcome(doc) if doc is not None else []


def _outcome_doc(body: bytes) -> dict[str, Any] | None:
    if not body or len(body) > _MAX_OUTCOME_BYTES or not body.lstrip().startswith(b"{"):
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("resourceType") != "OperationOutcome":
        return None
    return doc


def _reason(status: int, headers: Mapping[str, str], url: str) -> str:
    if status == 401:
        text = "not authenticated (credentials missing, expired or rejected)"
    elif status == 403:
        text = "forbidden (the credentials lack a needed scope or permission)"
    else:
        try:
            text = http.HTTPStatus(status).phrase
        except ValueError:
            text = "HTTP error"
    retry_after = header(headers, "Retry-After")
    if status in TEMPORARY_STATUSES and retry_after:
        text += f" (Retry-After: {_one_line(retry_after)[:40]})"
    return f"{text} from {redact_url(url)}"


def error_class(status: int) -> type[ServerError]:
    """Which exception an error status means for the caller (see TEMPORARY_STATUSES for why)."""
    if status in TEMPORARY_STATUSES:
        return TemporaryServerError
    if status in AUTH_STATUSES:
        return AuthError
    if status in NOT_FOUND_STATUSES:
        return NotFound
    # every other 4xx, plus 501 and unusual 5xx: the same request will fail again.
    return FatalServerError


def raise_for_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    url: str,
    case_id: str | None = None,
) -> None:
    """Raise the matching ServerError for an error status (>= 400); return quietly otherwise.

    408/429/500/502/503/504 → TemporaryServerError, 401/403 → AuthError, 404/410 → NotFound,
    any other 4xx/5xx → FatalServerError. When the body is an OperationOutcome, ``issues`` holds
    its issues structured (``summaries`` their lines); the message never carries other body
    content, request bodies, tokens or query values.
    """
    if status < 400:
        return
    _raise(status, headers, body, url, case_id)


def _raise(status: int, headers: Mapping[str, str], body: bytes, url: str, case_id: str | None) -> NoReturn:
    cls = error_class(status)
    doc = _outcome_doc(body)
    raise cls(
        _reason(status, headers, url),
        status=status,
        issues=structured_issues(doc) if doc is not None else (),
        case_id=case_id,
        url=redact_url(url),
    )
