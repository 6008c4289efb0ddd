"""Retractions: cohort resources on the server that the current source no longer produces.

A row withdrawn from the registry (a patient objects, a case was entered by mistake) must not
linger on the server. Such resources are found as pull finds the cohort (the mapping's
identifier systems) and retracted explicitly (`push --prune`): marked `entered-in-error` where
the resource has that status (Observation.status, MedicationStatement.status,
Condition.verificationStatus), deleted otherwise (AdverseEvent in R4). Patients are never
touched. A guard refuses to retract more than a share of the cohort: a wrong or partial CSV
must not wipe a registry.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ruxo_fhir.errors import ServerError
from ruxo_fhir.mapping.forward import ROLE_RESPONSE
from ruxo_fhir.mapping.reverse import ENTERED_IN_ERROR
from ruxo_fhir.mapping.spec import MappingSpec
from ruxo_fhir.sync.client import Client as Client  # the one client seam (was defined here)
from ruxo_fhir.sync.identity import identity_of
from ruxo_fhir.sync.ledger import Ledger, Written
from ruxo_fhir.sync.pull import BY_SUBJECT_TYPES, PART_TYPES, pull_cohort
from ruxo_fhir.sync.replies import http_reply
from ruxo_fhir.sync.searches import Search, Searcher

log = logging.getLogger("ruxo_fhir.sync")
Resource = dict[str, Any]
DEFAULT_PRUNE_MAX = 20.0  # percent of the cohort
STATUS_TYPES = frozenset({"Observation", "MedicationStatement"})
# Retracted first what nothing else references, so a server checking references never refuses.
ORDER = {"AdverseEvent": 0, "Observation": 1, "MedicationStatement": 2, "Condition": 3}


@dataclass(frozen=True)
class Retractable:
    kind: str
    server_id: str
    version: str | None
    identity: str
    case_id: str | None

    @property
    def how(self) -> str:
        return "delete" if self.kind not in STATUS_TYPES and self.kind != "Condition" else ENTERED_IN_ERROR

    def line(self) -> str:
        where = f"case {self.case_id}, " if self.case_id else ""
        return f"{where}{self.kind}/{self.server_id} ({self.how})"


@dataclass
class PruneResult:
    cohort: int = 0  # cohort resources (not Patients, not already retracted) on the server
    found: list[Retractable] = field(default_factory=list)
    retracted: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * len(self.found) / self.cohort if self.cohort else 0.0


def cohort_counts(client: Client, mapping: MappingSpec, kinds: Iterable[str] = PART_TYPES,
                  searcher: Searcher | None = None, *, whole: bool = False) -> dict[str, int] | None:
    """Per type, how many resources on the server carry the mapping's case or per-resource
    identifier system (entered-in-error ones included): one `_summary=count` search each (all
    in one batch request where the server takes one). Types R4 gives no `identifier` search
    (AdverseEvent; pull finds them by subject) are counted whole: a larger count than ours then
    only means reading the cohort. `whole`: every type counted whole. None when a server
    answers without a `total` or refuses the search."""
    sys = mapping.identifier_systems
    kinds = list(kinds)
    searches: list[Search] = []
    for kind in kinds:
        params = {"_summary": "count"}
        if kind not in BY_SUBJECT_TYPES and not whole:
            params["identifier"] = f"{sys.case}|,{sys.resource}|"
        searches.append((kind, params))
    try:
        answers = (searcher or Searcher(client)).pages(searches, first_only=True)
    except ServerError as exc:
        log.info("push: counting the cohort on the server failed (%s); reading the cohort instead", exc)
        return None
    out: dict[str, int] = {}
    for kind, pages in zip(kinds, answers):
        total = pages[0].get("total") if pages and isinstance(pages[0], dict) else None
        if not isinstance(total, int) or isinstance(total, bool) or total < 0:
            return None
        out[kind] = total
    return out


def find_retractable(client: Client, mapping: MappingSpec, produced: set[str], cases: set[str]) -> PruneResult:
    """The cohort's resources on the server whose identity the source no longer produces.

    `produced`: identity keys of every resource of the source; `cases`: its case ids (a
    case's outcome write-backs go only when the case goes)."""
    out = PruneResult()
    for res in pull_cohort(client, mapping):  # leaves entered-in-error out
        kind = str(res.get("resourceType"))
        if kind == "Patient":
            continue  # never touched
        ident = identity_of(res, mapping)
        if ident is None:
            continue
        out.cohort += 1
        case_id = ident.value if ident.system == mapping.identifier_systems.case else ident.value.rsplit(":", 1)[0]
        role = ident.value.rsplit(":", 1)[1] if ":" in ident.value else ""
        if ident.key in produced or (role.startswith(ROLE_RESPONSE) and case_id in cases):
            continue
        meta = res.get("meta") or {}
        version = meta.get("versionId")
        out.found.append(Retractable(kind, str(res.get("id")), str(version) if version else None, ident.key, case_id))
    out.found.sort(key=lambda r: (ORDER.get(r.kind, 9), r.case_id or "", r.server_id))
    return out


def retracted_copy(resource: Resource) -> Resource:
    """The resource marked entered-in-error (Condition: verificationStatus, and no
    clinicalStatus, which con-5 forbids beside entered-in-error)."""
    out = {k: v for k, v in resource.items() if k != "meta"}
    if out.get("resourceType") == "Condition":
        out.pop("clinicalStatus", None)
        out["verificationStatus"] = {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": ENTERED_IN_ERROR}]}
    else:
        out["status"] = ENTERED_IN_ERROR
    return out


def retract(client: Client, items: Iterable[Retractable], result: PruneResult, ledger: Ledger | None) -> None:
    """Retract each item: PUT its entered-in-error copy with If-Match on the version found,
    or DELETE it. A copy changed since it was found is left alone and reported."""
    for item in items:
        path = f"{item.kind}/{item.server_id}"
        try:
            if item.how == "delete":
                answer = client.request("DELETE", path, check=False)
                if answer.status not in (200, 202, 204, 404, 410):
                    result.errors.append(f"{item.line()}: not retracted (HTTP {answer.status})")
                    continue
                if ledger is not None:
                    ledger.forget_written(client.base_url, [item.identity])
            else:
                current = client.request("GET", path, check=False)
                if current.status != 200:
                    result.errors.append(f"{item.line()}: not retracted (read answered HTTP {current.status})")
                    continue
                headers = {"If-Match": f'W/"{item.version}"'} if item.version else {}
                answer = client.request("PUT", path, json=retracted_copy(current.json()), headers=headers,
                                        check=False)
                if answer.status == 412:
                    result.errors.append(f"{item.line()}: changed on the server since it was read; not retracted")
                    continue
                if answer.status not in (200, 201):
                    result.errors.append(f"{item.line()}: not retracted (HTTP {answer.status})")
                    continue
                if ledger is not None:
                    reply = http_reply(answer.status, answer.headers, answer.json_or_empty())
                    ledger.record_written(client.base_url, [(item.identity, Written(
                        "retracted", item.server_id, reply.version_id, reply.last_updated))])
        except ServerError as exc:
            result.errors.append(f"{item.line()}: not retracted ({exc})")
            continue
        result.retracted += 1
        log.info("push: retracted %s", item.line())
