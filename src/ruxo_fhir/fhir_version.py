"""R4 vs R5: the one place that knows how the two versions differ for our resources.

The mapping always produces R4 shapes; `to_version` rewrites them for R5 output and
`to_r4` rewrites R5 input back, so forward, reverse and outcomes code stay single-version.
fhir.resources' `R4B` models validate R4 shapes (R4B changed none of the elements we use);
its default package is R5.
"""
from __future__ import annotations

import copy
from typing import Any, Literal

from ruxo_fhir.resource import Resource

FhirVersion = Literal["R4", "R5"]
VERSIONS: tuple[FhirVersion, ...] = ("R4", "R5")

# CapabilityStatement.fhirVersion prefixes per output version; 4.3.x (R4B) takes R4 output
# with a warning because our resources' R4 elements are unchanged in R4B.
SERVER_VERSIONS: dict[FhirVersion, tuple[str, ...]] = {"R4": ("4.0.",), "R5": ("5.0.",)}
COMPATIBLE_WITH_WARNING: dict[FhirVersion, tuple[str, ...]] = {"R4": ("4.3.",), "R5": ()}


def normalise_version(value: str) -> FhirVersion:
    upper = value.strip().upper()
    if upper in ("R4", "4", "4.0", "4.0.1"):
        return "R4"
    if upper in ("R5", "5", "5.0", "5.0.0"):
        return "R5"
    raise ValueError(f"unsupported FHIR version {value!r} (expected R4 or R5)")


def server_compatibility(version: FhirVersion, server_fhir_version: str) -> str | None:
    """None when compatible, 'warn' for R4B-with-R4, else 'refuse'."""
    if server_fhir_version.startswith(SERVER_VERSIONS[version]):
        return None
    if server_fhir_version.startswith(COMPATIBLE_WITH_WARNING[version]):
        return "warn"
    return "refuse"


# Elements (and shapes) that exist in one version only, for the resource types ruxo-fhir writes:
# what lets the DATA say which version it is, whatever a flag claims. From the R4 (4.0.1) and R5
# (5.0.0) resource definitions; only unambiguous markers are listed.
_ONLY_IN: dict[FhirVersion, dict[str, tuple[str, ...]]] = {
    "R4": {
        "MedicationStatement": ("medicationCodeableConcept", "medicationReference", "reasonCode",
                                "reasonReference", "statusReason", "basedOn", "context"),
        "AdverseEvent": ("event", "date", "resultingCondition", "severity", "contributor",
                         "subjectMedicalHistory", "referenceDocument"),
        "Condition": ("asserter", "recorder"),
    },
    "R5": {
        "MedicationStatement": ("medication", "reason", "encounter", "adherence",
                                "relatedClinicalInformation", "renderedDosageInstruction"),
        "AdverseEvent": ("code", "status", "occurrenceDateTime", "occurrencePeriod", "occurrenceTiming",
                         "participant", "mitigatingAction", "supportingInfo", "expectedInResearchStudy",
                         "contributingFactor", "preventiveAction", "resultingEffect"),
        "Condition": ("participant",),
        "Observation": ("triggeredBy", "bodyStructure", "instantiatesCanonical", "instantiatesReference"),
    },
}
# MedicationStatement.status value sets do not overlap except entered-in-error.
_STATUS_ONLY_IN: dict[FhirVersion, frozenset[str]] = {
    "R4": frozenset({"active", "completed", "intended", "stopped", "on-hold", "unknown", "not-taken"}),
    "R5": frozenset({"recorded", "draft"}),
}


def data_version(resource: Resource) -> tuple[FhirVersion, str] | None:
    """(version, evidence) when the resource's shape belongs to one FHIR version only, e.g.
    ("R5", "MedicationStatement.medication"); None when it fits both (or is a type we do not
    know). The evidence names an element, never a value of the data."""
    kind = str(resource.get("resourceType", ""))
    for version in VERSIONS:
        for element in _ONLY_IN[version].get(kind, ()):
            if element in resource:
                return version, f"{kind}.{element}"
    if kind == "MedicationStatement":
        status = resource.get("status")
        for version in VERSIONS:
            if status in _STATUS_ONLY_IN[version]:
                return version, "MedicationStatement.status"
    if kind == "AdverseEvent" and "identifier" in resource:
        # R4: identifier 0..1 (an object); R5: 0..* (a list)
        return ("R5" if isinstance(resource["identifier"], list) else "R4"), "AdverseEvent.identifier"
    return None


