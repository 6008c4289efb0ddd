"""Bulk Data Access (v2) $export client on FhirClient: kick-off, poll, stream ndjson, clean up."""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import orjson

from ruxo_fhir.errors import CapabilityError, FatalServerError, ServerError, TemporaryServerError
from ruxo_fhir.transport.outcome import TEMPORARY_STATUSES, raise_for_response, redact_url, summarize_outcome
from ruxo_fhir.transport.rest import FHIR_JSON, FHIR_NDJSON, FhirClient, parse_retry_after

logger = logging.getLogger("ruxo_fhir.transport")

DEFAULT_MAX_WAIT_SECONDS = 3600.0
# Kick-off answers that mean "no $export here" rather than "you asked badly".
_UNSUPPORTED_STATUSES = frozenset({404, 405, 501})
# Manifest types become file names: only plain FHIR resource type names are accepted.
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{0,63}\Z")


@dataclass(frozen=True)
class ExportFile:
    """One file of an export manifest (``output``, ``error`` or ``deleted`` entry)."""

    type: str
    url: str
    count: int | None = None


@dataclass(frozen=True)
class ExportManifest:
    """The completed export's manifest (the parts ruxo-fhir uses)."""

    transaction_time: str
    requires_access_token: bool
    output: tuple[ExportFile, ...]
    error: tuple[ExportFile, ...] = ()
    deleted: tuple[ExportFile, ...] = ()


def kick_off_export(
    client: FhirClient,
    types: Sequence[str] | None,
    since: str | None,
    *,
    export_path: str = "$export",
) -> str:
    """Start an export (``GET [base]/$export?_type=…&_since=…``, respond-async); returns the status URL.

    ``export_path`` may be ``Patient/$export`` or ``Group/<id>/$export`` for narrower exports.
    A 404/405/501 answer raises CapabilityError("server does not support $export").
    """
    params: dict[str, str] = {}
    if types:
        params["_type"] = ",".join(types)
    if since:
        params["_since"] = since
    headers = {"Accept": FHIR_JSON, "Prefer": "respond-async"}
    try:
        resp = client.request("GET", export_path, params=params or None, headers=headers)
    except FatalServerError as exc:
        if exc.status in _UNSUPPORTED_STATUSES:
            raise CapabilityError(
                "server does not support $export", status=exc.status, issues=exc.issues, url=exc.url
            ) from exc
        raise
    location = resp.headers.get("Content-Location")
    if resp.status != 202 or not location:
        raise FatalServerError(
            f"$export kick-off answered HTTP {resp.status}"
            + ("" if location else " without Content-Location")
            + "; expected 202 Accepted with a status URL",
            status=resp.status,
            url=redact_url(resp.url),
        )
    return urljoin(resp.url, location)


def wait_for_manifest(
    client: FhirClient,
    status_url: str,
    *,
    poll_sleep: Callable[[float], None] = time.sleep,
    max_wait_seconds: float = DEFAULT_MAX_WAIT_SECONDS,
) -> ExportManifest:
    """Poll the status URL until the manifest (200) arrives.

    Uses the client's RetryPolicy (the one retry policy): 202 answers wait ``Retry-After``
    (seconds or HTTP-date; else the policy's backoff: 1, 2, 4 … ``backoff_cap`` s) and log
    ``X-Progress``. Temporary answers (TEMPORARY_STATUSES) are waited out the same way, but a
    streak of them gives up as a request would: after ``retry.max_attempts`` in a row or once the
    streak's sleeping would pass ``retry.max_total_seconds``. Worst case: the job's total
    sleeping is at most ``max_wait_seconds`` (an export may legitimately run that long), then
    TemporaryServerError. Other errors (the export failed) raise via raise_for_response.
    """
    retry = client.retry
    slept = 0.0
    polls = 0
    errors_in_a_row = 0
    slept_on_errors = 0.0
    target = redact_url(status_url)
    while True:
        resp = client.request("GET", status_url, check=False, headers={"Accept": FHIR_JSON})
        polls += 1
        if resp.status == 200:
            return parse_manifest(resp.json(), resp.url)
        if resp.status == 202:
            errors_in_a_row = 0
            slept_on_errors = 0.0
            progress = resp.headers.get("X-Progress")
            logger.info("bulk export in progress%s", f": {progress[:100]}" if progress else "")
        elif resp.status in TEMPORARY_STATUSES:
            errors_in_a_row += 1
            told = parse_retry_after(resp.headers.get("Retry-After"), retry.wall_clock())
            if retry.next_delay(errors_in_a_row, slept_on_errors, told) is None:
                raise_for_response(resp.status, resp.headers, resp.body, resp.url)
            logger.warning("bulk export status %s -> %d; polling again", target, resp.status)
        else:
            raise_for_response(resp.status, resp.headers, resp.body, resp.url)
            raise FatalServerError(
                f"bulk export status answered HTTP {resp.status}; expected 202 or 200", status=resp.status, url=target
            )
        wait = parse_retry_after(resp.headers.get("Retry-After"), retry.wall_clock())
        delay = wait if wait is not None else retry.backoff(polls)
        left = max_wait_seconds - slept
        if left <= 0:
            raise TemporaryServerError(f"bulk export not finished after waiting {slept:.0f} s", url=target)
        delay = min(delay, left)
        poll_sleep(delay)
        slept += delay
        if errors_in_a_row:
            slept_on_errors += delay


