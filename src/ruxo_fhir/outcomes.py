"""Outcomes: per-case response and cohort tables from any FHIR stream (pure, no I/O).

Every source (case CSV, Bundle, ndjson folder, server) becomes the same stream of FHIR
resources first, so a cohort gives the same answer whatever it came from. Only per-case
state is kept (dates, values, references), never resource bodies.
Several evaluations of one case: the latest one (by effective date) counts.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from fractions import Fraction
from typing import Any

from ruxo_fhir.fhir_version import to_r4
from ruxo_fhir.mapping.forward import ROLE_RESPONSE, ForwardMapper, number
from ruxo_fhir.mapping.ids import ref
from ruxo_fhir.mapping.reverse import (
    LabelReader,
    conditional_identifier,
    day,
    identifier_value,
    json_decimal,
    reference_key,
    retracted,
)
from ruxo_fhir.mapping.spec import MappingSpec
from ruxo_fhir.outcomes_rule import (
    CATEGORIES,
    RULE_VERSION,
    classify,
    clopper_pearson,
    improvement_fraction,
    months_between,
    to_decimal,
)
from ruxo_fhir.records import FractionCheck
from ruxo_fhir.resource import Resource
from ruxo_fhir.shapes import shape_guard
from ruxo_fhir.validate import shape_reason


@dataclass
class _Value:
    date: str | None
    value: Decimal | None
    key: str
    unit: str | None = None
    name: str | None = None
    role: str | None = None


@dataclass
class _CaseState:
    case_id: str
    statement_key: str
    patient_key: str | None = None
    condition_key: str | None = None
    start: str | None = None
    improvements: list[_Value] = field(default_factory=list)
    scores: list[_Value] = field(default_factory=list)


@dataclass
class CaseOutcome:
    """One case's result, as the JSON `cases` list shows it (plus what write-back needs)."""

    case_id: str
    indication: str
    group: str
    site: str | None
    improvement_pct: float | None
    category: str
    months_to_evaluation: float | None
    evaluation_date: str | None = None
    treatment_start: str | None = None
    exact_improvement: Fraction | None = None
    derived_from: list[str] = field(default_factory=list)
    statement_key: str = ""
    patient_key: str | None = None
    condition_key: str | None = None
    not_evaluable_reason: str | None = None
    from_score: bool = False  # the improvement was computed from baseline/follow-up scores

    def public(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id, "indication": self.indication, "site": self.site,
            "improvement_pct": self.improvement_pct, "category": self.category,
            "months_to_evaluation": self.months_to_evaluation, "group": self.group,
            "evaluation_date": self.evaluation_date, "not_evaluable_reason": self.not_evaluable_reason,
        }


@dataclass
class CohortOutcomes:
    rule_version: str
    cases: list[CaseOutcome]
    summary: dict[str, Any]
    by_indication: dict[str, dict[str, int]]
    by_group: dict[str, int]
    warnings: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "rule_version": self.rule_version,
            "cases": [c.public() for c in self.cases],
            "summary": self.summary,
            "by_indication": self.by_indication,
            "by_group": self.by_group,
            "warnings": self.warnings,
        }


def _subject_key(reference: str | None) -> str | None:
    """`Type/id`, or the conditional reference itself (link mode: the EHR's Patient by MRN)."""
    return reference if conditional_identifier(reference) else reference_key(reference)


