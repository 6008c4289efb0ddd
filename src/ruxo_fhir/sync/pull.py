"""Pull: fetch the cohort (and only the cohort) from a FHIR server, paged or via Bulk Data.

The cohort on a shared server = the MedicationStatements carrying the mapping's case
identifier system, the Patients they point at, and the resources carrying the mapping's
per-resource identifier system. Other people's resources are never pulled into cases.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import orjson

from ruxo_fhir.atomic import atomic_write_bytes
from ruxo_fhir.errors import InputError, UsageError
from ruxo_fhir.fhir_version import to_r4
from ruxo_fhir.mapping.reverse import identifier_value, reference_key, retracted
from ruxo_fhir.mapping.spec import MappingSpec
from ruxo_fhir.resource import Resource
from ruxo_fhir.sync.client import Client as Client  # the one client seam (was defined here)

log = logging.getLogger("ruxo_fhir.sync")

PART_TYPES: tuple[str, ...] = ("Condition", "MedicationStatement", "Observation", "AdverseEvent")
# R4 defines no `identifier` search parameter on AdverseEvent (HAPI refuses it): those are
# fetched by the cohort's subjects and filtered on the identifier here.
BY_SUBJECT_TYPES: tuple[str, ...] = ("AdverseEvent",)
COHORT_TYPES: tuple[str, ...] = ("Patient", *PART_TYPES)


# A FHIR date/dateTime/instant as _lastUpdated takes it: 2024, 2024-05, 2024-05-01, 2024-05-01T10:00:00Z
_FHIR_DATETIME = re.compile(
    r"^\d{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01])(T([01]\d|2[0-3]):[0-5]\d(:([0-5]\d|60)(\.\d{1,9})?)?"
    r"(Z|[+-]((0\d|1[0-3]):[0-5]\d|14:00))?)?)?)?$")


def check_since(value: str | None) -> str | None:
    """A --since value must be a FHIR date or instant; refused (exit 2) before any request."""
    if value is None:
        return None
    text = value.strip()
    if not _FHIR_DATETIME.match(text):
        raise UsageError(f"--since {value!r} is not a FHIR date/time (e.g. 2024-05-01 or 2024-05-01T00:00:00Z)")
    return text


COHORT_READ_PAGE = 500  # _count of internal cohort reads


@dataclass
class PullOptions:
    since: str | None = None
    patient: str | None = None
    page_size: int | None = None
    max_pages: int | None = None  # per search; None = the client's default (a runaway guard)

    def __post_init__(self) -> None:
        self.since = check_since(self.since)


@dataclass
class PullResult:
    counts: dict[str, int] = field(default_factory=dict)
    retracted: int = 0  # entered-in-error resources left out
    started_at: str = ""
    warnings: list[str] = field(default_factory=list)

    def add(self, resource_type: str) -> None:
        self.counts[resource_type] = self.counts.get(resource_type, 0) + 1


def _params(base: dict[str, str], opt: PullOptions) -> dict[str, str]:
    params = dict(base)
    if opt.since:
        params["_lastUpdated"] = f"gt{opt.since}"
    if opt.page_size:
        params["_count"] = str(opt.page_size)
    return params


def _kept(resources: Iterator[Resource], res: PullResult) -> Iterator[Resource]:
    """Leave out entered-in-error (retracted) resources, counting them."""
    for resource in resources:
        if retracted(to_r4(resource)):
            res.retracted += 1
            continue
        yield resource


def pull_cohort(client: Client, mapping: MappingSpec, options: PullOptions | None = None,
                result: PullResult | None = None) -> Iterator[Resource]:
    """Yield the cohort's resources page by page (every `next` link followed).

    Without options (push's removed-case count, outcomes from a server) pages of
    COHORT_READ_PAGE are asked for: server defaults (HAPI: 20) would multiply the requests;
    a server caps `_count` at its own maximum, as the search spec allows.
    Memory: the set of the cohort's patient references, nothing per resource body.
    """
    res = result or PullResult()
    opt = options or PullOptions(page_size=COHORT_READ_PAGE)
    yield from _kept(_pull_cohort(_PageBound(client, opt.max_pages), mapping, opt, res), res)
    if res.retracted:
        res.warnings.append(f"left out {res.retracted} entered-in-error (retracted) resource(s)")


class _PageBound:
    """The client with every search bounded to `max_pages` pages (PullOptions.max_pages)."""

    def __init__(self, client: Client, max_pages: int | None) -> None:
        self.client = client
        self.max_pages = max_pages

    def search(self, resource_type: str, params: dict[str, str]) -> Iterator[dict[str, Any]]:
        return self.client.search(resource_type, params, max_pages=self.max_pages)


def _pull_cohort(client: _PageBound, mapping: MappingSpec, opt: PullOptions, res: PullResult) -> Iterator[Resource]:
    sys = mapping.identifier_systems
    patient_system = mapping.patient_system
    subject: dict[str, str] = {}
    if opt.patient:
        matches = list(client.search("Patient", {"identifier": f"{patient_system}|{opt.patient}"}))
        if not matches:
            res.warnings.append("no Patient with that patient_id on the server")
            return
        subject = {"subject": ",".join(f"Patient/{m['id']}" for m in matches)}
    # 1. the cases: ruxolitinib statements carrying the case identifier system
    log.info("pull: case MedicationStatements%s", f" changed since {opt.since}" if opt.since else "")
    patients: set[str] = set()
    for ms in client.search("MedicationStatement", _params({"identifier": f"{sys.case}|", **subject}, opt)):
        key = reference_key(to_r4(ms).get("subject", {}).get("reference"))
        if key:
            patients.add(key)
        res.add("MedicationStatement")
        yield ms
    # 2. their parts: every other derived resource carries the per-resource system
    for kind in PART_TYPES:
        if kind in BY_SUBJECT_TYPES:
            continue
        log.info("pull: %s resources of the cohort", kind)
        for part in client.search(kind, _params({"identifier": f"{sys.resource}|", **subject}, opt)):
            if kind == "MedicationStatement" and identifier_value(part, sys.case):
                continue  # already yielded as a case statement
            key = reference_key(to_r4(part).get("subject", {}).get("reference"))
            if key:
                patients.add(key)
            res.add(kind)
            yield part
    # 3. AdverseEvents and Patients. Incremental: whatever changed in our systems. Full: those
    #    of the cohort's subjects.
    ids = sorted(k.split("/", 1)[1] for k in patients if k.startswith("Patient/"))
    if opt.patient and not ids:
        ids = [m.split("/", 1)[1] for m in subject.get("subject", "").split(",") if m]
    if opt.since and not opt.patient:
        for kind in BY_SUBJECT_TYPES:
            for part in client.search(kind, _params({}, opt)):
                if identifier_value(part, sys.resource):
                    res.add(kind)
                    yield part
        for patient in client.search("Patient", _params({"identifier": f"{patient_system}|"}, opt)):
            res.add("Patient")
            yield patient
        return
    for kind in BY_SUBJECT_TYPES:
        log.info("pull: %s resources of the cohort's %d subject(s)", kind, len(ids))
        for i in range(0, len(ids), 50):
            refs = ",".join(f"Patient/{x}" for x in ids[i:i + 50])
            for part in client.search(kind, _params({"subject": refs}, opt)):
                if identifier_value(part, sys.resource):
                    res.add(kind)
                    yield part
    log.info("pull: %d Patient(s) referenced by the cohort", len(ids))
    for i in range(0, len(ids), 100):
        part_ids = ids[i:i + 100]
        params = _params({"_id": ",".join(part_ids)}, opt)
        params.setdefault("_count", str(len(part_ids)))
        for patient in client.search("Patient", params):
            if identifier_value(patient, patient_system) is None:
                continue
            res.add("Patient")
            yield patient


def filter_cohort(resources_by_type: Callable[[str], Iterator[Resource]], mapping: MappingSpec,
                  result: PullResult | None = None) -> Iterator[Resource]:
    """Keep only the cohort from a whole-server export (two passes over the Patients)."""
    res = result or PullResult()
    yield from _kept(_filter_cohort(resources_by_type, mapping, res), res)


def _filter_cohort(resources_by_type: Callable[[str], Iterator[Resource]], mapping: MappingSpec,
                   res: PullResult) -> Iterator[Resource]:
    sys = mapping.identifier_systems
    patients: set[str] = set()
    for kind in PART_TYPES:
        for resource in resources_by_type(kind):
            is_case = kind == "MedicationStatement" and identifier_value(resource, sys.case)
            if not is_case and not identifier_value(resource, sys.resource):
                continue
            key = reference_key(to_r4(resource).get("subject", {}).get("reference"))
            if key:
                patients.add(key)
            res.add(kind)
            yield resource
    for patient in resources_by_type("Patient"):
        if f"Patient/{patient.get('id')}" in patients and identifier_value(patient, mapping.patient_system):
            res.add("Patient")
            yield patient


# --- the saved cursor for nightly incremental pulls --------------------------------------

def pull_start_time(client: Client) -> str:
    """The server's clock at the start of a pull (HTTP Date), minus one second of overlap.

    Re-pulling a resource twice is harmless; missing one is not, hence the overlap.
    """
    answer = client.request("GET", "metadata", check=False)
    now = http_date(answer.headers.get("Date")) or datetime.now(timezone.utc)
    return (now - timedelta(seconds=1)).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_cursor(path: Path, server: str | None = None) -> str | None:
    """The saved `since` of a cursor file; with `server`, an error when the file belongs to another."""
    if not path.exists():
        return None
    try:
        data = orjson.loads(path.read_bytes())
        value = data["since"]
        recorded = data.get("server")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, OSError):
        raise InputError("cursor file is not ruxo-fhir cursor JSON ({\"since\": ...})", file=str(path)) from None
    if server is not None and recorded and str(recorded).rstrip("/") != server.rstrip("/"):
        raise InputError(
            f"cursor file belongs to another server ({recorded}, not {server.rstrip('/')}); "
            "use one cursor file per server", file=str(path))
    return str(value) if value else None


def write_cursor(path: Path, server: str, since: str) -> None:
    atomic_write_bytes(path, orjson.dumps({"server": server.rstrip("/"), "since": since},
                                          option=orjson.OPT_INDENT_2) + b"\n")


def http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
