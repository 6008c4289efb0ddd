"""Status codes written by the forward mapping come from the mapping's `statuses` block."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ruxo_fhir import api
from ruxo_fhir.errors import MappingError
from ruxo_fhir.mapping.spec import load_mapping

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = (ROOT / "mappings" / "default.yaml").read_text(encoding="utf-8")
BLOCK = """statuses:
  medication_statement: active
  prior_treatment: completed
  observation: final
  condition_clinical: active
"""


def test_default_mapping_states_the_statuses_it_writes() -> None:
    assert BLOCK in DEFAULT
    s = load_mapping(ROOT / "mappings" / "default.yaml").statuses
    assert (s.medication_statement, s.prior_treatment, s.observation, s.condition_clinical) == (
        "active", "completed", "final", "active")


def test_statuses_from_the_mapping_reach_the_resources(tmp_path: Path) -> None:
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(DEFAULT.replace(BLOCK, BLOCK.replace("medication_statement: active", "medication_statement: completed")
                                       .replace("observation: final", "observation: preliminary")
                                       .replace("condition_clinical: active", "condition_clinical: remission")),
                       encoding="utf-8")
    out = tmp_path / "bundle.json"
    api.import_file(ROOT / "examples" / "cases.csv", out, api.ImportOptions(mapping=mapping))
    resources = [e["resource"] for e in json.loads(out.read_text(encoding="utf-8"))["entry"]]
    observations = {r["status"] for r in resources if r["resourceType"] == "Observation"}
    conditions = {r["clinicalStatus"]["coding"][0]["code"] for r in resources if r["resourceType"] == "Condition"}
    statements = {r["status"] for r in resources if r["resourceType"] == "MedicationStatement"}
    assert observations == {"preliminary"} and conditions == {"remission"}
    assert "completed" in statements and "active" not in statements


def test_a_status_outside_the_required_binding_is_refused(tmp_path: Path) -> None:
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(DEFAULT.replace("observation: final", "observation: done"), encoding="utf-8")
    with pytest.raises(MappingError, match="statuses"):
        load_mapping(mapping)