class OutcomeCollector:
    """Feed resources in any order with `add`, then call `result()`."""

    def __init__(self, mapping: MappingSpec) -> None:
        self.m = mapping
        self.fwd = ForwardMapper(mapping)
        self.cases: dict[str, _CaseState] = {}
        self.conditions: dict[str, tuple[str, str | None]] = {}
        self.pending: dict[str, tuple[list[_Value], list[_Value]]] = {}
        self.warnings: list[str] = []
        self.retracted = 0  # entered-in-error resources left out
        self.foreign = 0  # Observations about cohort cases that carry no identifier of ours
        imp = mapping.observations.improvement.code
        assert imp is not None
        self._improvement_code = (mapping.system_uri(imp.system), imp.code)
        self._score_system = mapping.project_systems["score"]
        self._labels = LabelReader(mapping)

    def _state(self, statement_key: str) -> tuple[list[_Value], list[_Value]]:
        """Evaluations are kept per statement key: an Observation may arrive before its case."""
        return self.pending.setdefault(statement_key, ([], []))

    def add(self, resource: Resource) -> None:
        """Take one resource; a wrong-typed field leaves it out with a warning naming it and why."""
        with shape_guard([resource], self.warnings, "left out of the outcomes", shape_reason):
            self._add(resource)

    def _add(self, resource: Resource) -> None:
        res = to_r4(resource)
        if retracted(res):
            self.retracted += 1
            return
        kind = res.get("resourceType")
        sys = self.m.identifier_systems
        key = f"{kind}/{res.get('id')}"
        if kind == "MedicationStatement":
            case_id = identifier_value(res, sys.case)
            if case_id:
                reasons = res.get("reasonReference") or [{}]
                self.cases[key] = _CaseState(
                    case_id=case_id, statement_key=key,
                    patient_key=_subject_key(res.get("subject", {}).get("reference")),
                    condition_key=reference_key(reasons[0].get("reference")),
                    start=day(res.get("effectivePeriod", {}).get("start") or res.get("effectiveDateTime")),
                )
        elif kind == "Condition":
            label = self._labels.label(res.get("code"), "indication", self.m.indications)
            site = (res.get("bodySite") or [{}])[0].get("text")
            self.conditions[key] = (label, site)
        elif kind == "Observation":
            self._observation(res, key)

    def _statement_key(self, obs: Resource) -> str | None:
        for part in obs.get("partOf", []):
            k = reference_key(part.get("reference"))
            if k and k.startswith("MedicationStatement/"):
                return k
        part = identifier_value(obs, self.m.identifier_systems.resource)
        if part and ":" in part:
            return f"MedicationStatement/{self.fwd.case_statement_id(part.rsplit(':', 1)[0])}"
        return None

    def _observation(self, obs: Resource, key: str) -> None:
        codings = obs.get("code", {}).get("coding", [])
        systems = {(c.get("system"), c.get("code")) for c in codings}
        is_improvement = self._improvement_code in systems
        score = next((c for c in codings if c.get("system") == self._score_system), None)
        if not is_improvement and score is None:
            return  # response write-backs, recurrence and foreign observations
        ms_key = self._statement_key(obs)
        if ms_key is None:
            return
        # The cohort rule of every source (file, server, export): a part of a case carries the
        # mapping's per-resource identifier system. Another application's Observation pointing
        # at one of our statements is theirs, not an evaluation of this cohort.
        part = identifier_value(obs, self.m.identifier_systems.resource)
        if not part or ":" not in part:
            self.foreign += 1
            return
        qty = obs.get("valueQuantity") or {}
        role = part.rsplit(":", 1)[1]
        value = _Value(day(obs.get("effectiveDateTime") or (obs.get("effectivePeriod") or {}).get("end")),
                       json_decimal(qty.get("value")), key, qty.get("code") or qty.get("unit"),
                       obs.get("code", {}).get("text") or (score or {}).get("code"), role)
        improvements, scores = self._state(ms_key)
        (improvements if is_improvement else scores).append(value)

    def add_all(self, resources: Iterable[Resource]) -> OutcomeCollector:
        for r in resources:
            self.add(r)
        return self

    # -- the rule applied to one case ----------------------------------------------------
    def _evaluate(self, state: _CaseState) -> CaseOutcome:
        improvements, scores = self.pending.get(state.statement_key, ([], []))
        label, site = self.conditions.get(state.condition_key or "", ("", None))
        if not label:
            self.warnings.append(f"case {state.case_id}: indication Condition not found")
        cid = state.case_id
        exact: Fraction | None = None
        eval_date: str | None = None
        used: list[str] = []
        valued = [v for v in improvements if v.value is not None]
        reason: str | None = None
        if len(improvements) > 1:
            self.warnings.append(f"case {cid}: {len(improvements)} evaluations; the latest counts")
        if valued:
            latest = max(valued, key=lambda v: v.date or "")
            if latest.unit not in ("%", None):
                self.warnings.append(f"case {cid}: improvement Observation unit is {latest.unit!r}, not '%'")
            assert latest.value is not None
            if -100 <= latest.value <= 100:
                exact, eval_date, used = Fraction(latest.value), latest.date, [latest.key]
            else:  # the same rule as a CSV row's improvement_pct: a percentage of the baseline
                eval_date, reason = latest.date, f"improvement {latest.value} % is outside -100..100"
                self.warnings.append(f"case {cid}: {reason}; not evaluable")
        elif scores:
            exact, eval_date, used, reason = self._from_scores(state, scores)
        elif improvements:
            reason = "evaluation without an improvement value"
        if not valued and improvements and eval_date is None:
            eval_date = max(v.date or "" for v in improvements) or None
        if eval_date is None and not improvements and not scores:
            reason = "no evaluation"
            self.warnings.append(f"case {cid}: no evaluation")
        months = None
        if eval_date and state.start and len(eval_date) == 10 and len(state.start) == 10:
            if eval_date < state.start:
                self.warnings.append(f"case {cid}: evaluation {eval_date} is before treatment start {state.start}")
            months = months_between(date.fromisoformat(state.start), date.fromisoformat(eval_date))
        pct = None if exact is None else float(to_decimal(exact))
        return CaseOutcome(
            case_id=cid, indication=label, group=self.m.group_of(label), site=site,
            improvement_pct=pct, category=classify(exact), months_to_evaluation=months,
            evaluation_date=eval_date, treatment_start=state.start, exact_improvement=exact,
            derived_from=used, statement_key=state.statement_key, patient_key=state.patient_key,
            condition_key=state.condition_key, not_evaluable_reason=reason if exact is None else None,
            from_score=not valued and exact is not None,
        )

    def _from_scores(self, state: _CaseState, scores: list[_Value]
                     ) -> tuple[Fraction | None, str | None, list[str], str | None]:
        cid = state.case_id
        start = state.start or ""

        def is_baseline(v: _Value) -> bool:
            if v.role:
                return v.role.endswith("baseline")
            return bool(v.date) and (v.date or "") <= start

        baselines = [v for v in scores if is_baseline(v) and v.value is not None]
        followups = [v for v in scores if not is_baseline(v) and v.value is not None]
        if not baselines:
            self.warnings.append(f"case {cid}: score without a baseline; not evaluable")
            latest_date = max((v.date or "" for v in followups), default="") or None
            return None, latest_date, [], "score without a baseline"
        if not followups:
            self.warnings.append(f"case {cid}: score without a follow-up; not evaluable")
            return None, None, [], "score without a follow-up"
        base = max(baselines, key=lambda v: v.date or "")
        follow = max(followups, key=lambda v: v.date or "")
        higher_better = (follow.name or "") in self.m.observations.score.higher_is_better
        assert base.value is not None and follow.value is not None
        try:
            exact = improvement_fraction(base.value, follow.value, higher_better)
        except ValueError as exc:
            self.warnings.append(f"case {cid}: {exc}; not evaluable")
            return None, follow.date, [], str(exc)
        if exact is None:
            self.warnings.append(f"case {cid}: baseline score is 0; not evaluable")
            return None, follow.date, [base.key, follow.key], "baseline score is 0"
        return exact, follow.date, [base.key, follow.key], None

    def result(self) -> CohortOutcomes:
        if self.retracted:
            self.warnings.append(f"left out {self.retracted} entered-in-error (retracted) resource(s)")
        orphans = set(self.pending) - set(self.cases)
        if orphans:
            self.warnings.append(f"{len(orphans)} evaluation group(s) point at no case MedicationStatement")
        if self.foreign:
            self.warnings.append(
                f"skipped {self.foreign} Observation(s) about cohort cases without the mapping's identifier "
                f"system {self.m.identifier_systems.resource} (another application's data; not counted)")
        cases = [self._evaluate(s) for s in self.cases.values()]
        cases.sort(key=lambda c: c.case_id)
        if not cases:
            self.warnings.append(
                "no cohort case: no MedicationStatement carries the case identifier system "
                f"{self.m.identifier_systems.case} (wrong file, server or --mapping?)")
        fractions = FractionCheck("improvement_pct (improvement Observations)")
        for c in cases:
            if c.improvement_pct is not None and not c.from_score:
                fractions.add(c.improvement_pct)
        if fractions.suspicious:
            self.warnings.append(fractions.message())
        return summarise(cases, self.warnings)


