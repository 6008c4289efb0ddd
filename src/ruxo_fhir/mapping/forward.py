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


def _copier(value: Any) -> Callable[[], Any]:
    """A function returning a fresh deep copy of a JSON value (dicts, lists, scalars), key
    order kept; compiled once for the value's shape (flat dicts and lists by their C `copy`)."""
    if isinstance(value, dict):
        nested = [(k, _copier(v)) for k, v in value.items() if isinstance(v, (dict, list))]
        if not nested:
            return value.copy

        def copy_dict() -> dict[str, Any]:
            out = value.copy()  # keys in place; nested values replaced by copies below
            for key, copy in nested:
                out[key] = copy()
            return out

        return copy_dict
    if isinstance(value, list):
        if not any(isinstance(v, (dict, list)) for v in value):
            return value.copy
        copies = [_copier(v) for v in value]
        return lambda: [copy() for copy in copies]
    return lambda: value


def _constant(value: Any, shared: dict[int, Any] | None) -> Callable[[], Any]:
    """A factory of a JSON value the mapping fixes (a concept, a category, a dosage).

    Built once per mapper. `shared` (a dict, the mapper's `constants`): every resource gets the
    very same object, registered there (for a caller that only reads and serialises resources,
    as the import does: no copy per resource); None: each call returns a fresh copy, so a
    caller may edit one resource safely.
    """
    if shared is not None:
        shared[id(value)] = value
        return lambda: value
    return _copier(value)


