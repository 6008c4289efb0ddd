"""FHIR resources -> case records: groups a stream of resources by case and reads them back.

Cases are found by identifiers, not by bundle position: the ruxolitinib MedicationStatement
carries the case system (value = case_id), every other derived resource carries the
resource system (value = "<case_id>:<role>"). Anything else (another team's Patients or
Observations on a shared server) is counted as skipped, never turned into a row.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

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
from ruxo_fhir.records import CaseRecord

Resource = dict[str, Any]


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


def json_decimal(value: Any) -> Decimal | None:
    """A JSON number as an exact Decimal (via its shortest text), None for absent/booleans."""
    if value is None or isinstance(value, bool):
        return None
    return Decimal(str(value))


def day(value: Any) -> str | None:
    """The YYYY-MM-DD part of a FHIR date/dateTime (shorter partial dates pass through)."""
    return str(value)[:10] if value else None


@dataclass
class CaseParts:
    statement: Resource | None = None
    parts: dict[str, Resource] = field(default_factory=dict)


class CaseAssembler:
    """Collects resources (any order, any source) and yields one CaseRecord per case."""

    def __init__(self, mapping: MappingSpec) -> None:
        self.m = mapping
        self.cases: dict[str, CaseParts] = {}
        self._order: list[str] = []  # cases in the order their MedicationStatements arrived
        self.patients: dict[str, Resource] = {}
        self.skipped = 0
        self.warnings: list[str] = []
        self._code_to_label = self._index_codes(mapping.indications)

    def _index_codes(self, table: dict[str, LabelSpec]) -> dict[tuple[str, str], str]:
        out: dict[tuple[str, str], str] = {}
        for label, spec in table.items():
            for code in spec.codes:
                out.setdefault((self.m.system_uri(code.system), code.code), label)
        return out

    def add(self, resource: Resource) -> None:
        res = to_r4(resource)
        kind = res.get("resourceType")
        sys = self.m.identifier_systems
        if kind == "Patient" and identifier_value(res, sys.patient) is not None:
            self.patients[f"Patient/{res.get('id')}"] = res
            return
        if kind == "MedicationStatement":
            case_id = identifier_value(res, sys.case)
            if case_id is not None:
                parts = self.cases.setdefault(case_id, CaseParts())
                if parts.statement is None:
                    self._order.append(case_id)
                parts.statement = res
                return
        part = identifier_value(res, sys.resource)
        if part and ":" in part:
            case_id, role = part.rsplit(":", 1)
            self.cases.setdefault(case_id, CaseParts()).parts[role] = res
            return
        self.skipped += 1

    def add_all(self, resources: Iterable[Resource]) -> "CaseAssembler":
        for res in resources:
            self.add(res)
        return self

    def records(self) -> Iterator[CaseRecord]:
        orphans = sum(len(p.parts) for p in self.cases.values() if p.statement is None)
        for case_id in self._order:
            parts = self.cases[case_id]
            assert parts.statement is not None
            record = self._record(case_id, parts.statement, parts.parts)
            if record is not None:
                yield record
        if orphans:
            self.warnings.append(
                f"skipped {orphans} resource(s) whose case has no ruxolitinib MedicationStatement"
            )
        if self.skipped:
            self.warnings.append(
                f"skipped {self.skipped} resource(s) that are not part of a case "
                "(e.g. other people's resources on a shared server)"
            )

    # -- reading one case ----------------------------------------------------------------
    def _label(self, concept: dict[str, Any] | None, project: str, table: dict[str, LabelSpec]) -> str:
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
        patient_key = reference_key(statement.get("subject", {}).get("reference"))
        patient = self.patients.get(patient_key or "")
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
            patient_id=identifier_value(patient, self.m.identifier_systems.patient) or "",
            sex=self.m.sex_from_gender(str(patient.get("gender", "unknown"))),
            birth_date=patient.get("birthDate"),
            indication=self._label(condition.get("code"), "indication", self.m.indications),
            site=site,
            disease_onset=condition.get("onsetDateTime"),
            prior_treatments=tuple(
                self._label(r.get("medicationCodeableConcept"), "prior_treatment", self.m.prior_treatments)
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
                self._label(r.get("event"), "adverse_event", self.m.adverse_events)
                for r in self._indexed(parts, ROLE_ADVERSE)
            ),
            recurrence_after_stop=recurrence.get("valueBoolean") if recurrence else None,
        )
