"""A streaming import of 20,000 generated rows: correct counts, one Patient per patient, rejects.

Correctness only (no timing, no memory: those belong to benchmarks/bench.py). The rows come
from the seeded cohort generator (tests/cohort_gen.py) with deliberate duplicates, patient
conflicts and a few cases that fail FHIR validation; the expectations are recomputed here from
the CSV itself.
"""
from __future__ import annotations

import csv
import filecmp
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cohort_gen import COLUMNS, iter_rows

REPO = Path(__file__).resolve().parents[1]
ROWS = 20_000
CASE_SYSTEM = "https://ruxo-fhir.example/sid/case-id"
PATIENT_SYSTEM = "https://ruxo-fhir.example/sid/patient-id"


def _write_rows(path: Path) -> list[list[str]]:
    rows = [[r[c] for c in COLUMNS] for r in iter_rows(ROWS, 11, dup_every=97, conflict_every=89)]
    # Cases that pass the row checks but fail FHIR validation (a code with two spaces), each the
    # first case of a new patient whose later case must then carry the Patient resource.
    for n, i in enumerate((500, 7_000, 15_000)):
        pid = f"VP{n}"
        rows[i][1:4] = [pid, "F", "1970-01-01"]
        rows[i][12:15] = ["BAD  SCORE", "3", ""]
        rows[i + 1][1:4] = [pid, "F", "1970-01-01"]
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return rows


def _expected(rows: list[list[str]]) -> dict[str, Any]:
    """Which rows the import must accept, recomputed independently of the code under test."""
    seen_cases: set[str] = set()
    traits: dict[str, tuple[str, str]] = {}
    accepted_patients: set[str] = set()
    accepted = duplicates = conflicts = invalid = 0
    for row in rows:
        case_id, pid, sex, birth = row[0], row[1], row[2], row[3]
        if case_id in seen_cases:
            duplicates += 1
            continue
        if pid in traits and traits[pid] != (sex, birth):
            conflicts += 1
            continue
        seen_cases.add(case_id)
        traits.setdefault(pid, (sex, birth))
        if "  " in row[12]:
            invalid += 1
            continue
        accepted += 1
        accepted_patients.add(pid)
    return {"accepted": accepted, "duplicates": duplicates, "conflicts": conflicts, "invalid": invalid,
            "patients": accepted_patients}


def _import(src: Path, out: Path, jobs: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ruxo_fhir", "import", str(src), "-o", str(out), "--format", "ndjson",
         "--jobs", str(jobs), "--rejects", str(out.parent / f"{out.name}.rejects.csv")],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )


def _identifiers(path: Path, system: str) -> list[str]:
    values = []
    with path.open("rb") as fh:
        for line in fh:
            res = json.loads(line)
            for ident in res.get("identifier", []):
                if ident.get("system") == system:
                    values.append(ident["value"])
    return values


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("stream")
    src = base / "cases.csv"
    rows = _write_rows(src)
    runs = {jobs: _import(src, base / f"out{jobs}", jobs) for jobs in (1, 2)}
    return {"base": base, "rows": rows, "runs": runs, "expected": _expected(rows)}


def test_counts_and_exit_code(imported: dict[str, Any]) -> None:
    exp = imported["expected"]
    run = imported["runs"][1]
    assert run.returncode == 1, run.stderr  # some rows were rejected
    assert "Traceback" not in run.stderr
    rejected = exp["duplicates"] + exp["conflicts"] + exp["invalid"]
    assert exp["duplicates"] > 100 and exp["conflicts"] > 100 and exp["invalid"] == 3
    match = re.search(r"accepted (\d+), rejected (\d+), total (\d+)", run.stderr)
    assert match, run.stderr
    assert [int(g) for g in match.groups()] == [exp["accepted"], rejected, ROWS]


def test_one_case_statement_per_accepted_case(imported: dict[str, Any]) -> None:
    out = imported["base"] / "out1"
    cases = _identifiers(out / "MedicationStatement.ndjson", CASE_SYSTEM)
    assert len(cases) == imported["expected"]["accepted"]
    assert len(set(cases)) == len(cases)


def test_exactly_one_patient_per_patient_id(imported: dict[str, Any]) -> None:
    out = imported["base"] / "out1"
    patients = _identifiers(out / "Patient.ndjson", PATIENT_SYSTEM)
    counts = Counter(patients)
    assert max(counts.values()) == 1
    assert set(counts) == imported["expected"]["patients"]
    assert {"VP0", "VP1", "VP2"} <= set(counts)  # emitted with the case after the invalid one


def test_rejects_file_lists_duplicates_conflicts_and_invalid_cases(imported: dict[str, Any]) -> None:
    path = imported["base"] / "out1.rejects.csv"
    with path.open(encoding="utf-8", newline="") as fh:
        rejects = list(csv.DictReader(fh))
    exp = imported["expected"]
    errors = Counter(r["error"].split(":")[0] for r in rejects)
    assert errors["case_id"] == exp["duplicates"]
    assert errors["patient_id"] == exp["conflicts"]
    assert sum(1 for r in rejects if "FHIR R4 validation failed" in r["error"]) == exp["invalid"]
    assert [int(r["row"]) for r in rejects] == sorted(int(r["row"]) for r in rejects)  # row order
    assert not list(path.parent.glob(".out1.rejects.csv.*"))  # no temporary file left behind


def test_two_jobs_write_the_same_bytes(imported: dict[str, Any]) -> None:
    base = imported["base"]
    run = imported["runs"][2]
    assert run.returncode == 1, run.stderr
    assert run.stderr.splitlines()[-1] == imported["runs"][1].stderr.splitlines()[-1]
    one, two = base / "out1", base / "out2"
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    _match, mismatch, errors = filecmp.cmpfiles(one, two, names, shallow=False)
    assert not mismatch and not errors
    assert filecmp.cmp(base / "out1.rejects.csv", base / "out2.rejects.csv", shallow=False)


def test_cross_row_index_in_flat_tables() -> None:
    from ruxo_fhir.records import CaseRecord, CrossRowIndex, _RowError

    def rec(case: str, patient: str, sex: str = "F", birth: str | None = "1970") -> CaseRecord:
        return CaseRecord(case_id=case, patient_id=patient, sex=sex, indication="x",
                          treatment_start="2020-01-01", frequency="BID", birth_date=birth)

    index = CrossRowIndex(capacity=4)  # grows many times below
    new = 0
    for i in range(5000):
        r = rec(f"C{i}", f"P{i // 3}")
        index.check(r)
        new += index.add(r)
    assert (len(index), index.patients, new) == (5000, 1667, 1667)
    for bad, column in [(rec("C17", "P999999"), "case_id"), (rec("X1", "P5", sex="M"), "patient_id"),
                        (rec("X2", "P5", birth=None), "patient_id"), (rec("X3", "P5", birth="1971"), "patient_id")]:
        with pytest.raises(_RowError) as err:
            index.check(bad)
        assert err.value.column == column
    index.check(rec("X4", "P5"))  # same traits: fine, and not a new patient
    assert index.add(rec("X4", "P5")) is False
    assert index.add(rec("X5", "P-new")) is True
