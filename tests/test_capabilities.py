"""The one CapabilityStatement reader and the data version guard (unit level, spec shapes)."""
from __future__ import annotations

import pytest

from ruxo_fhir.errors import CapabilityError
from ruxo_fhir.fhir_version import data_version, to_version
from ruxo_fhir.sync.capabilities import (
    WRITTEN_TYPES,
    Capabilities,
    DataVersionGuard,
    preflight_types,
    server_interactions,
)

# Shaped as HAPI FHIR JPA 8 writes its statement (trimmed): every type, all interactions.
HAPI_LIKE = {
    "resourceType": "CapabilityStatement", "fhirVersion": "4.0.1", "kind": "instance",
    "rest": [{"mode": "server", "interaction": [{"code": "transaction"}, {"code": "batch"},
                                                 {"code": "search-system"}, {"code": "history-system"}],
              "operation": [{"name": "export", "definition": "..."}],
              "resource": [{"type": t, "interaction": [{"code": c} for c in (
                  "read", "vread", "update", "patch", "delete", "history-instance", "create", "search-type")],
                  "updateCreate": True, "conditionalCreate": True, "conditionalUpdate": True,
                  "searchParam": [{"name": "_id"}, {"name": "_lastUpdated"}],
                  "operation": [{"name": "validate"}]}
                  for t in ("Patient", "Condition", "MedicationStatement", "Observation", "AdverseEvent")]}],
}


def test_reader() -> None:
    caps = Capabilities.read(HAPI_LIKE)
    assert caps.fhir_version == "4.0.1"
    assert {"transaction", "batch"} <= caps.system_interactions
    assert {"export", "validate"} <= caps.operations
    assert set(caps.resources) == set(WRITTEN_TYPES)
    patient = caps.resources["Patient"]
    assert patient.update_create is True and "_lastUpdated" in patient.search_params
    assert caps.missing_interactions("Patient", ("update", "search-type")) == []
    assert caps.missing_interactions("Basic", ("update",)) is None
    assert server_interactions(HAPI_LIKE) == set(caps.system_interactions)
    # client mode entries and junk are ignored
    odd = {"fhirVersion": "4.0.1", "rest": [{"mode": "client", "interaction": [{"code": "transaction"}]}, "x"]}
    assert Capabilities.read(odd).system_interactions == frozenset()


def test_preflight() -> None:
    caps = Capabilities.read(HAPI_LIKE)
    preflight_types(caps, WRITTEN_TYPES)  # all there
    no_update = {**HAPI_LIKE, "rest": [{**HAPI_LIKE["rest"][0], "resource": [  # type: ignore[dict-item]
        {"type": "Patient", "interaction": [{"code": "read"}, {"code": "create"}]}]}]}
    with pytest.raises(CapabilityError, match="update interaction for Patient"):
        preflight_types(Capabilities.read(no_update), ["Patient"])
    with pytest.raises(CapabilityError, match="does not list Observation"):
        preflight_types(Capabilities.read(no_update), ["Observation"])
    # a statement that lists no resources (or no interactions for a type) is not a refusal
    preflight_types(Capabilities.read({"fhirVersion": "4.0.1", "rest": [{"mode": "server"}]}), ["Patient"])
    silent = {"fhirVersion": "4.0.1", "rest": [{"mode": "server", "resource": [{"type": "Patient"}]}]}
    preflight_types(Capabilities.read(silent), ["Patient"])


def test_data_version_markers() -> None:
    ms = {"resourceType": "MedicationStatement", "id": "m", "status": "active",
          "medicationCodeableConcept": {"text": "ruxolitinib"}, "subject": {"reference": "Patient/p"}}
    ae = {"resourceType": "AdverseEvent", "id": "a", "actuality": "actual", "identifier": {"value": "x"},
          "event": {"text": "burning"}, "subject": {"reference": "Patient/p"}}
    assert data_version(ms) == ("R4", "MedicationStatement.medicationCodeableConcept")
    assert data_version(to_version(ms, "R5")) == ("R5", "MedicationStatement.medication")
    assert data_version(ae) == ("R4", "AdverseEvent.event")
    assert data_version(to_version(ae, "R5"))[0] == "R5"  # type: ignore[index]
    assert data_version({"resourceType": "Patient", "gender": "female"}) is None
    assert data_version({"resourceType": "MedicationStatement", "status": "recorded"}) == (
        "R5", "MedicationStatement.status")
    assert data_version({"resourceType": "AdverseEvent", "identifier": [{"value": "x"}]}) == (
        "R5", "AdverseEvent.identifier")


def test_guard() -> None:
    r5 = to_version({"resourceType": "MedicationStatement", "id": "m", "status": "active",
                     "medicationCodeableConcept": {"text": "x"}}, "R5")
    r4 = {"resourceType": "Condition", "id": "c", "recorder": {"reference": "Practitioner/x"}}
    with pytest.raises(CapabilityError, match=r"FHIR R5 .*4\.0\.1 \(R4\)") as err:
        DataVersionGuard("4.0.1").check(r5)
    assert err.value.exit_code == 5
    with pytest.raises(CapabilityError, match="FHIR R4"):
        DataVersionGuard("5.0.0").check(r4)
    with pytest.raises(CapabilityError):
        DataVersionGuard("4.3.0").check(r5)  # R4B takes R4 shapes only
    DataVersionGuard("4.3.0").check(r4)
    DataVersionGuard("5.0.0").check(r5)
    DataVersionGuard("").check(r5)  # a statement without fhirVersion: not checked
    DataVersionGuard("4.0.1").check({"resourceType": "Patient", "id": "p"})
