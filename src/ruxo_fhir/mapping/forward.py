"""Case record -> FHIR R4 resources (plain dicts), driven by the mapping file."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

from ruxo_fhir.mapping.ids import id_deriver
from ruxo_fhir.mapping.spec import LabelSpec, MappingSpec
from ruxo_fhir.model import CaseRecord
from ruxo_fhir.resource import Resource

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


def _concept(value: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """Fresh copies of a constant CodeableConcept (`coding` of flat dicts, optional `text`).

    A mapping fixes many concepts (medication, route, a label's codes, categories): they are
    built once per mapper and copied per resource (a caller may edit a resource), which costs a
    fraction of rebuilding them. Key order is kept (`coding` first), so output bytes are too.
    """
    codings = tuple(value["coding"])
    if "text" in value:
        text = value["text"]
        return lambda: {"coding": [c.copy() for c in codings], "text": text}
    return lambda: {"coding": [c.copy() for c in codings]}


class ForwardMapper:
    """Builds the FHIR resources of one case; holds only the mapping, no cohort state.

    Hot path of the import: constant concepts are built once (see `_concept`), and the ids a
    case's resources share (patient, condition, statement) are derived once per case.
    """

    def __init__(self, mapping: MappingSpec) -> None:
        self.m = mapping
        self.sys = sys_ = mapping.identifier_systems
        self._patient_ids: dict[str, str] = {}  # small memo (patients have several cases)
        self._patient_id = id_deriver("Patient", sys_.patient)
        self._statement_id = id_deriver("MedicationStatement", sys_.case)
        self._part_ids: dict[str, Callable[[str], str]] = {}
        self._last: tuple[CaseRecord | None, tuple[str, str, str]] = (None, ("", "", ""))
        self._link = mapping.patients.mode == "link"
        m, s = mapping, mapping.systems
        self._labels: dict[int, dict[str, Callable[[], dict[str, Any]]]] = {
            id(table): {label: _concept(self._build_label_concept(spec, project, label))
                        for label, spec in table.items()}
            for project, table in (("indication", m.indications), ("prior_treatment", m.prior_treatments),
                                   ("adverse_event", m.adverse_events))
        }
        self._body_sites = {key: m.coding(code) for key, code in m.body_sites.items() if m.keeps(code)}
        self._clinical = _concept({"coding": [{"system": s["condition_clinical"], "code": mapping.statuses.condition_clinical}]})
        self._verification = _concept({"coding": [{"system": s["condition_verification"], "code": "confirmed"}]})
        self._condition_category = _concept({"coding": [{"system": s["condition_category"],
                                                         "code": "problem-list-item"}]})
        med = m.medication
        self._medication = _concept({"coding": m.codings(med.codes), "text": med.text})
        self._route = _concept({"coding": m.codings(med.route.codes), "text": med.route.text})
        # integral periods as JSON integers: servers echo `1`, not `1.0`, and the push ledger /
        # dry-run compare content byte for byte
        self._repeats = {key: (freq.frequency, number(Decimal(str(freq.period))), freq.period_unit)
                         for key, freq in med.frequencies.items()}
        self._timing_system = s["timing_abbreviation"]
        self._categories: dict[str, Callable[[], dict[str, Any]]] = {}
        self._absent_reason = _concept({"coding": [{"system": s["data_absent_reason"], "code": "unknown"}]})
        self._codes = {name: _concept({"coding": [m.coding(code)], "text": code.display or code.code})
                       for name in ("improvement", "recurrence")
                       if (code := getattr(m.observations, name).code) is not None}
        self._ucum = s["ucum"]
        self._score_system = m.project_systems["score"]

    # -- ids -----------------------------------------------------------------------------
    def patient_id(self, patient_id: str) -> str:
        found = self._patient_ids.get(patient_id)
        if found is None:
            if len(self._patient_ids) >= 4096:  # bounded: memory stays flat on a long stream
                self._patient_ids.clear()
            found = self._patient_ids[patient_id] = self._patient_id(patient_id)
        return found

    def subject(self, patient_id: str) -> dict[str, str]:
        """The reference to a case's Patient. Link mode: the EHR's own Patient, found by the
        match identifier (a conditional reference, resolved by push or by the server in a
        transaction); otherwise our Patient at its derived id."""
        return {"reference": self._subject_reference(patient_id)}

    def _subject_reference(self, patient_id: str) -> str:
        if self._link:
            return f"Patient?identifier={self.m.patients.match_system}|{patient_id}"
        return f"Patient/{self.patient_id(patient_id)}"

    def case_statement_id(self, case_id: str) -> str:
        return self._statement_id(case_id)

    def part_identifier(self, case_id: str, role: str) -> dict[str, str]:
        return {"system": self.sys.resource, "value": f"{case_id}:{role}"}

    def part_id(self, resource_type: str, case_id: str, role: str) -> str:
        derive = self._part_ids.get(resource_type)
        if derive is None:
            derive = self._part_ids[resource_type] = id_deriver(resource_type, self.sys.resource)
        return derive(f"{case_id}:{role}")

    def _case_ids(self, r: CaseRecord) -> tuple[str, str, str]:
        """(subject reference, condition id, statement id) of the case, derived once for all
        its resources."""
        last, ids = self._last
        if last is not r:
            ids = (self._subject_reference(r.patient_id), self.part_id("Condition", r.case_id, ROLE_CONDITION),
                   self._statement_id(r.case_id))
            self._last = (r, ids)
        return ids

    # -- concepts ------------------------------------------------------------------------
    def _build_label_concept(self, spec: LabelSpec, project: str, label: str) -> dict[str, Any]:
        coding = self.m.codings(spec.codes)
        coding.append({"system": self.m.project_systems[project], "code": label, "display": spec.display})
        return {"coding": coding, "text": spec.display}

    def _label_concept(self, table: dict[str, LabelSpec], project: str, label: str) -> dict[str, Any]:
        built = self._labels.get(id(table))
        if built is None:  # not one of the mapping's own tables
            spec = table.get(label)
            return {"text": label} if spec is None else self._build_label_concept(spec, project, label)
        make = built.get(label)
        if make is None:
            return {"text": label}  # unknown label: text only, never an invented code
        return make()

    def _category(self, code: str) -> list[dict[str, Any]]:
        make = self._categories.get(code)
        if make is None:
            make = self._categories[code] = _concept(
                {"coding": [{"system": self.m.systems["observation_category"], "code": code}]})
        return [make()]

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
        subject, condition, _ = self._case_ids(r)
        res: Resource = {
            "resourceType": "Condition",
            "id": condition,
            "identifier": [self.part_identifier(r.case_id, ROLE_CONDITION)],
            "clinicalStatus": self._clinical(),
            "verificationStatus": self._verification(),
            "category": [self._condition_category()],
            "code": self._label_concept(self.m.indications, "indication", r.indication),
            "subject": {"reference": subject},
        }
        if r.site:
            site: dict[str, Any] = {"text": r.site}
            coding = self._body_sites.get(r.site.strip().lower())
            if coding is not None:
                site["coding"] = [coding.copy()]
            res["bodySite"] = [site]
        if r.disease_onset:
            res["onsetDateTime"] = r.disease_onset
        return res

    def medication_statement(self, r: CaseRecord) -> Resource:
        subject, condition, statement = self._case_ids(r)
        freq = self.m.medication.frequencies[r.frequency]
        frequency, period, period_unit = self._repeats[r.frequency]
        return {
            "resourceType": "MedicationStatement",
            "id": statement,
            "identifier": [{"system": self.sys.case, "value": r.case_id}],
            "status": self.m.statuses.medication_statement,
            "medicationCodeableConcept": self._medication(),
            "subject": {"reference": subject},
            "effectivePeriod": {"start": r.treatment_start},
            "reasonReference": [{"reference": f"Condition/{condition}"}],
            "dosage": [{
                "text": freq.text,
                "timing": {
                    "repeat": {"frequency": frequency, "period": period, "periodUnit": period_unit},
                    "code": {"coding": [{"system": self._timing_system, "code": r.frequency}], "text": r.frequency},
                },
                "route": self._route(),
            }],
        }

    def prior_treatment(self, r: CaseRecord, index: int, label: str) -> Resource:
        subject, condition, _ = self._case_ids(r)
        role = f"{ROLE_PRIOR}{index}"
        return {
            "resourceType": "MedicationStatement",
            "id": self.part_id("MedicationStatement", r.case_id, role),
            "identifier": [self.part_identifier(r.case_id, role)],
            "status": self.m.statuses.prior_treatment,
            "medicationCodeableConcept": self._label_concept(self.m.prior_treatments, "prior_treatment", label),
            "subject": {"reference": subject},
            "reasonReference": [{"reference": f"Condition/{condition}"}],
        }

    def _observation(self, r: CaseRecord, role: str, code: dict[str, Any], category: str | None) -> Resource:
        subject, condition, statement = self._case_ids(r)
        res: Resource = {
            "resourceType": "Observation",
            "id": self.part_id("Observation", r.case_id, role),
            "identifier": [self.part_identifier(r.case_id, role)],
            "status": self.m.statuses.observation,
            "code": code,
            "subject": {"reference": subject},
            "partOf": [{"reference": f"MedicationStatement/{statement}"}],
            "focus": [{"reference": f"Condition/{condition}"}],
        }
        if category:
            res["category"] = self._category(category)
        return res

    def _quantity(self, value: Decimal, unit: str) -> dict[str, Any]:
        return {"value": number(value), "unit": unit, "system": self._ucum, "code": unit}

    def improvement(self, r: CaseRecord) -> Resource | None:
        if r.improvement_pct is None and r.evaluation_date is None:
            return None
        spec = self.m.observations.improvement
        res = self._observation(r, ROLE_IMPROVEMENT, self._codes["improvement"](), spec.category)
        if r.evaluation_date:
            res["effectiveDateTime"] = r.evaluation_date
        if r.improvement_pct is not None:
            res["valueQuantity"] = self._quantity(r.improvement_pct, spec.unit or "%")
        else:
            res["dataAbsentReason"] = self._absent()
        return res

    def _absent(self) -> dict[str, Any]:
        return self._absent_reason()

    def scores(self, r: CaseRecord) -> Iterator[Resource]:
        if not r.score_name:
            return
        spec = self.m.observations.score
        for role, value, when in (
            (ROLE_SCORE_BASELINE, r.baseline_score, r.treatment_start),
            (ROLE_SCORE_FOLLOWUP, r.followup_score, r.evaluation_date),
        ):
            # a named score without a baseline value still gets its baseline Observation
            # (dataAbsentReason), so the score name is never lost
            if value is None and (role == ROLE_SCORE_FOLLOWUP or r.followup_score is not None):
                continue
            code = {"coding": [{"system": self._score_system, "code": r.score_name}], "text": r.score_name}
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
        res = self._observation(r, ROLE_RECURRENCE, self._codes["recurrence"](), None)
        res["valueBoolean"] = r.recurrence_after_stop
        return res

    def adverse_event(self, r: CaseRecord, index: int, label: str) -> Resource:
        subject, _, statement = self._case_ids(r)
        role = f"{ROLE_ADVERSE}{index}"
        res: Resource = {
            "resourceType": "AdverseEvent",
            "id": self.part_id("AdverseEvent", r.case_id, role),
            "identifier": self.part_identifier(r.case_id, role),  # R4: 0..1, not a list
            "actuality": "actual",
            "event": self._label_concept(self.m.adverse_events, "adverse_event", label),
            "subject": {"reference": subject},
            "suspectEntity": [{"instance": {"reference": f"MedicationStatement/{statement}"}}],
        }
        if r.evaluation_date:
            res["date"] = r.evaluation_date
        return res

    def case(self, r: CaseRecord, *, include_patient: bool) -> list[Resource]:
        """All resources of one case, referenced ones first (Patient, Condition, statement)."""
        out: list[Resource] = []
        if include_patient and not self._link:  # link: the EHR owns its Patients
            out.append(self.patient(r))
        out.append(self.condition(r))
        out.append(self.medication_statement(r))
        for i, label in enumerate(r.prior_treatments, 1):
            out.append(self.prior_treatment(r, i, label))
        improvement = self.improvement(r)
        if improvement:
            out.append(improvement)
        if r.score_name:
            out.extend(self.scores(r))
        recurrence = self.recurrence(r)
        if recurrence:
            out.append(recurrence)
        for i, label in enumerate(r.adverse_events, 1):
            out.append(self.adverse_event(r, i, label))
        return out
