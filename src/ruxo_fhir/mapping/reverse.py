"""FHIR resources -> case records: groups a stream of resources by case and reads them back.

Cases are found by identifiers, not by bundle position: the ruxolitinib MedicationStatement
carries the case system (value = case_id), every other derived resource carries the
resource system (value = "<case_id>:<role>"). Anything else (another team's Patients or
Observations on a shared server) is counted as skipped, never turned into a row.
"""
from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal
from typing import Any

import orjson

from ruxo_fhir.fhir_version import to_r4
from ruxo_fhir.mapping.forward import (
    ROLE_ADVERSE,
    ROLE_CONDITION,
    ROLE_IMPROVEMENT,
    ROLE_PRIOR,
    ROLE_RECURRENCE,
    ROLE_SCORE_BASELINE,
    ROLE_SCORE_FOLLOWUP,
)
from ruxo_fhir.mapping.spec import LabelSpec, MappingSpec
from ruxo_fhir.model import CaseRecord
from ruxo_fhir.resource import Resource
from ruxo_fhir.shapes import shape_guard


def reference_key(reference: str | None) -> str | None:
    """`Type/id` from a relative or absolute literal reference (history suffix dropped)."""
    if not reference:
        return None
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else None


def identifiers(resource: Resource) -> list[dict[str, Any]]:
    ident = resource.get("identifier")
    if isinstance(ident, dict):
        return [ident]
    return [i for i in ident or [] if isinstance(i, dict)]


def identifier_value(resource: Resource, system: str) -> str | None:
    for ident in identifiers(resource):
        if ident.get("system") == system and ident.get("value"):
            return str(ident["value"])
    return None


ENTERED_IN_ERROR = "entered-in-error"


def retracted(resource: Resource) -> bool:
    """True for a resource marked `entered-in-error` (retracted: readers leave it out).

    Observation.status, MedicationStatement.status and Condition.verificationStatus carry it
    in R4 (and R5); other types are deleted when retracted, so they never show it.
    """
    if resource.get("status") == ENTERED_IN_ERROR:
        return True
    verification = resource.get("verificationStatus")
    if isinstance(verification, dict):
        return any(isinstance(c, dict) and c.get("code") == ENTERED_IN_ERROR
                   for c in verification.get("coding", []))
    return False


def conditional_identifier(reference: str | None) -> tuple[str, str, str] | None:
    """(Type, system, value) of a conditional reference `Type?identifier=system|value`."""
    if not reference or "?identifier=" not in reference:
        return None
    kind, _, token = reference.partition("?identifier=")
    system, bar, value = token.rpartition("|")
    if not bar or not value or "/" in kind or "&" in token:
        return None
    return kind, system, value


def json_decimal(value: Any) -> Decimal | None:
    """A JSON number as an exact Decimal (via its shortest text), None for absent/booleans."""
    if value is None or isinstance(value, bool):
        return None
    return Decimal(str(value))


def day(value: Any) -> str | None:
    """The YYYY-MM-DD part of a FHIR date/dateTime (shorter partial dates pass through)."""
    return str(value)[:10] if value else None


class LabelReader:
    """Reads a mapping label back from a CodeableConcept: the project coding, else a known
    standard code (indications), else the text."""

    def __init__(self, mapping: MappingSpec) -> None:
        self.m = mapping
        self._code_to_label = self._index_codes(mapping.indications)

    def _index_codes(self, table: dict[str, LabelSpec]) -> dict[tuple[str, str], str]:
        out: dict[tuple[str, str], str] = {}
        for label, spec in table.items():
            for code in spec.codes:
                out.setdefault((self.m.system_uri(code.system), code.code), label)
        return out

    def label(self, concept: dict[str, Any] | None, project: str, table: dict[str, LabelSpec]) -> str:
        concept = concept or {}
        codings = [c for c in concept.get("coding", []) if isinstance(c, dict)]
        project_uri = self.m.project_systems[project]
        for c in codings:
            if c.get("system") == project_uri and c.get("code"):
                return str(c["code"])
        if table is self.m.indications:
            for c in codings:
                label = self._code_to_label.get((str(c.get("system")), str(c.get("code"))))
                if label:
                    return label
        if concept.get("text"):
            return str(concept["text"])
        return str(codings[0].get("code", "")) if codings else ""


