"""Outcomes end to end: the seed's numbers from every source, the rule through FHIR, write-back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from engines import both_engines_fixture

from ruxo_fhir.bundle import iter_resources
from ruxo_fhir.importer import source_resources
from ruxo_fhir.mapping import load_mapping
from ruxo_fhir.outcomes import compute_outcomes

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cases.csv"
HEADER = ("case_id,patient_id,sex,birth_date,indication,site,disease_onset,prior_treatments,"
          "treatment_start,frequency,evaluation_date,improvement_pct,score_name,baseline_score,"
          "followup_score,adverse_events,recurrence_after_stop")

# The server tests here (outcomes from the server, write-back) run on both real engines.
fhir_server = both_engines_fixture()


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "ruxo_fhir", *args], capture_output=True, text=True,
                          env=full_env, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def outcomes_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = run("outcomes", *args, "--format", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # stdout holds only the document


def _comparable(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: doc[k] for k in ("rule_version", "cases", "summary", "by_indication", "by_group")}


@pytest.fixture(scope="module")
def example_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ex") / "bundle.json"
    proc = run("import", str(EXAMPLE), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_example_matches_the_seed(example_bundle: Path) -> None:
    doc = outcomes_json(str(EXAMPLE))
    s = doc["summary"]
    assert (s["n"], s["complete"], s["partial"], s["none"], s["not_evaluable"]) == (12, 6, 5, 1, 0)
    assert s["response_rate"] == round(11 / 12, 4)
    lo, hi = s["response_rate_ci95"]
    assert abs(lo - 0.6152) < 1e-4 and abs(hi - 0.9979) < 1e-4
    assert s["mean_months_to_evaluation"] == pytest.approx(2.5, abs=0.05)
    assert len(doc["by_indication"]) == 9
    assert doc["by_indication"]["dermatomyositis"] == {"n": 4, "complete": 1, "partial": 3, "none": 0,
                                                        "not_evaluable": 0}
    groups = doc["by_group"]
    assert len(groups) == 8
    assert groups["dermatomyositis"] == 4 and groups["chronic cutaneous lupus"] == 2
    assert sorted(v for k, v in groups.items() if k not in ("dermatomyositis", "chronic cutaneous lupus")) == [1] * 6
    ids = [c["case_id"] for c in doc["cases"]]
    assert sorted(ids) == [f"C{i:02d}" for i in range(1, 13)]
    for case in doc["cases"]:
        assert set(case) >= {"case_id", "indication", "site", "improvement_pct", "category", "months_to_evaluation"}
    assert doc["rule_version"] and isinstance(doc["warnings"], list)


def test_same_answer_from_csv_bundle_and_ndjson(example_bundle: Path, tmp_path: Path) -> None:
    nd = tmp_path / "nd"
    assert run("import", str(EXAMPLE), "-o", str(nd), "--format", "ndjson").returncode == 0
    r5 = tmp_path / "r5.json"
    assert run("import", str(EXAMPLE), "-o", str(r5), "--fhir-version", "R5").returncode == 0
    docs = [_comparable(outcomes_json(str(src))) for src in (EXAMPLE, example_bundle, nd, r5)]
    assert all(d == docs[0] for d in docs[1:])


def test_same_answer_from_the_server_after_a_push(example_bundle: Path, fhir_server: Any, tmp_path: Path) -> None:
    env = {"RUXO_FHIR_STATE_DIR": str(tmp_path / "state")}
    assert run("push", str(example_bundle), "--server", fhir_server.base_url, env=env).returncode == 0
    from_server = outcomes_json("--server", fhir_server.base_url, env=env)
    assert _comparable(from_server) == _comparable(outcomes_json(str(EXAMPLE)))


def test_write_back_to_server_is_idempotent(example_bundle: Path, fhir_server: Any, tmp_path: Path) -> None:
    env = {"RUXO_FHIR_STATE_DIR": str(tmp_path / "state")}
    assert run("push", str(example_bundle), "--server", fhir_server.base_url, env=env).returncode == 0
    before = requests.get(f"{fhir_server.root_url}/$admin/count", timeout=10).json()["Observation"]
    for _ in range(2):
        proc = run("outcomes", "--server", fhir_server.base_url, "--write-back", "--format", "csv", env=env)
        assert proc.returncode == 0, proc.stderr
    after = requests.get(f"{fhir_server.root_url}/$admin/count", timeout=10).json()["Observation"]
    assert after - before == 12  # one per case and evaluation, not 24
    bundle = requests.get(f"{fhir_server.base_url}/Observation", params={
        "identifier": "https://ruxo-fhir.example/sid/case-resource|C12:response-2024-11-14"}, timeout=10).json()
    (entry,) = bundle["entry"]
    obs = entry["resource"]
    assert obs["valueCodeableConcept"]["text"] == "none"
    assert obs["derivedFrom"] and obs["derivedFrom"][0]["reference"].startswith("Observation/")
    assert "ruxo-response-1.0" in obs["method"]["text"]
    # derived outcomes do not disturb the cohort's own result
    again = outcomes_json("--server", fhir_server.base_url, env=env)
    assert again["summary"]["complete"] == 6 and again["summary"]["n"] == 12


def test_write_back_into_a_bundle_validates(example_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "responses.json"
    proc = run("outcomes", str(example_bundle), "--write-back", "-o", str(out), "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    derived = list(iter_resources(out))
    assert len(derived) == 12
    codes = {o["valueCodeableConcept"]["coding"][0]["code"] for o in derived}
    assert codes == {"103338009", "103337004", "no-response"}
    assert run("validate", str(out)).returncode == 0
    first = out.read_bytes()
    run("outcomes", str(example_bundle), "--write-back", "-o", str(out), "--format", "csv")
    assert out.read_bytes() == first  # stable ids: same bytes


def _cohort(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "cases.csv"
    path.write_text(HEADER + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_rule_boundaries_through_fhir(tmp_path: Path) -> None:
    """Each boundary of the rule, from CSV values through FHIR Observations."""
    base = "P{0},F,1970,dermatomyositis,face,,,2024-05-01,BID,2024-06-01,{1},{2},{3},{4},,"
    cases = {
        "A": ("39.99", "", "", "", "none"), "B": ("40", "", "", "", "partial"),
        "C": ("80", "", "", "", "partial"), "D": ("80.01", "", "", "", "complete"),
        "E": ("-10", "", "", "", "none"), "F": ("100", "", "", "", "complete"),
        "G": ("", "CDASI", "8.1", "4.86", "partial"),   # exactly 40 from the score pair
        "H": ("", "CDASI", "0", "3", "not_evaluable"),  # baseline 0
        "I": ("", "", "", "", "not_evaluable"),          # evaluation date, no value
        "J": ("", "CDASI", "", "4", "not_evaluable"),    # score without a baseline
    }
    rows = [f"{k}," + base.format(i, *v[:4]) for i, (k, v) in enumerate(cases.items())]
    doc = outcomes_json(str(_cohort(tmp_path, rows)))
    got = {c["case_id"]: c["category"] for c in doc["cases"]}
    assert got == {k: v[4] for k, v in cases.items()}
    by_id = {c["case_id"]: c for c in doc["cases"]}
    assert by_id["G"]["improvement_pct"] == 40.0
    assert by_id["H"]["improvement_pct"] is None
    assert by_id["I"]["months_to_evaluation"] == 1.0
    assert any("baseline score is 0" in w for w in doc["warnings"])
    assert any("J" in w and "baseline" in w for w in doc["warnings"])
    s = doc["summary"]
    assert s["not_evaluable"] == 3 and s["n"] == 10
    assert s["response_rate"] == round(5 / 7, 4)


def test_data_quality_warnings(tmp_path: Path) -> None:
    path = _cohort(tmp_path, ["X1,P1,F,,morphea,,,,2024-05-01,BID,,,,,,,"])
    doc = outcomes_json(str(path))
    assert doc["cases"][0]["category"] == "not_evaluable"
    assert doc["cases"][0]["months_to_evaluation"] is None
    assert any("X1" in w and "no evaluation" in w for w in doc["warnings"])


def test_latest_evaluation_counts_and_unit_is_checked(example_bundle: Path, tmp_path: Path) -> None:
    bundle = json.loads(example_bundle.read_text())
    imp = next(e["resource"] for e in bundle["entry"]
               if e["resource"]["resourceType"] == "Observation"
               and e["resource"]["identifier"][0]["value"] == "C12:improvement")
    later = json.loads(json.dumps(imp))
    later["id"] = "later-eval"
    later["identifier"] = [{"system": imp["identifier"][0]["system"], "value": "C12:improvement-2025-03-01"}]
    later["effectiveDateTime"] = "2025-03-01"
    later["valueQuantity"] = {"value": 0.9, "unit": "1", "system": "http://unitsofmeasure.org", "code": "1"}
    bundle["entry"].append({"resource": later})
    path = tmp_path / "two-evals.json"
    path.write_text(json.dumps(bundle))
    doc = outcomes_json(str(path))
    c12 = next(c for c in doc["cases"] if c["case_id"] == "C12")
    assert c12["improvement_pct"] == 0.9  # the latest evaluation counts
    assert any("C12" in w and "latest" in w for w in doc["warnings"])
    assert any("C12" in w and "'1'" in w for w in doc["warnings"])


def test_table_markdown_csv_and_plot(example_bundle: Path, tmp_path: Path) -> None:
    table = run("outcomes", str(example_bundle), "--format", "table")
    assert table.returncode == 0
    assert "Table I" in table.stdout and "Table II" in table.stdout
    assert "chronic cutaneous lupus  2" in table.stdout
    assert "11/12" in table.stdout and "61.5%" in table.stdout and "99.8%" in table.stdout
    md = run("outcomes", str(example_bundle), "--format", "markdown").stdout
    assert "| indication group | n |" in md
    csv_out = run("outcomes", str(example_bundle), "--format", "csv").stdout.splitlines()
    assert csv_out[0].startswith("case_id,indication") and len(csv_out) == 13
    png = tmp_path / "plot.png"
    proc = run("outcomes", str(example_bundle), "--format", "csv", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_source_or_server_is_required() -> None:
    proc = run("outcomes")
    assert proc.returncode == 2
    assert "SOURCE" in proc.stderr


def test_library_use_without_cli() -> None:
    mapping = load_mapping()
    result = compute_outcomes(source_resources(EXAMPLE, mapping), mapping)
    assert result.summary["complete"] == 6
