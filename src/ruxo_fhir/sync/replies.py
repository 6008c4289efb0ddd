"""What a server says about a write: the version it made, when, and whether it created.

Servers say it differently, and a client must take whichever it is given (FHIR http.html,
Bundle.entry.response): HAPI answers `201 Created`, `location: Type/id/_history/1`,
`etag: W/"1"` and `lastModified`, without the resource; Medplum answers `200` even for a PUT
that created, `location: Type/id` without `_history`, no `etag`, and the new `meta.versionId`
only inside `entry.resource`. Nothing here assumes one engine: what is missing stays None
and the caller reads the resource back (one batched read) instead of guessing.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

# HAPI's storage outcome codes (hapi-fhir-storage-response-code): the server's own word on
# what a write did, also when the HTTP status does not tell (a 200 that created).
_CREATED_CODES = frozenset({"SUCCESSFUL_CREATE", "SUCCESSFUL_CREATE_NO_CONDITIONAL_MATCH",
                            "SUCCESSFUL_UPDATE_AS_CREATE", "SUCCESSFUL_UPDATE_NO_CONDITIONAL_MATCH"})
# The write changed nothing: an identical update, or a conditional create that found its match.
_NO_CHANGE_CODES = frozenset({"SUCCESSFUL_UPDATE_NO_CHANGE", "SUCCESSFUL_CREATE_WITH_CONDITIONAL_MATCH"})


@dataclass(frozen=True)
class WriteReply:
    """One write as the server reported it. `outcome`: created | updated | unchanged."""

    status: int
    outcome: str
    resource_type: str | None
    server_id: str | None
    version_id: str | None
    last_updated: str | None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def versioned(self) -> bool:
        """Both parts a later skip needs (versionId and lastUpdated) are known."""
        return bool(self.version_id and self.last_updated)


def status_code(status: object) -> int:
    """`"201 Created"`, `"201"` or 201 -> 201; anything else -> 0."""
    try:
        return int(str(status).split()[0])
    except (ValueError, IndexError):
        return 0


def etag_version(etag: object) -> str | None:
    """`W/"3"`, `"3"` or `3` -> `"3"` (HAPI's bundle etags are sometimes bare)."""
    if not isinstance(etag, str) or not etag.strip():
        return None
    value = etag.strip().removeprefix("W/").strip('"').strip()
    return value or None


def location_parts(location: object) -> tuple[str | None, str | None, str | None]:
    """(type, id, version) from `[base/]Type/id[/_history/vid]`; Nones for what is absent."""
    if not isinstance(location, str) or not location.strip():
        return None, None, None
    path = location.strip().split("?", 1)[0].rstrip("/")
    version = None
    if "/_history/" in path:
        path, version = path.rsplit("/_history/", 1)
        version = version.strip("/") or None
    parts = path.split("/")
    if len(parts) < 2:
        return None, None, version
    return parts[-2] or None, parts[-1] or None, version


def _said_created(outcome: Any) -> bool | None:
    """True/False when an OperationOutcome says created / not created; None when silent."""
    if not isinstance(outcome, Mapping):
        return None
    if outcome.get("id") == "created":  # Medplum's `created` outcome constant
        return True
    for issue in outcome.get("issue") or []:
        details = issue.get("details") if isinstance(issue, Mapping) else None
        for coding in (details or {}).get("coding") or []:
            code = coding.get("code") if isinstance(coding, Mapping) else None
            if code in _CREATED_CODES:
                return True
            if isinstance(code, str) and code.startswith("SUCCESSFUL_"):
                return False
    return None


def _no_change(outcome: Any) -> bool:
    if not isinstance(outcome, Mapping):
        return False
    for issue in outcome.get("issue") or []:
        details = issue.get("details") if isinstance(issue, Mapping) else None
        for coding in (details or {}).get("coding") or []:
            if isinstance(coding, Mapping) and coding.get("code") in _NO_CHANGE_CODES:
                return True
    return False


def _outcome(status: int, outcome: Any) -> str:
    if _no_change(outcome):
        return "unchanged"
    said = _said_created(outcome)
    if said is not None:
        return "created" if said else "updated"
    return "created" if status == 201 else "updated"


def entry_reply(entry: Mapping[str, Any]) -> WriteReply:
    """A batch/transaction-response entry: `response` (status, location, etag, lastModified,
    outcome) and, when the server includes it, `resource`."""
    raw_response, raw_resource = entry.get("response"), entry.get("resource")
    response: Mapping[str, Any] = raw_response if isinstance(raw_response, Mapping) else {}
    resource: Mapping[str, Any] | None = raw_resource if isinstance(raw_resource, Mapping) else None
    status = status_code(response.get("status"))
    rtype, rid, loc_version = location_parts(response.get("location"))
    raw_meta = resource.get("meta") if resource is not None else None
    meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, Mapping) else {}
    version = etag_version(response.get("etag")) or loc_version or _str(meta.get("versionId"))
    last_updated = _str(response.get("lastModified")) or _str(meta.get("lastUpdated"))
    if resource is not None:
        rtype = rtype or _str(resource.get("resourceType"))
        rid = rid or _str(resource.get("id"))
    return WriteReply(status, _outcome(status, response.get("outcome")), rtype, rid, version, last_updated)


def http_reply(status: int, headers: Mapping[str, str], body: Mapping[str, Any] | None) -> WriteReply:
    """A single PUT/POST answer: ETag, Location, Last-Modified headers and the body (resource or
    OperationOutcome, or nothing under `Prefer: return=minimal`)."""
    resource = body if isinstance(body, Mapping) and body.get("resourceType") not in (None, "OperationOutcome") else None
    outcome = body if isinstance(body, Mapping) and body.get("resourceType") == "OperationOutcome" else None
    entry: dict[str, Any] = {"response": {"status": str(status), "location": headers.get("Location")
                                          or headers.get("Content-Location"), "etag": headers.get("ETag"),
                                          "outcome": outcome}}
    if resource is not None:
        entry["resource"] = resource
    reply = entry_reply(entry)
    if reply.last_updated is None and headers.get("Last-Modified"):
        # An HTTP date has whole seconds only; same_instant() compares at that precision.
        when = _http_date(headers["Last-Modified"])
        if when is not None:
            reply = WriteReply(reply.status, reply.outcome, reply.resource_type, reply.server_id,
                               reply.version_id, when.strftime("%Y-%m-%dT%H:%M:%SZ"))
    return reply


def parse_instant(value: str | None) -> datetime | None:
    """A FHIR instant (or dateTime with a time zone) as an aware datetime; None if not one."""
    if not value:
        return None
    text = value.strip().replace("Z", "+00:00")
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def same_instant(a: str | None, b: str | None) -> bool:
    """Whether two lastUpdated values name the same instant (different renderings of one
    instant are equal; when one has whole seconds only, seconds are compared)."""
    if not a or not b:
        return False
    if a == b:
        return True
    ta, tb = parse_instant(a), parse_instant(b)
    if ta is None or tb is None:
        return False
    if "." not in a or "." not in b:
        return ta.replace(microsecond=0) == tb.replace(microsecond=0)
    return ta == tb


def _http_date(value: str) -> datetime | None:
    try:
        return parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