class CaseAssembler:
    """Collects resources (any order, any source) and yields one CaseRecord per case.

    Resources wait in a temporary sqlite file keyed by case, not in Python objects, so a
    million-case export needs flat memory; cases come out in the order their
    MedicationStatements arrived. Use as a context manager (or call `close()`).
    """

    def __init__(self, mapping: MappingSpec) -> None:
        self.m = mapping
        self.skipped = 0
        self.retracted = 0  # entered-in-error resources left out
        self.warnings: list[str] = []
        # names the wrong-typed field of a case that cannot be read (set by the export stage to
        # validate.shape_reason); None: such an error is raised, not excused
        self.explain: Callable[[list[Any]], str | None] | None = None
        self.labels = LabelReader(mapping)
        self._dir = tempfile.TemporaryDirectory(prefix="ruxo-export-")
        self._db = sqlite3.connect(os.path.join(self._dir.name, "cases.sqlite3"))
        self._db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
            "CREATE TABLE stmt (seq INTEGER PRIMARY KEY, case_id TEXT UNIQUE NOT NULL, body BLOB);"
            "CREATE TABLE part (case_id TEXT NOT NULL, role TEXT NOT NULL, body BLOB,"
            " PRIMARY KEY (case_id, role));"
            "CREATE TABLE patient (key TEXT PRIMARY KEY, body BLOB);"
        )

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()

    def __enter__(self) -> CaseAssembler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, resource: Resource) -> None:
        res = to_r4(resource)
        kind = res.get("resourceType")
        sys = self.m.identifier_systems
        if retracted(res):
            self.retracted += 1
            return
        patient_value = identifier_value(res, self.m.patient_system) if kind == "Patient" else None
        if patient_value is not None:
            body = orjson.dumps(res)
            # by id (literal references) and by identifier (link mode's conditional references)
            self._db.executemany("INSERT OR REPLACE INTO patient VALUES (?, ?)", [
                (f"Patient/{res.get('id')}", body),
                (f"Patient?identifier={self.m.patient_system}|{patient_value}", body)])
            return
        if kind == "MedicationStatement":
            case_id = identifier_value(res, sys.case)
            if case_id is not None:
                self._db.execute("INSERT INTO stmt (case_id, body) VALUES (?, ?) "
                                 "ON CONFLICT(case_id) DO UPDATE SET body = excluded.body",
                                 (case_id, orjson.dumps(res)))
                return
        part = identifier_value(res, sys.resource)
        if part and ":" in part:
            case_id, role = part.rsplit(":", 1)
            self._db.execute("INSERT OR REPLACE INTO part VALUES (?, ?, ?)", (case_id, role, orjson.dumps(res)))
            return
        self.skipped += 1

    def add_all(self, resources: Iterable[Resource]) -> CaseAssembler:
        for res in resources:
            self.add(res)
        return self

    def records(self) -> Iterator[CaseRecord]:
        db = self._db
        (orphans,) = db.execute(
            "SELECT count(*) FROM part WHERE case_id NOT IN (SELECT case_id FROM stmt)").fetchone()
        for case_id, body in self._statements():
            parts = {role: orjson.loads(b) for role, b in
                     db.execute("SELECT role, body FROM part WHERE case_id = ?", (case_id,))}
            statement = orjson.loads(body)
            record = None
            with shape_guard([statement, *parts.values()], self.warnings, f"case {case_id} left out",
                             self.explain):
                record = self._record(case_id, statement, parts)
            if record is not None:
                yield record
        if orphans:
            self.warnings.append(
                f"skipped {orphans} resource(s) whose case has no MedicationStatement "
                f"({self.m.medication.text}) carrying the case identifier"
            )
        if self.retracted:
            self.warnings.append(f"left out {self.retracted} entered-in-error (retracted) resource(s)")
        if self.skipped:
            self.warnings.append(
                f"skipped {self.skipped} resource(s) that are not part of a case "
                "(e.g. other people's resources on a shared server)"
            )

    def _statements(self) -> Iterator[tuple[str, bytes]]:
        """Statements in arrival order, fetched in pages (a cursor that stays small)."""
        last = 0
        while True:
            rows = self._db.execute("SELECT seq, case_id, body FROM stmt WHERE seq > ? ORDER BY seq LIMIT 500",
                                    (last,)).fetchall()
            if not rows:
                return
            for seq, case_id, body in rows:
                last = seq
                yield case_id, body

    def _patient(self, reference: str | None) -> Resource | None:
        linked = conditional_identifier(reference)
        key = reference if linked else reference_key(reference)
        row = self._db.execute("SELECT body FROM patient WHERE key = ?", (key or "",)).fetchone()
        if row:
            return dict(orjson.loads(row[0]))
        if linked and linked[0] == "Patient" and linked[1] == self.m.patient_system:
            # link mode, read from a file import wrote: the EHR's Patient is not in it, its
            # identifier is all we know (sex reads back as unknown)
            return {"resourceType": "Patient", "identifier": [{"system": linked[1], "value": linked[2]}]}
        return None

    # -- reading one case ----------------------------------------------------------------
    def _frequency(self, statement: Resource) -> str:
        for dosage in statement.get("dosage", []):
            timing = dosage.get("timing", {})
            for c in timing.get("code", {}).get("coding", []):
                if c.get("code") in self.m.medication.frequencies:
                    return str(c["code"])
            rep = timing.get("repeat", {})
            for name, spec in self.m.medication.frequencies.items():
                if (rep.get("frequency"), rep.get("period"), rep.get("periodUnit")) == (
                    spec.frequency, spec.period, spec.period_unit,
                ):
                    return name
        return ""

    def _indexed(self, parts: dict[str, Resource], prefix: str) -> list[Resource]:
        found = [(int(role[len(prefix):]), res) for role, res in parts.items()
                 if role.startswith(prefix) and role[len(prefix):].isdigit()]
        return [res for _, res in sorted(found, key=lambda x: x[0])]

    def _record(self, case_id: str, statement: Resource, parts: dict[str, Resource]) -> CaseRecord | None:
        patient = self._patient(statement.get("subject", {}).get("reference"))
        if patient is None:
            self.warnings.append(f"case {case_id}: its Patient is missing; case skipped")
            return None
        condition = parts.get(ROLE_CONDITION, {})
        improvement = parts.get(ROLE_IMPROVEMENT, {})
        baseline = parts.get(ROLE_SCORE_BASELINE, {})
        followup = parts.get(ROLE_SCORE_FOLLOWUP, {})
        recurrence = parts.get(ROLE_RECURRENCE, {})
        score = baseline or followup
        site = (condition.get("bodySite") or [{}])[0].get("text")
        return CaseRecord(
            case_id=case_id,
            patient_id=identifier_value(patient, self.m.patient_system) or "",
            sex=self.m.sex_from_gender(str(patient.get("gender", "unknown"))),
            birth_date=patient.get("birthDate"),
            indication=self.labels.label(condition.get("code"), "indication", self.m.indications),
            site=site,
            disease_onset=condition.get("onsetDateTime"),
            prior_treatments=tuple(
                self.labels.label(r.get("medicationCodeableConcept"), "prior_treatment", self.m.prior_treatments)
                for r in self._indexed(parts, ROLE_PRIOR)
            ),
            treatment_start=day(statement.get("effectivePeriod", {}).get("start")
                                  or statement.get("effectiveDateTime")) or "",
            frequency=self._frequency(statement),
            evaluation_date=day(improvement.get("effectiveDateTime") or followup.get("effectiveDateTime")),
            improvement_pct=json_decimal(improvement.get("valueQuantity", {}).get("value")),
            score_name=(score.get("code", {}).get("text") if score else None),
            baseline_score=json_decimal(baseline.get("valueQuantity", {}).get("value")),
            followup_score=json_decimal(followup.get("valueQuantity", {}).get("value")),
            adverse_events=tuple(
                self.labels.label(r.get("event"), "adverse_event", self.m.adverse_events)
                for r in self._indexed(parts, ROLE_ADVERSE)
            ),
            recurrence_after_stop=recurrence.get("valueBoolean") if recurrence else None,
        )