def version_of_server(server_fhir_version: str) -> str:
    """A readable name for a CapabilityStatement.fhirVersion: "4.0.1 (R4)", "4.3.0 (R4B)"."""
    for name, prefixes in (("R4", ("4.0.",)), ("R4B", ("4.3.",)), ("R5", ("5.0.",))):
        if server_fhir_version.startswith(prefixes):
            return f"{server_fhir_version} ({name})"
    return server_fhir_version


def model_class(version: FhirVersion, resource_type: str) -> Any:
    """The fhir.resources pydantic model that validates `resource_type` in `version`."""
    if version == "R4":
        from fhir.resources.R4B import get_fhir_model_class as r4_get

        return r4_get(resource_type)
    from fhir.resources import get_fhir_model_class as r5_get

    return r5_get(resource_type)


def _statement_status_r5(status: str) -> str:
    # R5 MedicationStatement.status is recorded | entered-in-error | draft.
    return "entered-in-error" if status == "entered-in-error" else "recorded"


def to_version(resource: Resource, version: FhirVersion, *, in_place: bool = False) -> Resource:
    """Rewrite one R4-shaped resource for `version` (R4: returned as is).

    A copy is rewritten, unless `in_place`: for a resource just built by the forward mapping
    and owned by the caller (the import), whose top-level keys and AdverseEvent
    `suspectEntity` entries (the only nested values rewritten) are its own.
    """
    if version == "R4":
        return resource
    res = resource if in_place else copy.deepcopy(resource)
    kind = res.get("resourceType")
    if kind == "MedicationStatement":
        res["status"] = _statement_status_r5(res.get("status", "recorded"))
        if "medicationCodeableConcept" in res:
            res["medication"] = {"concept": res.pop("medicationCodeableConcept")}
        elif "medicationReference" in res:
            res["medication"] = {"reference": res.pop("medicationReference")}
        reasons = [{"reference": r} for r in res.pop("reasonReference", [])]
        reasons += [{"concept": c} for c in res.pop("reasonCode", [])]
        if reasons:
            res["reason"] = reasons
    elif kind == "AdverseEvent":
        ident = res.pop("identifier", None)
        if ident:
            res["identifier"] = [ident]
        res.setdefault("status", "completed")
        if "event" in res:
            res["code"] = res.pop("event")
        if "date" in res:
            res["occurrenceDateTime"] = res.pop("date")
        for suspect in res.get("suspectEntity", []):
            if "instance" in suspect:
                suspect["instanceReference"] = suspect.pop("instance")
    return res


def to_r4(resource: Resource) -> Resource:
    """Rewrite an R5-shaped resource to the R4 shape reverse mapping reads (R4 passes through)."""
    kind = resource.get("resourceType")
    if kind == "MedicationStatement" and "medication" in resource:
        res = copy.deepcopy(resource)
        med = res.pop("medication")
        if "concept" in med:
            res["medicationCodeableConcept"] = med["concept"]
        if "reference" in med:
            res["medicationReference"] = med["reference"]
        reasons = res.pop("reason", [])
        refs = [r["reference"] for r in reasons if "reference" in r]
        codes = [r["concept"] for r in reasons if "concept" in r]
        if refs:
            res["reasonReference"] = refs
        if codes:
            res["reasonCode"] = codes
        if res.get("status") == "recorded":
            res["status"] = "active"
        return res
    if kind == "AdverseEvent" and ("code" in resource or isinstance(resource.get("identifier"), list)):
        res = copy.deepcopy(resource)
        idents = res.pop("identifier", None)
        if isinstance(idents, list) and idents:
            res["identifier"] = idents[0]
        if "code" in res:
            res["event"] = res.pop("code")
        if "occurrenceDateTime" in res:
            res["date"] = res.pop("occurrenceDateTime")
        res.pop("status", None)
        for suspect in res.get("suspectEntity", []):
            if "instanceReference" in suspect:
                suspect["instance"] = suspect.pop("instanceReference")
        return res
    return resource