class ForwardMapper:
    """Builds the FHIR resources of one case; holds only the mapping, no cohort state.

    Hot path of the import: every value the mapping fixes (concepts, categories, dosages,
    statuses, systems) is built once per mapper (see `_constant`), and the ids a case's
    resources share (patient, condition, statement) are derived once per case.

    `share_constants=True` puts the same constant objects into every resource: only for a
    caller that never edits a resource's nested values (the import serialises them at once;
    `to_version(..., in_place=True)` rewrites top-level keys and the AdverseEvent's own
    `suspectEntity` entries, which are never shared).
    """

    def __init__(self, mapping: MappingSpec, *, share_constants: bool = False) -> None:
        self.m = m = mapping
        self.sys = sys_ = mapping.identifier_systems
        # the objects every resource shares (by id), for a validator to check once (see
        # fastvalidate.FastPath); None: each resource gets its own copies
        self.constants: dict[int, Any] | None = {} if share_constants else None
        share = self.constants
        self._patient_ids: dict[str, str] = {}  # small memo (patients have several cases)
        self._patient_id = id_deriver("Patient", sys_.patient)
        self._statement_id = id_deriver("MedicationStatement", sys_.case)
        self._part_ids: dict[str, Callable[[str], str]] = {}
        self._condition_id = self._deriver("Condition")
        self._prior_id = self._deriver("MedicationStatement")
        self._observation_id = self._deriver("Observation")
        self._adverse_id = self._deriver("AdverseEvent")
        self._case_system, self._resource_system = sys_.case, sys_.resource
        self._last: tuple[CaseRecord | None, tuple[str, str, str, str, str]] = (None, ("", "", "", "", ""))
        self._link = mapping.patients.mode == "link"
        self._link_prefix = f"Patient?identifier={m.patients.match_system}|"
        self._second_patient_system = (m.patients.match_system if m.patients.mode == "link-or-create"
                                       and m.patients.match_system and m.patients.match_system != sys_.patient
                                       else None)
        self._genders = {key: str(value) for key, value in m.sex.items() if key != "aliases"}
        s = m.systems
        self._indications, self._prior_treatments, self._adverse_events = (
            {label: _constant(self._build_label_concept(spec, project, label), share) for label, spec in table.items()}
            for project, table in (("indication", m.indications), ("prior_treatment", m.prior_treatments),
                                   ("adverse_event", m.adverse_events)))
        self._body_sites = {key: _constant([m.coding(code)], share)
                            for key, code in m.body_sites.items() if m.keeps(code)}
        statuses = m.statuses
        self._statement_status, self._prior_status = statuses.medication_statement, statuses.prior_treatment
        self._observation_status = statuses.observation
        self._clinical = _constant({"coding": [{"system": s["condition_clinical"],
                                                "code": statuses.condition_clinical}]}, share)
        self._verification = _constant({"coding": [{"system": s["condition_verification"], "code": "confirmed"}]},
                                       share)
        self._condition_category = _constant([{"coding": [{"system": s["condition_category"],
                                                           "code": "problem-list-item"}]}], share)
        med = m.medication
        self._medication = _constant({"coding": m.codings(med.codes), "text": med.text}, share)
        route = {"coding": m.codings(med.route.codes), "text": med.route.text}
        timing_system = s["timing_abbreviation"]
        # integral periods as JSON integers: servers echo `1`, not `1.0`, and the push ledger /
        # dry-run compare content byte for byte
        self._dosages = {key: _constant([{
            "text": freq.text,
            "timing": {
                "repeat": {"frequency": freq.frequency, "period": number(Decimal(str(freq.period))),
                           "periodUnit": freq.period_unit},
                "code": {"coding": [{"system": timing_system, "code": key}], "text": key},
            },
            "route": route,
        }], share) for key, freq in med.frequencies.items()}
        self._categories: dict[str, Callable[[], list[dict[str, Any]]]] = {}
        self._absent = _constant({"coding": [{"system": s["data_absent_reason"], "code": "unknown"}]}, share)
        self._codes = {name: _constant({"coding": [m.coding(code)], "text": code.display or code.code}, share)
                       for name in ("improvement", "recurrence")
                       if (code := getattr(m.observations, name).code) is not None}
        obs = m.observations
        self._improvement_category, self._improvement_unit = obs.improvement.category, obs.improvement.unit or "%"
        self._score_category, self._score_unit = obs.score.category, obs.score.unit or "{score}"
        self._ucum = s["ucum"]
        self._score_system = m.project_systems["score"]
        self._numbers: dict[Decimal, int | float] = {}

    # -- ids -----------------------------------------------------------------------------
    def _deriver(self, resource_type: str) -> Callable[[str], str]:
        derive = self._part_ids.get(resource_type)
        if derive is None:
            derive = self._part_ids[resource_type] = id_deriver(resource_type, self.sys.resource)
        return derive

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
            return self._link_prefix + patient_id
        return "Patient/" + self.patient_id(patient_id)

    def case_statement_id(self, case_id: str) -> str:
        return self._statement_id(case_id)

    def part_identifier(self, case_id: str, role: str) -> dict[str, str]:
        return {"system": self._resource_system, "value": f"{case_id}:{role}"}

    def part_id(self, resource_type: str, case_id: str, role: str) -> str:
        return self._deriver(resource_type)(f"{case_id}:{role}")

    def _case_ids(self, r: CaseRecord) -> tuple[str, str, str, str, str]:
        """(subject reference, condition id, statement id, condition reference, statement
        reference) of the case, derived once for all its resources."""
        last, ids = self._last
        if last is not r:
            condition, statement = self._condition_id(f"{r.case_id}:{ROLE_CONDITION}"), self._statement_id(r.case_id)
            ids = (self._subject_reference(r.patient_id), condition, statement, "Condition/" + condition,
                   "MedicationStatement/" + statement)
            self._last = (r, ids)
        return ids

    # -- concepts ------------------------------------------------------------------------
    def _build_label_concept(self, spec: LabelSpec, project: str, label: str) -> dict[str, Any]:
        coding = self.m.codings(spec.codes)
        coding.append({"system": self.m.project_systems[project], "code": label, "display": spec.display})
        return {"coding": coding, "text": spec.display}

    @staticmethod
    def _label_concept(built: dict[str, Callable[[], dict[str, Any]]], label: str) -> dict[str, Any]:
        make = built.get(label)
        if make is None:
            return {"text": label}  # unknown label: text only, never an invented code
        return make()

    def _category(self, code: str) -> list[dict[str, Any]]:
        make = self._categories.get(code)
        if make is None:
            make = self._categories[code] = _constant(
                [{"coding": [{"system": self.m.systems["observation_category"], "code": code}]}], self.constants)
        return make()

    def _number(self, value: Decimal) -> int | float:
        """`number(value)`, remembered per value (scores and percentages repeat)."""
        found = self._numbers.get(value)
        if found is None:
            if len(self._numbers) >= 4096:
                self._numbers.clear()
            found = self._numbers[value] = number(value)
        return found

    # -- resources -----------------------------------------------------------------------
    def patient(self, r: CaseRecord) -> Resource:
        patient_id = r.patient_id
        identifiers = [{"system": self.sys.patient, "value": patient_id}]
        if self._second_patient_system:
            identifiers.append({"system": self._second_patient_system, "value": patient_id})  # so the EHR's search finds it
        gender = self._genders.get(r.sex)
        res: Resource = {
            "resourceType": "Patient",
            "id": self.patient_id(patient_id),
            "identifier": identifiers,
            "gender": gender if gender is not None else self.m.gender(r.sex),
        }
        if r.birth_date:
            res["birthDate"] = r.birth_date
        return res

    def condition(self, r: CaseRecord, ids: tuple[str, str, str, str, str] | None = None) -> Resource:
        subject, condition, _, _, _ = ids or self._case_ids(r)
        res: Resource = {
            "resourceType": "Condition",
            "id": condition,
            "identifier": [{"system": self._resource_system, "value": f"{r.case_id}:{ROLE_CONDITION}"}],
            "clinicalStatus": self._clinical(),
            "verificationStatus": self._verification(),
            "category": self._condition_category(),
            "code": self._label_concept(self._indications, r.indication),
            "subject": {"reference": subject},
        }
        site = r.site
        if site:
            body: dict[str, Any] = {"text": site}
            coding = self._body_sites.get(site.strip().lower())
            if coding is not None:
                body["coding"] = coding()
            res["bodySite"] = [body]
        if r.disease_onset:
            res["onsetDateTime"] = r.disease_onset
        return res

    def medication_statement(self, r: CaseRecord, ids: tuple[str, str, str, str, str] | None = None) -> Resource:
        subject, _, statement, condition_ref, _ = ids or self._case_ids(r)
        return {
            "resourceType": "MedicationStatement",
            "id": statement,
            "identifier": [{"system": self._case_system, "value": r.case_id}],
            "status": self._statement_status,
            "medicationCodeableConcept": self._medication(),
            "subject": {"reference": subject},
            "effectivePeriod": {"start": r.treatment_start},
            "reasonReference": [{"reference": condition_ref}],
            "dosage": self._dosages[r.frequency](),
        }

    def prior_treatment(self, r: CaseRecord, index: int, label: str, ids: tuple[str, str, str, str, str] | None = None) -> Resource:
        subject, _, _, condition_ref, _ = ids or self._case_ids(r)
        value = f"{r.case_id}:{ROLE_PRIOR}{index}"
        return {
            "resourceType": "MedicationStatement",
            "id": self._prior_id(value),
            "identifier": [{"system": self._resource_system, "value": value}],
            "status": self._prior_status,
            "medicationCodeableConcept": self._label_concept(self._prior_treatments, label),
            "subject": {"reference": subject},
            "reasonReference": [{"reference": condition_ref}],
        }

    def _observation(self, r: CaseRecord, role: str, code: dict[str, Any], category: str | None,
                     ids: tuple[str, str, str, str, str] | None = None) -> Resource:
        subject, _, _, condition_ref, statement_ref = ids or self._case_ids(r)
        value = f"{r.case_id}:{role}"
        res: Resource = {
            "resourceType": "Observation",
            "id": self._observation_id(value),
            "identifier": [{"system": self._resource_system, "value": value}],
            "status": self._observation_status,
            "code": code,
            "subject": {"reference": subject},
            "partOf": [{"reference": statement_ref}],
            "focus": [{"reference": condition_ref}],
        }
        if category:
            res["category"] = self._category(category)
        return res

    def _quantity(self, value: Decimal, unit: str) -> dict[str, Any]:
        return {"value": self._number(value), "unit": unit, "system": self._ucum, "code": unit}

    def improvement(self, r: CaseRecord, ids: tuple[str, str, str, str, str] | None = None) -> Resource | None:
        if r.improvement_pct is None and r.evaluation_date is None:
            return None
        res = self._observation(r, ROLE_IMPROVEMENT, self._codes["improvement"](), self._improvement_category, ids)
        if r.evaluation_date:
            res["effectiveDateTime"] = r.evaluation_date
        if r.improvement_pct is not None:
            res["valueQuantity"] = self._quantity(r.improvement_pct, self._improvement_unit)
        else:
            res["dataAbsentReason"] = self._absent()
        return res

    def scores(self, r: CaseRecord, ids: tuple[str, str, str, str, str] | None = None) -> Iterator[Resource]:
        if not r.score_name:
            return
        for role, value, when in (
            (ROLE_SCORE_BASELINE, r.baseline_score, r.treatment_start),
            (ROLE_SCORE_FOLLOWUP, r.followup_score, r.evaluation_date),
        ):
            # a named score without a baseline value still gets its baseline Observation
            # (dataAbsentReason), so the score name is never lost
            if value is None and (role == ROLE_SCORE_FOLLOWUP or r.followup_score is not None):
                continue
            code = {"coding": [{"system": self._score_system, "code": r.score_name}], "text": r.score_name}
            res = self._observation(r, role, code, self._score_category, ids)
            if when:
                res["effectiveDateTime"] = when
            if value is not None:
                res["valueQuantity"] = self._quantity(value, self._score_unit)
            else:
                res["dataAbsentReason"] = self._absent()
            yield res

    def recurrence(self, r: CaseRecord, ids: tuple[str, str, str, str, str] | None = None) -> Resource | None:
        if r.recurrence_after_stop is None:
            return None
        res = self._observation(r, ROLE_RECURRENCE, self._codes["recurrence"](), None, ids)
        res["valueBoolean"] = r.recurrence_after_stop
        return res

    def adverse_event(self, r: CaseRecord, index: int, label: str, ids: tuple[str, str, str, str, str] | None = None) -> Resource:
        subject, _, _, _, statement_ref = ids or self._case_ids(r)
        value = f"{r.case_id}:{ROLE_ADVERSE}{index}"
        res: Resource = {
            "resourceType": "AdverseEvent",
            "id": self._adverse_id(value),
            "identifier": {"system": self._resource_system, "value": value},  # R4: 0..1, not a list
            "actuality": "actual",
            "event": self._label_concept(self._adverse_events, label),
            "subject": {"reference": subject},
            # built per resource, never shared: to_version(in_place=True) edits these entries
            "suspectEntity": [{"instance": {"reference": statement_ref}}],
        }
        if r.evaluation_date:
            res["date"] = r.evaluation_date
        return res

    def case(self, r: CaseRecord, *, include_patient: bool) -> list[Resource]:
        """All resources of one case, referenced ones first (Patient, Condition, statement)."""
        ids = self._case_ids(r)  # once for the case, handed to each builder
        out: list[Resource] = []
        if include_patient and not self._link:  # link: the EHR owns its Patients
            out.append(self.patient(r))
        out.append(self.condition(r, ids))
        out.append(self.medication_statement(r, ids))
        if r.prior_treatments:
            for i, label in enumerate(r.prior_treatments, 1):
                out.append(self.prior_treatment(r, i, label, ids))
        if r.improvement_pct is not None or r.evaluation_date is not None:
            improvement = self.improvement(r, ids)
            if improvement:
                out.append(improvement)
        if r.score_name:
            out.extend(self.scores(r, ids))
        if r.recurrence_after_stop is not None:
            recurrence = self.recurrence(r, ids)
            if recurrence:
                out.append(recurrence)
        if r.adverse_events:
            for i, label in enumerate(r.adverse_events, 1):
                out.append(self.adverse_event(r, i, label, ids))
        return out