def parse_manifest(doc: Any, url: str = "") -> ExportManifest:
    """The ExportManifest of a completion response body; FatalServerError when malformed."""
    if not isinstance(doc, dict) or not isinstance(doc.get("output"), list):
        raise FatalServerError("bulk export manifest has no output list", url=redact_url(url))
    return ExportManifest(
        transaction_time=str(doc.get("transactionTime") or ""),
        requires_access_token=doc.get("requiresAccessToken") is True,
        output=_files(doc.get("output"), url),
        error=_files(doc.get("error"), url),
        deleted=_files(doc.get("deleted"), url),
    )


def _files(items: Any, url: str) -> tuple[ExportFile, ...]:
    files = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            raise FatalServerError("bulk export manifest entry has no url", url=redact_url(url))
        kind = item.get("type")
        if not isinstance(kind, str) or not _RESOURCE_TYPE.match(kind):
            raise FatalServerError(f"bulk export manifest names an invalid resource type {str(kind)[:40]!r}", url=redact_url(url))
        count = item.get("count")
        files.append(ExportFile(type=kind, url=urljoin(url, item["url"]), count=count if isinstance(count, int) else None))
    return tuple(files)


def delete_export(client: FhirClient, status_url: str) -> None:
    """Ask the server to delete (or cancel) the export job; failures are logged and ignored."""
    try:
        client.request("DELETE", status_url, check=False)
    except ServerError as exc:
        logger.info("could not delete bulk export job %s: %s", redact_url(status_url), type(exc).__name__)


def iter_file_lines(client: FhirClient, manifest: ExportManifest, item: ExportFile) -> Iterator[bytes]:
    """Stream one manifest file as ndjson lines.

    With ``requiresAccessToken`` the client's credentials are sent, and only to the FHIR
    server's own origin (another host is refused: FatalServerError). Without it no
    credentials are sent, and the file may live elsewhere (e.g. pre-signed cloud storage).
    """
    scheme = urlsplit(item.url).scheme.lower()
    if scheme not in ("http", "https"):
        raise FatalServerError(f"bulk export file URL has unsupported scheme {scheme!r}", url=redact_url(item.url))
    if manifest.requires_access_token and not client.is_same_origin(item.url):
        raise FatalServerError(
            f"bulk export file on {urlsplit(item.url).hostname} requires our access token, "
            "but that is not the FHIR server's host; refusing to send it",
            url=redact_url(item.url),
        )
    return client.iter_lines(item.url, authenticate=manifest.requires_access_token, headers={"Accept": FHIR_NDJSON})