def summarise(cases: list[CaseOutcome], warnings: list[str]) -> CohortOutcomes:
    counts: dict[str, int] = {c: sum(1 for x in cases if x.category == c) for c in CATEGORIES}
    evaluable = len(cases) - counts["not_evaluable"]
    responders = counts["complete"] + counts["partial"]
    rate = round(responders / evaluable, 4) if evaluable else None
    ci = [round(x, 4) for x in clopper_pearson(responders, evaluable)] if evaluable else None
    months = [c.months_to_evaluation for c in cases if c.months_to_evaluation is not None]
    summary: dict[str, Any] = {
        "n": len(cases), **counts, "evaluable": evaluable, "response_rate": rate, "response_rate_ci95": ci,
        "mean_months_to_evaluation": round(sum(months) / len(months), 2) if months else None,
    }
    by_ind: dict[str, dict[str, int]] = {}
    by_group: dict[str, int] = {}
    for c in cases:
        row = by_ind.setdefault(c.indication, {"n": 0, **dict.fromkeys(CATEGORIES, 0)})
        row["n"] += 1
        row[c.category] += 1
        by_group[c.group] = by_group.get(c.group, 0) + 1
    not_evaluable = [c for c in cases if c.category == "not_evaluable"]
    if not_evaluable:
        why: dict[str, list[str]] = {}
        for c in not_evaluable:
            why.setdefault(c.not_evaluable_reason or "no usable evaluation", []).append(c.case_id)
        detail = "; ".join(f"{r}: {', '.join(ids)}" for r, ids in why.items())
        warnings = [*warnings, f"{len(not_evaluable)} of {len(cases)} case(s) not evaluable ({detail}); "
                    f"the response rate counts the {evaluable} evaluable case(s) only"]
    return CohortOutcomes(RULE_VERSION, cases, summary, by_ind, by_group, warnings)


