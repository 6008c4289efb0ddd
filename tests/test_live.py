"""The end-to-end sync tests against a LIVE FHIR server (e.g. a HAPI sandbox), opt-in.

    RUXO_FHIR_LIVE_URL=https://hapi.fhir.org/baseR4 python -m pytest tests/test_live.py -m live

Off by default: without RUXO_FHIR_LIVE_URL every test here is skipped (and `-m "not live"`
deselects them). A bearer token for the live server, if it needs one, comes from RUXO_FHIR_TOKEN
as for the CLI. A shared server cannot be reset or counted through an admin API, so these tests:

- push the example cohort with run-unique case and patient ids (`<run>-C01`, `<run>-P01`), so
  concurrent runs and other people's data never collide with ours;
- check exactness through searches by our identifiers (one Patient per patient id, one case
  statement per case id) and reads of every pushed id;
- delete what they pushed at the end (best effort; a sandbox may refuse deletes).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(not os.environ.get("RUXO_FHIR_LIVE_URL"),
                       reason="live server tests are opt-in: set RUXO_FHIR_LIVE_URL"),
]

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CSV = REPO / "examples" / "cases.csv"
CASE_SYSTEM = "https://ruxo-fhir.example/sid/case-id"
PATIENT_SYSTEM = "https://ruxo-fhir.example/sid/patient-id"
RESOURCE_SYSTEM = "https://ruxo-fhir.example/sid/case-resource"
FHIR_JSON = "application/fhir+json"
SUMMARY = re.compile(r"created (\d+), updated (\d+), unchanged (\d+), conflict (\d+), rejected (\d+), total (\d+)")
DELETE_ORDER = ("AdverseEvent", "Observation", "MedicationStatement", "Condition", "Patient")


@dataclass
class Run:
    exit_code: int
    stdout: str
    stderr: str

    def summary(self) -> dict[str, int]:
        found = SUMMARY.findall(self.stderr)
        assert found, f"no push summary line\n{self}"
        names = ("created", "updated", "unchanged", "conflict", "rejected", "total")
        return dict(zip(names, map(int, found[-1])))

    def __str__(self) -> str:
        return f"exit {self.exit_code}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


def base_url() -> str:
    return os.environ["RUXO_FHIR_LIVE_URL"].rstrip("/")


def headers() -> dict[str, str]:
    h = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}
    if os.environ.get("RUXO_FHIR_TOKEN"):
        h["Authorization"] = f"Bearer {os.environ['RUXO_FHIR_TOKEN']}"
    return h


def cli(*args: str | Path, state: Path, timeout: float = 900) -> Run:
    env = {k: v for k, v in os.environ.items() if k not in ("RUXO_FHIR_DEBUG", "RUXO_FHIR_CONFIG")}
    env["PYTHONWARNINGS"] = "error"
    env["RUXO_FHIR_STATE_DIR"] = str(state)
    proc = subprocess.run([sys.executable, "-m", "ruxo_fhir", *map(str, args)], capture_output=True, text=True,
                          encoding="utf-8", env=env, timeout=timeout)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def search_all(kind: str, params: dict[str, str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    r = requests.get(f"{base_url()}/{kind}", params=params, headers=headers(), timeout=120)
    while True:
        r.raise_for_status()
        page = r.json()
        out += [e["resource"] for e in page.get("entry", []) if e.get("search", {}).get("mode", "match") == "match"]
        nxt = next((ln["url"] for ln in page.get("link", []) if ln.get("relation") == "next"), None)
        if not nxt:
            return out
        r = requests.get(nxt, headers=headers(), timeout=120)


def identifier_values(resource: dict[str, Any], system: str) -> list[str]:
    ident = resource.get("identifier")
    idents = [ident] if isinstance(ident, dict) else (ident or [])
    return [i.get("value") for i in idents if i.get("system") == system]


def keys(resources: list[dict[str, Any]]) -> set[str]:
    return {f"{r['resourceType']}/{r['id']}" for r in resources}


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh))


def row_set(rows: list[dict[str, str]]) -> set[tuple[tuple[str, str], ...]]:
    return {tuple(sorted(r.items())) for r in rows}


@dataclass
class Cohort:
    run: str
    csv: Path
    rows: list[dict[str, str]]
    resources: list[dict[str, Any]]
    state: Path
    work: Path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cohort]:
    """The example cohort with run-unique ids, pushed once; deleted again at the end."""
    work = tmp_path_factory.mktemp("live")
    run = "rx" + uuid.uuid4().hex[:8]
    rows = read_rows(EXAMPLE_CSV)
    for row in rows:
        row["case_id"] = f"{run}-{row['case_id']}"
        row["patient_id"] = f"{run}-{row['patient_id']}"
    src = write_rows(work / "cases.csv", rows)
    state = work / "state"
    imported = cli("import", src, "-o", work / "bundle.json", state=state)
    assert imported.exit_code == 0, imported
    resources = [e["resource"] for e in json.loads((work / "bundle.json").read_text(encoding="utf-8"))["entry"]]
    first = cli("push", src, "--server", base_url(), state=state)
    assert first.exit_code == 0, first
    s = first.summary()
    assert s["created"] + s["updated"] == s["total"] == len(resources), first
    try:
        yield Cohort(run, src, rows, resources, state, work)
    finally:
        for kind in DELETE_ORDER:
            for res in resources:
                if res["resourceType"] == kind:
                    try:
                        requests.delete(f"{base_url()}/{kind}/{res['id']}", headers=headers(), timeout=60)
                    except requests.RequestException:
                        pass


def test_live_check(tmp_path: Path) -> None:
    run = cli("check", "--server", base_url(), state=tmp_path / "state")
    assert run.exit_code == 0, run


def test_live_push_is_exact_and_second_push_writes_nothing(cohort: Cohort) -> None:
    again = cli("push", cohort.csv, "--server", base_url(), state=cohort.state)
    assert again.exit_code == 0, again
    s = again.summary()
    assert s["unchanged"] == s["total"] == len(cohort.resources), again
    assert re.search(r"\b0 bundle\(s\)", again.stderr), again
    # every pushed id is there, and nothing is doubled: one Patient per patient id, one
    # statement per case id, one resource per part identifier
    for res in cohort.resources:
        r = requests.get(f"{base_url()}/{res['resourceType']}/{res['id']}", headers=headers(), timeout=60)
        assert r.status_code == 200, f"{res['resourceType']}/{res['id']}: {r.status_code}"
    for row in cohort.rows:
        patients = search_all("Patient", {"identifier": f"{PATIENT_SYSTEM}|{row['patient_id']}"})
        assert len(patients) == 1, row["patient_id"]
        cases = search_all("MedicationStatement", {"identifier": f"{CASE_SYSTEM}|{row['case_id']}"})
        assert len(cases) == 1, row["case_id"]


def test_live_rerun_without_ledger_creates_nothing_new(cohort: Cohort, tmp_path: Path) -> None:
    run = cli("push", cohort.csv, "--server", base_url(), "--no-ledger", "--mode", "batch", state=tmp_path / "s")
    assert run.exit_code == 0, run
    s = run.summary()
    assert s["created"] == 0 and s["rejected"] == 0, run
    for row in cohort.rows:
        assert len(search_all("Patient", {"identifier": f"{PATIENT_SYSTEM}|{row['patient_id']}"})) == 1


def test_live_pull_small_pages_round_trip(cohort: Cohort, tmp_path: Path) -> None:
    out = tmp_path / "pulled"
    run = cli("pull", "--server", base_url(), "-o", out, "--format", "ndjson", "--page-size", "5",
              state=cohort.state)
    assert run.exit_code == 0, run
    pulled = [json.loads(ln) for f in out.glob("*.ndjson") for ln in f.read_text(encoding="utf-8").splitlines()
              if ln.strip()]
    assert keys(cohort.resources) <= keys(pulled)
    for res in pulled:  # only the cohort: everything pulled carries one of our identifier systems
        assert (identifier_values(res, CASE_SYSTEM) or identifier_values(res, RESOURCE_SYSTEM)
                or identifier_values(res, PATIENT_SYSTEM)), res.get("id")
    exported = tmp_path / "pulled.csv"
    exp = cli("export", out, "-o", exported, state=cohort.state)
    assert exp.exit_code == 0, exp
    ours = [r for r in read_rows(exported) if r["case_id"].startswith(f"{cohort.run}-")]
    assert row_set(ours) == row_set(cohort.rows)


def test_live_pull_one_patient(cohort: Cohort, tmp_path: Path) -> None:
    patient_id = f"{cohort.run}-P03"
    case_id = f"{cohort.run}-C03"
    out = tmp_path / "p03.json"
    run = cli("pull", "--server", base_url(), "-o", out, "--patient", patient_id, state=cohort.state)
    assert run.exit_code == 0, run
    got = [e["resource"] for e in json.loads(out.read_text(encoding="utf-8")).get("entry", [])]
    want = [r for r in cohort.resources
            if identifier_values(r, CASE_SYSTEM) == [case_id]
            or any(v.startswith(f"{case_id}:") for v in identifier_values(r, RESOURCE_SYSTEM))
            or identifier_values(r, PATIENT_SYSTEM) == [patient_id]]
    assert keys(got) == keys(want)


def test_live_incremental_pull(cohort: Cohort, tmp_path: Path) -> None:
    time.sleep(2.2)  # the cursor is the server's Date (whole seconds) minus 1 s of overlap
    cursor = tmp_path / "cursor.json"
    first = cli("pull", "--server", base_url(), "-o", tmp_path / "first", "--format", "ndjson", "--cursor", cursor,
                state=cohort.state)
    assert first.exit_code == 0, first
    rows = [dict(r) for r in cohort.rows]
    target = f"{cohort.run}-C07"
    for row in rows:
        if row["case_id"] == target:
            row["improvement_pct"] = "71"
    changed = write_rows(tmp_path / "changed.csv", rows)
    push = cli("push", changed, "--server", base_url(), state=cohort.state)
    assert push.exit_code == 0, push
    assert push.summary()["updated"] == 1, push
    second = cli("pull", "--server", base_url(), "-o", tmp_path / "second", "--format", "ndjson",
                 "--cursor", cursor, state=cohort.state)
    assert second.exit_code == 0, second
    got = [json.loads(ln) for f in (tmp_path / "second").glob("*.ndjson")
           for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    ours = [r for r in got if f"{r['resourceType']}/{r['id']}" in keys(cohort.resources)]
    assert [identifier_values(r, RESOURCE_SYSTEM) for r in ours] == [[f"{target}:improvement"]]
    # put the value back for the other tests
    assert cli("push", cohort.csv, "--server", base_url(), state=cohort.state).exit_code == 0


def test_live_dry_run_after_push_is_unchanged(cohort: Cohort) -> None:
    run = cli("push", cohort.csv, "--server", base_url(), "--dry-run", state=cohort.state)
    assert run.exit_code == 0, run
    assert re.search(rf"would create 0, update 0, leave {len(cohort.resources)} unchanged", run.stderr), run
