"""No silent loss: renamed or missing columns, fraction exports, foreign evaluations, empty cohorts."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    CANONICAL,
    EXAMPLE_CSV,
    RESOURCE_SYSTEM,
    case_row,
    default_mapping_data,
    invoke,
    load_json,
    read_csv_rows,
    write_cases,
    write_mapping,
)


def example_rows() -> list[dict[str, str]]:
    return read_csv_rows(EXAMPLE_CSV)


def renamed(tmp_path: Path, new: str | None) -> Path:
    """The example with the improvement_pct header renamed to `new` (None: the column dropped)."""
    rows = example_rows()
    columns = [new if c == "improvement_pct" else c for c in CANONICAL if new or c != "improvement_pct"]
    if new:
        for r in rows:
            r[new] = r.pop("improvement_pct")
    else:
        for r in rows:
            r.pop("improvement_pct")
    return write_cases(tmp_path / "cases.csv", rows, columns=columns)


def test_a_renamed_column_is_named_with_a_close_match(tmp_path: Path) -> None:
    src = renamed(tmp_path, "improvement_percent")
    result = invoke("import", src, "-o", tmp_path / "b.json")
    assert result.exit_code == 0, str(result)
    line = next(ln for ln in result.stderr_lines if "improvement_percent" in ln)
    assert "did you mean improvement_pct?" in line
    assert "improvement_pct is missing from the header" in line
    # --strict: the same warning ends the run with exit 1 (the output is still written)
    strict = invoke("import", src, "-o", tmp_path / "s.json", "--strict")
    assert strict.exit_code == 1, str(strict)
    assert (tmp_path / "s.json").is_file()
    assert "--strict" in strict.last_stderr_line

    # outcomes then says how many cases are not evaluable and why, in every format
    doc = json.loads(invoke("outcomes", tmp_path / "b.json", "--format", "json").stdout)
    assert doc["summary"]["not_evaluable"] == 10  # the two scored cases are still evaluable
    warning = next(w for w in doc["warnings"] if "not evaluable" in w and "10 of 12" in w)
    assert "evaluation without an improvement value" in warning
    table = invoke("outcomes", tmp_path / "b.json", "--format", "table")
    assert "10 of 12 case(s) not evaluable" in table.stdout
    assert "10 of 12 case(s) not evaluable" in invoke("outcomes", tmp_path / "b.json", "--format", "markdown").stdout
    csv_lines = invoke("outcomes", tmp_path / "b.json", "--format", "csv").stdout.splitlines()
    assert csv_lines[0].endswith("not_evaluable_reason")
    assert sum("evaluation without an improvement value" in ln for ln in csv_lines) == 10
    assert table.exit_code == 0
    assert invoke("outcomes", tmp_path / "b.json", "--format", "json", "--strict").exit_code == 1


def test_a_dropped_column_is_named(tmp_path: Path) -> None:
    src = renamed(tmp_path, None)
    result = invoke("import", src, "-o", tmp_path / "b.json")
    assert result.exit_code == 0
    assert any("missing from the header" in ln and "improvement_pct" in ln for ln in result.stderr_lines), str(result)


def test_a_full_header_gives_no_column_warning(tmp_path: Path) -> None:
    result = invoke("import", EXAMPLE_CSV, "-o", tmp_path / "b.json", "--strict")
    assert result.exit_code == 0, str(result)
    assert not any("warning" in ln for ln in result.stderr_lines)


@pytest.mark.parametrize("broken", ["columns.improvement_pct", "project_systems.score",
                                    "observations.recurrence.code", "observations.response.categories.none"])
def test_a_mapping_missing_a_needed_key_is_refused_at_load(tmp_path: Path, broken: str) -> None:
    data = default_mapping_data()
    *parents, last = broken.split(".")
    node: Any = data
    for key in parents:
        node = node[key]
    del node[last]
    mapping = write_mapping(tmp_path / "site.yaml", data)
    result = invoke("import", EXAMPLE_CSV, "-o", tmp_path / "b.json", "--mapping", mapping)
    assert result.exit_code == 3, str(result)
    assert len(result.stderr_lines) == 1 and broken in result.stderr and "site.yaml" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "b.json").exists()


def test_fractions_in_a_percentage_column_are_flagged(tmp_path: Path) -> None:
    rows = example_rows()
    for r in rows:
        r["improvement_pct"] = str(int(r["improvement_pct"]) / 100)
    src = write_cases(tmp_path / "fractions.csv", rows)
    result = invoke("import", src, "-o", tmp_path / "b.json")
    assert result.exit_code == 0
    assert any("improvement_pct" in ln and "between 0 and 1" in ln for ln in result.stderr_lines), str(result)
    doc = json.loads(invoke("outcomes", tmp_path / "b.json", "--format", "json").stdout)
    assert any("improvement_pct" in w and "between 0 and 1" in w for w in doc["warnings"])
    # real percentages, one of them below 1, are not flagged
    ok_rows = example_rows()
    ok_rows[0]["improvement_pct"] = "0.5"
    ok = invoke("import", write_cases(tmp_path / "ok.csv", ok_rows), "-o", tmp_path / "ok.json")
    assert not any("between 0 and 1" in ln for ln in ok.stderr_lines)


def _with_foreign_evaluation(bundle: Path, out: Path) -> Path:
    """Another application's Observation about C12: partOf our statement, its own identifier system."""
    doc = load_json(bundle)
    mine = next(e["resource"] for e in doc["entry"] if e["resource"]["resourceType"] == "Observation"
                and e["resource"]["identifier"][0]["value"] == "C12:improvement")
    theirs = json.loads(json.dumps(mine))
    theirs["id"] = "other-app-eval"
    theirs["identifier"] = [{"system": "https://other-app.example/sid/eval", "value": "E-1"}]
    theirs["effectiveDateTime"] = "2025-06-01"  # later: it would win if it counted
    theirs["valueQuantity"]["value"] = 95
    doc["entry"].append({"fullUrl": "urn:uuid:other", "resource": theirs})
    out.write_text(json.dumps(doc), encoding="utf-8")
    return out