def compute_outcomes(resources: Iterable[Resource], mapping: MappingSpec) -> CohortOutcomes:
    return OutcomeCollector(mapping).add_all(resources).result()


# --- write-back -------------------------------------------------------------------------

RULE_TEXT = "complete > 80 %, partial 40-80 %, none < 40 % improvement; latest evaluation counts"


def response_observation(case: CaseOutcome, mapping: MappingSpec) -> Resource | None:
    """The derived response as an Observation, with a stable id per case and evaluation."""
    spec = mapping.observations.response
    cat = spec.categories.get(case.category)
    if spec.code is None or cat is None or case.patient_key is None:
        return None
    fwd = ForwardMapper(mapping)
    role = f"{ROLE_RESPONSE}{case.evaluation_date or 'undated'}"
    obs: Resource = {
        "resourceType": "Observation",
        "id": fwd.part_id("Observation", case.case_id, role),
        "identifier": [fwd.part_identifier(case.case_id, role)],
        "status": "final",
        "code": {"coding": [mapping.coding(spec.code)], "text": spec.code.display or spec.code.code},
        "subject": {"reference": case.patient_key},
        "partOf": [ref(*case.statement_key.split("/", 1))],
    }
    if case.condition_key:
        obs["focus"] = [ref(*case.condition_key.split("/", 1))]
    if case.evaluation_date:
        obs["effectiveDateTime"] = case.evaluation_date
    obs["valueCodeableConcept"] = {"coding": [mapping.coding(cat)], "text": case.category}
    obs["method"] = {"text": f"{RULE_VERSION}: {RULE_TEXT}"}
    note = f"rule {RULE_VERSION}"
    if case.improvement_pct is not None:
        note += f"; improvement {number(Decimal(str(case.improvement_pct)))} %"
    obs["note"] = [{"text": note}]
    if case.derived_from:
        obs["derivedFrom"] = [ref(*k.split("/", 1)) for k in case.derived_from]
    return obs
