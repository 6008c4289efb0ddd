"""Broken-rule cases shared by tests/test_validate_rules.py and the HL7 validator oracle test.

`KINDS`: one change each that breaks one rule in one of our own resources -- the kinds of error
issue 15 lists (bindings, invariants, terminology) and a few more -- with the rule id and place
`ruxo-fhir validate` must report, and whether it is an error or a warning.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

Resource = dict[str, Any]


def _timing(res: Resource) -> dict[str, Any]:
    repeat: dict[str, Any] = res["dosage"][0]["timing"]["repeat"]
    return repeat


def _condition_code(system: str) -> Callable[[Resource], None]:
    def change(res: Resource) -> None:
        for coding in res["code"]["coding"]:
            if coding["system"] == system:
                coding["code"] = {"snomed": "396230009", "icd": "M331"}["snomed" if "snomed" in system else "icd"]
    return change


# (id, resource type, needs key, change, rule, location suffix, severity)
KINDS: list[tuple[str, str, str | None, Callable[[Resource], None], str, str, str]] = [
    ("observation-status-done", "Observation", None, lambda r: r.__setitem__("status", "done"),
     "binding", "Observation.status", "error"),
    ("statement-status-finished", "MedicationStatement", None, lambda r: r.__setitem__("status", "finished"),
     "binding", "MedicationStatement.status", "error"),
    ("clinical-status-healed", "Condition", None,
     lambda r: r["clinicalStatus"]["coding"][0].__setitem__("code", "healed"),
     "binding", "Condition.clinicalStatus", "error"),
    ("gender-F", "Patient", None, lambda r: r.__setitem__("gender", "F"), "binding", "Patient.gender", "error"),
    ("period-unit-day", "MedicationStatement", "dosage", lambda r: _timing(r).__setitem__("periodUnit", "day"),
     "binding", "MedicationStatement.dosage[0].timing.repeat.periodUnit", "error"),
    ("period-ends-before-start", "MedicationStatement", "effectivePeriod",
     lambda r: r.__setitem__("effectivePeriod", {"start": "2024-05-14", "end": "2024-01-02"}),
     "per-1", "MedicationStatement.effectivePeriod", "error"),
    ("quantity-code-without-system", "Observation", "valueQuantity", lambda r: r["valueQuantity"].pop("system"),
     "qty-3", "Observation.valueQuantity", "error"),
    ("snomed-check-digit", "Condition", None, _condition_code("http://snomed.info/sct"),
     "snomed-check-digit", "Condition.code.coding[0]", "warning"),
    ("icd10-without-dot", "Condition", None, _condition_code("http://hl7.org/fhir/sid/icd-10"),
     "icd10-format", "Condition.code.coding[1]", "warning"),
    ("system-not-a-uri", "Condition", None, lambda r: r["code"]["coding"][0].__setitem__("system", "snomed"),
     "system-uri", "Condition.code.coding[0]", "warning"),
    ("ucum-unit-invalid", "Observation", "valueQuantity", lambda r: r["valueQuantity"].__setitem__("code", "percent"),
     "ucum", "Observation.valueQuantity", "warning"),
    ("snomed-description-id", "Condition", None,
     lambda r: r["code"]["coding"][0].__setitem__("code", "123456017"),  # partition 01: a description id
     "snomed-partition", "Condition.code.coding[0]", "warning"),
    ("verification-status-without-code", "Condition", None,
     lambda r: r.__setitem__("verificationStatus", {"text": "confirmed"}),
     "binding", "Condition.verificationStatus", "error"),
    ("value-and-data-absent-reason", "Observation", "valueQuantity",
     lambda r: r.__setitem__("dataAbsentReason", {"text": "not asked"}), "obs-6", "Observation", "error"),
    ("negative-timing-period", "MedicationStatement", "dosage", lambda r: _timing(r).__setitem__("period", -1),
     "tim-5", "MedicationStatement.dosage[0].timing.repeat", "error"),
    # beyond the fifteen
    ("language-not-bcp47", "Patient", None, lambda r: r.__setitem__("language", "english"),
     "bcp-47", "Patient.language", "error"),
    ("contained-not-referenced", "Condition", None,
     lambda r: r.__setitem__("contained", [{"resourceType": "Patient", "id": "p1", "gender": "female"}]),
     "dom-3", "Condition", "error"),
    ("identifier-system-not-a-uri", "Patient", None, lambda r: r["identifier"][0].__setitem__("system", "MRN"),
     "system-uri", "Patient.identifier[0].system", "error"),
    ("abated-but-active", "Condition", None, lambda r: r.__setitem__("abatementDateTime", "2024-09-01"),
     "con-4|con-3", "Condition", "error"),
    ("empty-element", "Patient", None, lambda r: r["identifier"][0].__setitem__("period", {}),
     "ele-1", "Patient.identifier[0].period", "error"),
    ("extension-value-and-extensions", "Patient", None,
     lambda r: r.__setitem__("extension", [{"url": "https://x.example/e", "valueString": "a",
                                            "extension": [{"url": "b", "valueString": "c"}]}]),
     "ext-1", "Patient.extension[0]", "error"),
    ("reference-range-empty", "Observation", "valueQuantity",
     lambda r: r.__setitem__("referenceRange", [{"type": {"text": "normal"}}]),
     "obs-3", "Observation.referenceRange[0]", "error"),
    ("period-max-without-period", "MedicationStatement", "dosage",
     lambda r: (_timing(r).pop("period"), _timing(r).__setitem__("periodMax", 3)),
     "tim-6|tim-2", "MedicationStatement.dosage[0].timing.repeat", "error"),
]
