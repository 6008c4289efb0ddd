"""Issue 13, "Bad input is a reject or a one-line error, never exit 70": one test per line.

tests/data/hostile holds the hostile files (wrong-typed FHIR fields, csv field-limit breakers,
stray bytes, look-alike identifiers, ...); the bad/ and messy/ folders are the older ones.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from e2e_cli import Run, run_cli
from helpers import DATA, EXAMPLE_CSV, read_csv_rows

HOSTILE = DATA / "hostile"
BAD_FOLDERS = [DATA / "bad", DATA / "messy", HOSTILE]


def cli(tmp_path: Path, *args: str | Path, timeout: float = 180) -> Run:
    return run_cli(Run, *args, state=tmp_path / "state", timeout=timeout)


def _rejects(path: Path) -> dict[int, str]:
    import csv

    with path.open(encoding="utf-8", errors="replace", newline="") as fh:  # stray bytes are kept as they were
        return {int(r["row"]): r["error"] for r in csv.DictReader(fh)}


def _commands(path: Path, tmp_path: Path) -> list[tuple[str | Path, ...]]:
    if path.suffix.lower() in (".csv", ".tsv", ".txt", ".xlsx"):
        return [("import", path, "-o", tmp_path / "o.json", "--rejects", tmp_path / "r.csv"),
                ("outcomes", path, "--format", "json")]
    return [("validate", path), ("export", path, "-o", tmp_path / "o.csv"), ("outcomes", path, "--format", "json")]


BAD_FILES = sorted(p for folder in BAD_FOLDERS for p in folder.iterdir()
                   if p.is_file() and not p.name.endswith((".expected.json", ".md")))


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_file_in_the_bad_input_folders_never_exits_70(tmp_path: Path, path: Path) -> None:
    for args in _commands(path, tmp_path):
        run = cli(tmp_path, *args)
        assert run.exit_code != 70, (args, str(run))
        assert "Traceback" not in run.stderr and "internal error" not in run.stderr, (args, str(run))
        if run.exit_code >= 2:
            assert len(run.lines) == 1, (args, str(run))  # one line naming the file and why


def test_unserialisable_value_1e20_is_that_rows_reject(tmp_path: Path) -> None:
    run = cli(tmp_path, "import", HOSTILE / "baseline_score_1e20.csv", "-o", tmp_path / "o.json",
              "--rejects", tmp_path / "r.csv")
    assert run.exit_code == 1, run
    assert run.lines[-1] == "accepted 11, rejected 1, total 12"
    rejects = _rejects(tmp_path / "r.csv")
    assert list(rejects) == [2] and rejects[2].startswith("baseline_score:") and "out of range" in rejects[2]
    bundle = json.loads((tmp_path / "o.json").read_text())
    assert len(bundle["entry"]) > 50  # the rest of the file was written


def test_csv_field_over_the_limit_is_one_line(tmp_path: Path) -> None:
    for name, row in (("header_field_over_csv_limit.csv", "row 1"), ("row_field_over_csv_limit.csv", "row 3")):
        run = cli(tmp_path, "import", HOSTILE / name, "-o", tmp_path / "o.json")
        assert run.exit_code == 3, run
        assert len(run.lines) == 1 and name in run.stderr and row in run.stderr and "field limit" in run.stderr
        assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize(("name", "field"), [
    ("subject_string", "MedicationStatement.subject"), ("value_quantity_string", "Observation.valueQuantity"),
    ("value_number_string", "Observation.valueQuantity.value"), ("dosage_string", "MedicationStatement.dosage"),
    ("effective_period_string", "MedicationStatement.effectivePeriod"), ("event_string", "AdverseEvent.event"),
])
def test_wrong_typed_fhir_fields_are_one_line_and_leave_only_their_case_out(tmp_path: Path, name: str,
                                                                           field: str) -> None:
    run = cli(tmp_path, "export", HOSTILE / f"{name}.json", "-o", tmp_path / "o.csv")
    assert run.exit_code == 0, run
    warnings = [ln for ln in run.lines if ln.startswith("warning:") and "left out" in ln]
    assert len(warnings) == 1 and field in warnings[0], run
    assert len(read_csv_rows(tmp_path / "o.csv")) == 11  # the other cases are all there


@pytest.mark.parametrize("name", ["entry_search_string", "code_coding_string", "subject_string",
                                  "effective_period_string", "value_number_string"])
def test_wrong_typed_fhir_fields_in_outcomes_never_crash(tmp_path: Path, name: str) -> None:
    run = cli(tmp_path, "outcomes", HOSTILE / f"{name}.json", "--format", "json")
    assert run.exit_code == 0, run
    doc = json.loads(run.stdout)
    assert len(doc["cases"]) >= 11
    if name != "entry_search_string":  # a string entry.search is simply not a search entry
        assert any("left out" in w for w in doc["warnings"]), doc["warnings"]


def test_utf8_with_stray_bytes_not_silently_read_as_cp1252(tmp_path: Path) -> None:
    run = cli(tmp_path, "import", HOSTILE / "utf8_with_stray_bytes.csv", "-o", tmp_path / "o.json",
              "--rejects", tmp_path / "r.csv")
    assert run.exit_code == 1, run
    assert any("stray bytes" in ln for ln in run.lines)
    rejects = _rejects(tmp_path / "r.csv")
    assert list(rejects) == [3] and "0xf4" in rejects[3] and rejects[3].startswith("site:")
    sites = {e["resource"]["id"]: e["resource"].get("bodySite") for e in json.loads((tmp_path / "o.json").read_text())
             ["entry"] if e["resource"]["resourceType"] == "Condition"}
    texts = json.dumps(sites, ensure_ascii=False)
    assert "Visage côté gauche" in texts and "Ã" not in texts  # UTF-8 names kept, no mojibake


def test_bom_inside_a_value_is_stripped(tmp_path: Path) -> None:
    run = cli(tmp_path, "import", HOSTILE / "bom_inside_value.csv", "-o", tmp_path / "o.json")
    assert run.exit_code == 0, run
    text = (tmp_path / "o.json").read_text(encoding="utf-8")
    assert "\ufeff" not in text and "\\ufeff" not in text


def test_identifiers_nfc_normalised_invisible_and_mixed_script_rejected(tmp_path: Path) -> None:
    expectations = {
        "invisible_characters_in_ids.csv": {2: ("case_id", "U+200B"), 3: ("patient_id", "U+200D"),
                                            4: ("case_id", "U+2060")},
        "mixed_script_lookalike_ids.csv": {2: ("case_id", "Cyrillic letters that look like Latin"),
                                           3: ("patient_id", "mixes Cyrillic and Latin")},
        "nfc_duplicate_ids.csv": {3: ("case_id", "duplicate case_id")},  # e + U+0301 == é after NFC
    }
    for name, expected in expectations.items():
        run = cli(tmp_path, "import", HOSTILE / name, "-o", tmp_path / "o.json", "--rejects", tmp_path / "r.csv")
        assert run.exit_code == 1, run
        rejects = _rejects(tmp_path / "r.csv")
        assert sorted(rejects) == sorted(expected), rejects
        for row, (column, why) in expected.items():
            assert rejects[row].startswith(f"{column}:") and why in rejects[row], rejects[row]
    from ruxo_fhir.records import identifier

    assert identifier("case_id", "Ce\u0301-1") == "C\u00e9-1"
    assert identifier("case_id", "Б01") == "Б01"  # a genuinely Cyrillic identifier is fine


def _bundle_with_improvement(tmp_path: Path, value: float) -> Path:
    out = tmp_path / "b.json"
    assert cli(tmp_path, "import", EXAMPLE_CSV, "-o", out).exit_code == 0
    bundle = json.loads(out.read_text())
    changed = 0
    for entry in bundle["entry"]:
        res = entry["resource"]
        if res["resourceType"] == "Observation" and "valueQuantity" in res and res["valueQuantity"].get("unit") == "%":
            if any(i["value"].startswith("C01:") for i in res.get("identifier", [])):
                res["valueQuantity"]["value"] = value
                changed += 1
    assert changed == 1
    out.write_text(json.dumps(bundle))
    return out


def _c01(doc: dict) -> dict:  # type: ignore[type-arg]
    return next(c for c in doc["cases"] if c["case_id"] == "C01")


def test_improvement_outside_range_from_fhir_file_not_evaluable_with_warning(tmp_path: Path) -> None:
    bundle = _bundle_with_improvement(tmp_path, 150)
    run = cli(tmp_path, "outcomes", bundle, "--format", "json")
    assert run.exit_code == 0, run
    doc = json.loads(run.stdout)
    assert _c01(doc)["category"] != "complete" and _c01(doc)["improvement_pct"] is None
    assert any("C01" in w and "outside -100..100" in w for w in doc["warnings"]), doc["warnings"]


@pytest.mark.e2e
def test_improvement_outside_range_from_fhir_server_not_evaluable_with_warning(tmp_path: Path, fhir_server) -> None:
    bundle = _bundle_with_improvement(tmp_path, -250)
    assert cli(tmp_path, "push", bundle, "--server", fhir_server.base_url).exit_code == 0
    run = cli(tmp_path, "outcomes", "--server", fhir_server.base_url, "--format", "json")
    assert run.exit_code == 0, run
    doc = json.loads(run.stdout)
    assert _c01(doc)["improvement_pct"] is None and _c01(doc)["category"] != "none"
    assert any("C01" in w and "outside -100..100" in w for w in doc["warnings"]), doc["warnings"]


def test_fhir_shape_error_of_valid_data_is_still_a_bug() -> None:
    """The shape boundary only excuses invalid FHIR: on valid data an error is raised again."""
    from ruxo_fhir.shapes import shape_guard
    from ruxo_fhir.validate import shape_reason

    warnings: list[str] = []
    valid = {"resourceType": "Patient", "id": "a", "gender": "female"}
    with pytest.raises(KeyError), shape_guard([copy.deepcopy(valid)], warnings, "left out", shape_reason):
        raise KeyError("ours")
    with shape_guard([{**valid, "gender": 5}], warnings, "left out", shape_reason):
        raise TypeError("theirs")
    assert len(warnings) == 1 and "Patient" in warnings[0] and "gender" in warnings[0]
