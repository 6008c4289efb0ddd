"""EHR mode, the parts without a server: the `patients:` mapping block (create | link |
link-or-create) and readers leaving entered-in-error resources out (issue 12)."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import DEFAULT_MAPPING, EXAMPLE_CSV, PATIENT_SYSTEM

from ruxo_fhir.errors import MappingError
from ruxo_fhir.exporter import read_cases
from ruxo_fhir.importer import import_cases
from ruxo_fhir.mapping.spec import load_mapping
from ruxo_fhir.outcomes import compute_outcomes

MRN = "https://hospital.example/sid/mrn"


def mapping_file(tmp_path: Path, block: str, name: str = "site.yaml") -> Path:
    text = DEFAULT_MAPPING.read_text(encoding="utf-8")
    path = tmp_path / name
    path.write_text(text.replace("identifier_systems:\n", block + "\nidentifier_systems:\n", 1), encoding="utf-8")
    return path


def imported(tmp_path: Path, mapping_path: Path | None) -> list[dict[str, Any]]:
    mapping = load_mapping(mapping_path)
    out = tmp_path / "out.json"
    import_cases(EXAMPLE_CSV, out, mapping=mapping)
    return [e["resource"] for e in json.loads(out.read_text())["entry"]]


def subjects(resources: list[dict[str, Any]]) -> set[str]:
    return {r["subject"]["reference"] for r in resources if "subject" in r}


def test_default_mode_is_create(tmp_path: Path) -> None:
    mapping = load_mapping(None)
    assert mapping.patients.mode == "create" and mapping.patient_system == PATIENT_SYSTEM
    resources = imported(tmp_path, None)
    assert sum(r["resourceType"] == "Patient" for r in resources) == 12
    assert all(ref.startswith("Patient/") for ref in subjects(resources))


def test_link_mode_writes_no_patient_and_references_by_mrn(tmp_path: Path) -> None:
    path = mapping_file(tmp_path, f"patients:\n  mode: link\n  match_system: {MRN}\n")
    mapping = load_mapping(path)
    assert mapping.patients.mode == "link" and mapping.patient_system == MRN
    resources = imported(tmp_path, path)
    assert not [r for r in resources if r["resourceType"] == "Patient"]
    refs = subjects(resources)
    assert refs == {f"Patient?identifier={MRN}|P{i:02d}" for i in range(1, 13)}
    # outcomes and export read such a file the same way (the EHR's Patient is not in it)
    out = compute_outcomes(resources, mapping)
    assert (out.summary["complete"], out.summary["partial"], out.summary["none"]) == (6, 5, 1)
    records, _ = read_cases(tmp_path / "out.json", mapping)
    assert [r.patient_id for r in records] == [f"P{i:02d}" for i in range(1, 13)]


def test_link_or_create_patients_carry_the_match_identifier(tmp_path: Path) -> None:
    path = mapping_file(tmp_path, f"patients:\n  mode: link-or-create\n  match_system: {MRN}\n")
    resources = imported(tmp_path, path)
    patients = [r for r in resources if r["resourceType"] == "Patient"]
    assert len(patients) == 12
    for p in patients:
        systems = {i["system"]: i["value"] for i in p["identifier"]}
        assert systems[MRN] == systems[PATIENT_SYSTEM]
    assert all(ref.startswith("Patient/") for ref in subjects(resources))
    records, _ = read_cases(tmp_path / "out.json", load_mapping(path))
    assert len(records) == 12 and records[0].sex == "F"


@pytest.mark.parametrize("block, key", [
    ("patients:\n  mode: link\n", "patients"),
    (f"patients:\n  mode: adopt\n  match_system: {MRN}\n", "patients.mode"),
    (f"patients:\n  mode: link\n  match_sytem: {MRN}\n", "patients"),
])
def test_bad_patients_block_is_one_mapping_error(tmp_path: Path, block: str, key: str) -> None:
    path = mapping_file(tmp_path, block)
    with pytest.raises(MappingError) as err:
        load_mapping(path)
    assert str(path) in str(err.value) and key in str(err.value)


# --- entered-in-error ------------------------------------------------------------------------

def retract(resource: dict[str, Any]) -> None:
    if resource["resourceType"] == "Condition":
        resource["verificationStatus"]["coding"][0]["code"] = "entered-in-error"
        resource.pop("clinicalStatus")  # con-5
    else:
        resource["status"] = "entered-in-error"


def test_outcomes_and_export_leave_entered_in_error_out(tmp_path: Path) -> None:
    mapping = load_mapping(None)
    resources = imported(tmp_path, None)
    before = compute_outcomes(resources, mapping)
    changed = copy.deepcopy(resources)
    # C12 (none, 10 %) withdrawn: its statement, Condition and Observation retracted
    withdrawn = [r for r in changed if "C12" in json.dumps(r.get("identifier"))]
    assert {r["resourceType"] for r in withdrawn} >= {"MedicationStatement", "Condition", "Observation"}
    for r in withdrawn:
        retract(r)
    after = compute_outcomes(changed, mapping)
    assert before.summary["n"] == 12 and after.summary["n"] == 11
    assert after.summary["none"] == before.summary["none"] - 1
    assert any(f"left out {len(withdrawn)} entered-in-error" in w for w in after.warnings)

    bundle = tmp_path / "retracted.json"
    bundle.write_text(json.dumps({"resourceType": "Bundle", "type": "collection",
                                  "entry": [{"resource": r} for r in changed]}))
    records, assembler = read_cases(bundle, mapping)
    assert [r.case_id for r in records] == [f"C{i:02d}" for i in range(1, 12)]
    assert assembler.retracted == len(withdrawn)


def test_a_retracted_observation_alone_changes_the_evaluation(tmp_path: Path) -> None:
    mapping = load_mapping(None)
    resources = imported(tmp_path, None)
    for r in resources:
        if r["resourceType"] == "Observation" and r["identifier"][0]["value"] == "C01:improvement":
            retract(r)
    out = compute_outcomes(resources, mapping)
    c01 = next(c for c in out.cases if c.case_id == "C01")
    assert c01.category == "not_evaluable"


# --- the shipped example identifier systems on a shared server --------------------------------

def test_example_systems_warning_only_off_loopback(tmp_path: Path) -> None:
    from ruxo_fhir.sync.push import shared_systems_warning

    shipped = load_mapping(None)
    assert len(shipped.example_identifier_systems()) == 3
    for url in ("http://127.0.0.1:8080/fhir", "http://localhost/fhir", "http://[::1]:9/fhir"):
        assert shared_systems_warning(shipped, url) is None
    said = shared_systems_warning(shipped, "https://ehr.hospital.org/fhir")
    assert said is not None and "https://ruxo-fhir.example/sid/case-id" in said

    own = tmp_path / "own.yaml"
    own.write_text(DEFAULT_MAPPING.read_text(encoding="utf-8").replace("ruxo-fhir.example/sid",
                                                                       "derm.chu-site.fr/sid"), encoding="utf-8")
    assert shared_systems_warning(load_mapping(own), "https://ehr.hospital.org/fhir") is None
