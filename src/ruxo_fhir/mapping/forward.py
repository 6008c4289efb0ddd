"""Case record -> FHIR R4 resources (plain dicts), driven by the mapping file."""
from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from ruxo_fhir.mapping.ids import derive_id, ref
from ruxo_fhir.mapping.spec import LabelSpec, MappingSpec
from ruxo_fhir.records import CaseRecord

Resource = dict[str, Any]

# Roles: the part after "<case_id>:" in each derived resource's identifier.
ROLE_CONDITION = "condition"
ROLE_IMPROVEMENT = "improvement"
ROLE_SCORE_BASELINE = "score-baseline"
ROLE_SCORE_FOLLOWUP = "score-followup"
ROLE_RECURRENCE = "recurrence"
ROLE_PRIOR = "prior-"
ROLE_ADVERSE = "ae-"
ROLE_RESPONSE = "response-"


def number(value: Decimal) -> int | float:
    """A JSON number for a decimal: integral values stay integers (85, not 85.0)."""
    return int(value) if value == value.to_integral_value() else float(value)


class ForwardMapper:
    """Builds the FHIR resources of one case; holds only the mapping, no cohort state."""

    def __init__(self, mapping: MappingSpec) -> None:
        self.m = mapping
        self.sys = mapping.identifier_systems
        # Ids of one case are referenced by several of its resources: derive each once. A small
        # memo (cleared when full) keeps memory flat on a million-row stream.
        self._ids: dict[tuple[str, str, str], str] = {}

    def _id(self, resource_type: str, system: str, value: str) -> str:
        key = (resource_type, system, value)
        found = self._ids.get(key)
        if found is None:
            if len(self._ids) >= 4096:
                self._ids.clear()
            found = self._ids[key] = derive_id(resource_type, system, value)
        return found

    # -- ids -----------------------------------------------------------------------------
    def patient_id(self, patient_id: str) -> str:
        return self._id("Patient", self.sys.patient, patient_id)

    def subject(self, patient_id: str) -> dict[str, str]:
        """The reference to a case's Patient. Link mode: the EHR's own Patient, found by the
        match identifier (a conditional reference, resolved by push or by the server in a
        transaction); otherwise our Patient at its derived id."""
        if self.m.patients.mode == "link":
            return {"reference": f"Patient?identifier={self.m.patients.match_system}|{patient_id}"}
        return ref("Patient", self.patient_id(patient_id))

    def case_statement_id(self, case_id: str) -> str:
        return self._id("MedicationStatement", self.sys.case, case_id)

    def part_identifier(self, case_id: str, role: str) -> dict[str, str]:
        return {"system": self.sys.resource, "value": f"{case_id}:{role}"}

    def part_id(self, resource_type: str, case_id: str, role: str) -> str:
        return self._id(resource_type, self.sys.resource, f"{case_id}:{role}")

    # -- concepts ------------------------------------------------------------------------
    def _label_concept(self, table: dict[str, LabelSpec], project: str, label: str) -> dict[str, Any]:
        spec = table.get(label)
        if spec is None:
            return {"text": label}  # unknown label: text only, never an invented code
        coding = self.m.codings(spec.codes)
        coding.append({"system": self.m.project_systems[project], "code": label, "display": spec.display})
        return {"coding": coding, "text": spec.display}

    def _category(self, code: str) -> list[dict[str, Any]]:
        return [{"coding": [{"system": self.m.systems["observation_category"], "code": code}]}]

    # -- resources -----------------------------------------------------------------------
    def patient(self, r: CaseRecord) -> Resource:
        res: Resource = {
            "resourceType": "Patient",
            "id": self.patient_id(r.patient_id),
            "identifier": self._patient_identifiers(r.patient_id),
            "gender": self.m.gender(r.sex),
        }
        if r.birth_date:
            res["birthDate"] = r.birth_date
        return res

    def _patient_identifiers(self, patient_id: str) -> list[dict[str, str]]:
        out = [{"system": self.sys.patient, "value": patient_id}]
        match = self.m.patients.match_system
        if self.m.patients.mode == "link-or-create" and match and match != self.sys.patient:
            out.append({"system": match, "value": patient_id})  # so the EHR's search finds it
        return out

    def condition(self, r: CaseRecord) -> Resource:
        s = self.m.systems
        res: Resource = {
            "resourceType": "Condition",
            "id": self.part_id("Condition", r.case_id, ROLE_CONDITION),
            "identifier": [self.part_identifier(r.case_id, ROLE_CONDITION)],
            "clinicalStatus": {"coding": [{"system": s["condition_clinical"], "code": "active"}]},
            "verificationStatus": {"coding": [{"system": s["condition_verification"], "code": "confirmed"}]},
            "category": [{"coding": [{"system": s["condition_category"], "code": "problem-list-item"}]}],
            "code": self._label_concept(self.m.indications, "indication", r.indication),
            "subject": self.subject(r.patient_id),
        }
        if r.site:
            site: dict[str, Any] = {"text": r.site}
            code = self.m.body_sites.get(r.site.strip().lower())
            if code is not None and self.m.keeps(code):
                site["coding"] = [self.m.coding(code)]
            res["bodySite"] = [site]
        if r.disease_onset:
            res["onsetDateTime"] = r.disease_onset
        return res

    def medication_statement(self, r: CaseRecord) -> Resource:
        med = self.m.medication
        freq = med.frequencies[r.frequency]
        timing_code = {"system": self.m.systems["timing_abbreviation"], "code": r.frequency}
        return {
            "resourceType": "MedicationStatement",
            "id": self.case_statement_id(r.case_id),
            "identifier": [{"system": self.sys.case, "value": r.case_id}],
            "status": "active",
            "medicationCodeableConcept": {"coding": self.m.codings(med.codes), "text": med.text},
            "subject": self.subject(r.patient_id),
            "effectivePeriod": {"start": r.treatment_start},
            "reasonReference": [ref("Condition", self.part_id("Condition", r.case_id, ROLE_CONDITION))],
            "dosage": [{
                "text": freq.text,
                "timing": {
                    # integral periods as JSON integers: servers echo `1`, not `1.0`, and the push
                    # ledger / dry-run compare content byte for byte
                    "repeat": {"frequency": freq.frequency, "period": number(Decimal(str(freq.period))),
                               "periodUnit": freq.period_unit},
                    "code": {"coding": [timing_code], "text": r.frequency},
                },
                "route": {"coding": self.m.codings(med.route.codes), "text": med.route.text},
            }],
        }

    def prior_treatment(self, r: CaseRecord, index: int, label: str) -> Resource:
        role = f"{ROLE_PRIOR}{index}"
        return {
            "resourceType": "MedicationStatement",
            "id": self.part_id("MedicationStatement", r.case_id, role),
            "identifier": [self.part_identifier(r.case_id, role)],
            "status": "completed",
            "medicationCodeableConcept": self._label_concept(self.m.prior_treatments, "prior_treatment", label),
            "subject": self.subject(r.patient_id),
            "reasonReference": [ref("Condition", self.part_id("Condition", r.case_id, ROLE_CONDITION))],
        }

    def _observation(self, r: CaseRecord, role: str, code: dict[str, Any], category: str | None) -> Resource:
        res: Resource = {
            "resourceType": "Observation",
            "id": self.part_id("Observation", r.case_id, role),
            "identifier": [self.part_identifier(r.case_id, role)],
            "status": "final",
            "code": code,
            "subject": self.subject(r.patient_id),
            "partOf": [ref("MedicationStatement", self.case_statement_id(r.case_id))],
            "focus": [ref("Condition", self.part_id("Condition", r.case_id, ROLE_CONDITION))],
        }
        if category:
            res["category"] = self._category(category)
        return res

    def _quantity(self, value: Decimal, unit: str) -> dict[str, Any]:
        return {"value": number(value), "unit": unit, "system": self.m.systems["ucum"], "code": unit}

    def improvement(self, r: CaseRecord) -> Resource | None:
        if r.improvement_pct is None and r.evaluation_date is None:
            return None
        spec = self.m.observations.improvement
        assert spec.code is not None
        code = {"coding": [self.m.coding(spec.code)], "text": spec.code.display or spec.code.code}
        res = self._observation(r, ROLE_IMPROVEMENT, code, spec.category)
        if r.evaluation_date:
            res["effectiveDateTime"] = r.evaluation_date
        if r.improvement_pct is not None:
            res["valueQuantity"] = self._quantity(r.improvement_pct, spec.unit or "%")
        else:
            res["dataAbsentReason"] = self._absent()
        return res

    def _absent(self) -> dict[str, Any]:
        return {"coding": [{"system": self.m.systems["data_absent_reason"], "code": "unknown"}]}

    def scores(self, r: CaseRecord) -> Iterator[Resource]:
        if not r.score_name:
            return
        spec = self.m.observations.score
        code = {
            "coding": [{"system": self.m.project_systems["score"], "code": r.score_name}],
            "text": r.score_name,
        }
        for role, value, when in (
            (ROLE_SCORE_BASELINE, r.baseline_score, r.treatment_start),
            (ROLE_SCORE_FOLLOWUP, r.followup_score, r.evaluation_date),
        ):
            # a named score without a baseline value still gets its baseline Observation
            # (dataAbsentReason), so the score name is never lost
            if value is None and (role == ROLE_SCORE_FOLLOWUP or r.followup_score is not None):
                continue
            res = self._observation(r, role, code, spec.category)
            if when:
                res["effectiveDateTime"] = when
            if value is not None:
                res["valueQuantity"] = self._quantity(value, spec.unit or "{score}")
            else:
                res["dataAbsentReason"] = self._absent()
            yield res

    def recurrence(self, r: CaseRecord) -> Resource | None:
        if r.recurrence_after_stop is None:
            return None
        spec = self.m.observations.recurrence
        assert spec.code is not None
        code = {"coding": [self.m.coding(spec.code)], "text": spec.code.display or spec.code.code}
        res = self._observation(r, ROLE_RECURRENCE, code, None)
        res["valueBoolean"] = r.recurrence_after_stop
        return res

    def adverse_event(self, r: CaseRecord, index: int, label: str) -> Resource:
        role = f"{ROLE_ADVERSE}{index}"
        res: Resource = {
            "resourceType": "AdverseEvent",
            "id": self.part_id("AdverseEvent", r.case_id, role),
            "identifier": self.part_identifier(r.case_id, role),  # R4: 0..1, not a list
            "actuality": "actual",
            "event": self._label_concept(self.m.adverse_events, "adverse_event", label),
            "subject": self.subject(r.patient_id),
            "suspectEntity": [{"instance": ref("MedicationStatement", self.case_statement_id(r.case_id))}],
        }
        if r.evaluation_date:
            res["date"] = r.evaluation_date
        return res

    def case(self, r: CaseRecord, *, include_patient: bool) -> list[Resource]:
        """All resources of one case, referenced ones first (Patient, Condition, statement)."""
        out: list[Resource] = []
        if include_patient and self.m.patients.mode != "link":  # link: the EHR owns its Patients
            out.append(self.patient(r))
        out.append(self.condition(r))
        out.append(self.medication_statement(r))
        out.extend(self.prior_treatment(r, i, label) for i, label in enumerate(r.prior_treatments, 1))
        improvement = self.improvement(r)
        if improvement:
            out.append(improvement)
        out.extend(self.scores(r))
        recurrence = self.recurrence(r)
        if recurrence:
            out.append(recurrence)
        out.extend(self.adverse_event(r, i, label) for i, label in enumerate(r.adverse_events, 1))
        return out
