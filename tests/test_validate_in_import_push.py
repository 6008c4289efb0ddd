"""The validator's rules run inside import and before push (issue 15).

Import: a site mapping that writes a code outside a required binding gets every affected row
rejected (row and reason in the rejects file); a mapping code with a bad SNOMED CT check digit
gives a warning. Push: a bundle with a resource that breaks a rule is pushed without that case,
which is reported with its case; the server (the real test engine) never sees it.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import requests
from e2e_cli import Run, run_cli
from fhirserver import TestFhirServer

from ruxo_fhir.importer import import_cases
from ruxo_fhir.mapping.spec import load_mapping

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CSV = REPO / "examples" / "cases.csv"
MAPPING = REPO / "mappings" / "default.yaml"


def test_import_rejects_rows_whose_resources_break_a_required_binding_and_warns_on_codes(tmp_path: Path) -> None:
    text = MAPPING.read_text(encoding="utf-8")
    bid = "BID: {frequency: 2, period: 1, period_unit: d,"
    assert bid in text and "396230008" in text
    site = tmp_path / "site.yaml"
    site.write_text(text.replace(bid, "BID: {frequency: 2, period: 1, period_unit: day,")
                    .replace("396230008", "396230009"), encoding="utf-8")
    rejects = tmp_path / "rejects.csv"
    result = import_cases(EXAMPLE_CSV, tmp_path / "out.json", mapping=load_mapping(site), rejects_path=rejects)
    with rejects.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with EXAMPLE_CSV.open(encoding="utf-8", newline="") as fh:
        bid_rows = [r for r in csv.DictReader(fh) if r["frequency"] == "BID"]
    assert bid_rows and len(rows) == len(bid_rows) == result.report.rejected
    for row in rows:
        assert row["frequency"] == "BID" and row["row"].isdigit()
        assert "binding" in row["error"] and "units-of-time" in row["error"] and "periodUnit" in row["error"]
    assert result.report.accepted + result.report.rejected == result.report.total
    assert any("396230009" in w and "check digit" in w for w in result.report.warning_lines())


@pytest.mark.e2e
def test_push_leaves_out_a_case_whose_resource_breaks_a_rule(fhir_server: TestFhirServer, tmp_path: Path) -> None:
    state = tmp_path / "state"
    bundle_path = tmp_path / "example.json"
    imported = run_cli(Run, "import", EXAMPLE_CSV, "-o", bundle_path, state=state)
    assert imported.exit_code == 0, imported
    bundle = json.loads(bundle_path.read_text(encoding="utf-8"))
    broken = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation")
    broken["status"] = "done"
    bundle_path.write_text(json.dumps(bundle), encoding="utf-8")

    run = run_cli(Run, "push", bundle_path, "--server", fhir_server.base_url, state=state)
    assert run.exit_code == 1, run
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if "not sent" in line]
    assert lines and all("case C" in line for line in lines), run
    assert any("Observation.status" in line and "binding" in line for line in lines), run
    got = requests.get(f"{fhir_server.base_url}/Observation/{broken['id']}", timeout=30)
    assert got.status_code == 404  # never sent
    total = len(bundle["entry"])
    counts = requests.get(f"{fhir_server.root_url}/$admin/count", timeout=30).json()
    assert 0 < sum(counts.values()) < total


@pytest.mark.e2e
def test_push_in_batch_mode_leaves_out_only_the_invalid_resource(fhir_server: TestFhirServer, tmp_path: Path) -> None:
    state = tmp_path / "state"
    bundle_path = tmp_path / "example.json"
    assert run_cli(Run, "import", EXAMPLE_CSV, "-o", bundle_path, state=state).exit_code == 0
    bundle = json.loads(bundle_path.read_text(encoding="utf-8"))
    broken = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    broken["gender"] = "F"
    bundle_path.write_text(json.dumps(bundle), encoding="utf-8")

    run = run_cli(Run, "push", bundle_path, "--server", fhir_server.base_url, "--mode", "batch", state=state)
    assert run.exit_code == 1, run
    lines = [line for line in run.stderr.splitlines() if "not sent" in line]
    assert len(lines) == 1 and f"Patient/{broken['id']}" in lines[0] and "binding" in lines[0], run
    counts = requests.get(f"{fhir_server.root_url}/$admin/count", timeout=30).json()
    assert sum(counts.values()) == len(bundle["entry"]) - 1
    got = requests.get(f"{fhir_server.base_url}/Patient/{broken['id']}", timeout=30)
    assert got.status_code == 404