def test_a_foreign_evaluation_is_not_counted_from_a_file(tmp_path: Path) -> None:
    bundle = tmp_path / "b.json"
    assert invoke("import", EXAMPLE_CSV, "-o", bundle).exit_code == 0
    mixed = _with_foreign_evaluation(bundle, tmp_path / "mixed.json")
    doc = json.loads(invoke("outcomes", mixed, "--format", "json").stdout)
    c12 = next(c for c in doc["cases"] if c["case_id"] == "C12")
    assert (c12["improvement_pct"], c12["category"]) == (10.0, "none")
    assert doc["summary"]["response_rate"] == round(11 / 12, 4)
    assert any("skipped 1 Observation" in w and RESOURCE_SYSTEM in w for w in doc["warnings"])
    # export applies the same rule: the C12 row keeps its own value
    exported = tmp_path / "x.csv"
    assert invoke("export", mixed, "-o", exported).exit_code == 0
    assert next(r for r in read_csv_rows(exported) if r["case_id"] == "C12")["improvement_pct"] == "10"


def test_a_source_without_a_cohort_case_warns_and_exits_1(tmp_path: Path) -> None:
    other = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {
        "resourceType": "MedicationStatement", "id": "x", "status": "active",
        "identifier": [{"system": "https://other-app.example/sid/ms", "value": "1"}],
        "medicationCodeableConcept": {"text": "something"}, "subject": {"reference": "Patient/p"}}}]}
    src = tmp_path / "other.json"
    src.write_text(json.dumps(other), encoding="utf-8")
    result = invoke("outcomes", src, "--format", "json")
    assert result.exit_code == 1, str(result)
    doc = json.loads(result.stdout)
    assert doc["summary"]["n"] == 0
    assert any("no cohort case" in w for w in doc["warnings"])


def test_a_missing_optional_column_is_still_accepted(tmp_path: Path) -> None:
    # rows stay accepted: a warning, not a reject (the data that is there is kept)
    rows = [case_row("A1")]
    src = write_cases(tmp_path / "min.csv", rows, columns=[c for c in CANONICAL if c != "site"])
    result = invoke("import", src, "-o", tmp_path / "b.json")
    assert result.exit_code == 0 and "accepted 1, rejected 0, total 1" in result.last_stderr_line
    assert any("missing from the header" in ln and "site" in ln for ln in result.stderr_lines)