@contextmanager
def export_job(
    client: FhirClient,
    types: Sequence[str] | None,
    since: str | None,
    *,
    poll_sleep: Callable[[float], None] = time.sleep,
    max_wait_seconds: float = DEFAULT_MAX_WAIT_SECONDS,
    export_path: str = "$export",
) -> Iterator[ExportManifest]:
    """Kick off, wait for the manifest, yield it, and delete the job on the way out (always)."""
    status_url = kick_off_export(client, types, since, export_path=export_path)
    try:
        yield wait_for_manifest(client, status_url, poll_sleep=poll_sleep, max_wait_seconds=max_wait_seconds)
    finally:
        delete_export(client, status_url)


def _log_errors(client: FhirClient, manifest: ExportManifest) -> None:
    for item in manifest.error:
        for line in iter_file_lines(client, manifest, item):
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            for issue in summarize_outcome(doc) if isinstance(doc, dict) else []:
                logger.warning("bulk export error: %s", issue)
    if manifest.deleted:
        logger.warning("bulk export lists %d deleted-resource file(s); not processed", len(manifest.deleted))


def bulk_export(
    client: FhirClient,
    types: Sequence[str] | None,
    since: str | None,
    *,
    poll_sleep: Callable[[float], None] = time.sleep,
    max_wait_seconds: float = DEFAULT_MAX_WAIT_SECONDS,
    export_path: str = "$export",
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Run a whole export and yield ``(resource type, resource)`` pairs, streaming line by line.

    Error files (OperationOutcome) are logged as warnings once the output is read. The job is
    deleted when the iteration ends, fails or is closed early.
    """
    with export_job(
        client, types, since, poll_sleep=poll_sleep, max_wait_seconds=max_wait_seconds, export_path=export_path
    ) as manifest:
        for item in manifest.output:
            for number, line in enumerate(iter_file_lines(client, manifest, item), start=1):
                yield item.type, _parse_line(line, item, number)
        _log_errors(client, manifest)


def _parse_line(line: bytes, item: ExportFile, number: int) -> dict[str, Any]:
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise FatalServerError(f"bulk export {item.type} file: line {number} is not JSON", url=redact_url(item.url)) from exc
    if not isinstance(doc, dict):
        raise FatalServerError(f"bulk export {item.type} file: line {number} is not a resource", url=redact_url(item.url))
    return doc


def bulk_export_to_dir(
    client: FhirClient,
    types: Sequence[str] | None,
    since: str | None,
    directory: str | Path,
    *,
    poll_sleep: Callable[[float], None] = time.sleep,
    max_wait_seconds: float = DEFAULT_MAX_WAIT_SECONDS,
    export_path: str = "$export",
) -> dict[str, int]:
    """Run a whole export into ``directory/<Type>.ndjson``; returns lines written per type.

    Several files of one type are appended into one file; a ``<Type>.ndjson`` left from an
    earlier run is replaced. Error files go to ``error/OperationOutcome.ndjson`` and deleted
    lists to ``deleted/Bundle.ndjson``. Lines are streamed to disk, never held in memory.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    started: set[Path] = set()
    with export_job(
        client, types, since, poll_sleep=poll_sleep, max_wait_seconds=max_wait_seconds, export_path=export_path
    ) as manifest:
        for folder, items in (("", manifest.output), ("error", manifest.error), ("deleted", manifest.deleted)):
            for item in items:
                path = root / folder / f"{item.type}.ndjson"
                written = _write_lines(iter_file_lines(client, manifest, item), path, append=path in started)
                started.add(path)
                if not folder:
                    counts[item.type] = counts.get(item.type, 0) + written
        for item in manifest.error:
            logger.warning("bulk export reported errors: see %s", root / "error" / f"{item.type}.ndjson")
    return counts


def _write_lines(lines: Iterator[bytes], path: Path, *, append: bool) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with path.open("ab" if append else "wb") as out:
        for line in lines:
            out.write(line)
            out.write(b"\n")
            written += 1
    return written


__all__ = [
    "DEFAULT_MAX_WAIT_SECONDS",
    "ExportFile",
    "ExportManifest",
    "bulk_export",
    "bulk_export_to_dir",
    "delete_export",
    "export_job",
    "iter_file_lines",
    "kick_off_export",
    "parse_manifest",
    "wait_for_manifest",
]
