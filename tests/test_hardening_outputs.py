"""Issue 13, "Outputs that cannot hurt": one test per line of the issue."""
from __future__ import annotations

import csv
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_cli import Run, run_cli
from helpers import CANONICAL, EXAMPLE_CSV, read_csv_rows, write_cases

STATE_LEDGER = "push-ledger.sqlite3"


def cli(tmp_path: Path, *args: str | Path, env: dict[str, str] | None = None, timeout: float = 120) -> Run:
    return run_cli(Run, *args, state=tmp_path / "state", env=env, timeout=timeout)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- output equal to an input -------------------------------------------------------------------

@pytest.mark.parametrize("template", [
    "import IN -o OUT --rejects IN",
    "import IN -o IN_ALIAS",
    "import IN -o OUT --report IN",
    "import IN -o OUT --mapping MAP --report MAP",
    "import IN -o REJ --rejects REJ",
    "import IN -o OUT --report OUT",
    "export BUNDLE -o BUNDLE_ALIAS",
    "outcomes BUNDLE --write-back -o BUNDLE --format json",
    "push BUNDLE --server http://127.0.0.1:9/fhir --report BUNDLE",
    "pull --server http://127.0.0.1:9/fhir -o OUT --report OUT",
])
def test_output_path_equal_to_an_input_refused_before_anything_is_written(tmp_path: Path, template: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    cases = work / "cases.csv"
    cases.write_bytes(EXAMPLE_CSV.read_bytes())
    mapping = work / "mapping.yaml"
    mapping.write_bytes((Path(__file__).resolve().parents[1] / "mappings" / "default.yaml").read_bytes())
    bundle = work / "bundle.json"
    assert cli(tmp_path, "import", cases, "-o", bundle, "--rejects", tmp_path / "r.csv").exit_code == 0
    (work / "in-alias.csv").symlink_to(cases)
    (work / "bundle-alias.json").symlink_to(bundle)
    paths = {"IN": cases, "IN_ALIAS": work / "in-alias.csv", "MAP": mapping, "OUT": work / "out.json",
             "REJ": work / "rej.csv", "BUNDLE": bundle, "BUNDLE_ALIAS": work / "bundle-alias.json"}
    args = [paths.get(word, word) for word in template.split()]
    before = _snapshot(work)
    run = cli(tmp_path, *args)
    assert run.exit_code == 2, run
    assert len(run.lines) == 1 and "refusing" in run.stderr, run
    assert _snapshot(work) == before  # nothing written, nothing destroyed


# --- formula neutralisation -------------------------------------------------------------------

FORMULAS = ["=HYPERLINK(\"http://x\",\"y\")", "+1+1", "-2+3", "@SUM(A1)", "\tTAB", "\rCR", "'=already", "''+x"]


def test_csv_exports_and_rejects_neutralise_formula_cells_and_import_strips_it(tmp_path: Path) -> None:
    from ruxo_fhir.csvsafe import neutralise, unneutralise

    for value in [*FORMULAS, "plain", "-5", "'quoted", "", "'"]:
        out = neutralise(value)
        assert out[:1] not in ("=", "+", "-", "@", "\t", "\r")
        assert unneutralise(out) == value
    rows = [dict.fromkeys(CANONICAL, "") for _ in range(3)]
    for i, row in enumerate(rows):
        row.update(case_id=f"C{i}", patient_id=f"P{i}", sex="F", indication="=cmd|' /C calc'!A0",
                   treatment_start="2020-01-01", frequency="BID", site="@SUM(1+1)", improvement_pct="-20",
                   prior_treatments="+steroid")
    rows[2]["sex"] = "=bad"  # a reject: its cells go to the rejects file
    cases = write_cases(tmp_path / "cases.csv", rows)
    assert cli(tmp_path, "import", cases, "-o", tmp_path / "b.json", "--rejects", tmp_path / "rej.csv").exit_code == 1
    export = cli(tmp_path, "export", tmp_path / "b.json", "-o", tmp_path / "out.csv")
    assert export.exit_code == 0, export
    excel = cli(tmp_path, "export", tmp_path / "b.json", "-o", tmp_path / "out-excel.csv", "--excel")
    assert excel.exit_code == 0, excel
    for path, delim, enc in ((tmp_path / "out.csv", ",", "utf-8"), (tmp_path / "out-excel.csv", ";", "utf-8-sig"),
                             (tmp_path / "rej.csv", ",", "utf-8")):
        with path.open(encoding=enc, newline="") as fh:
            for row in csv.reader(fh, delimiter=delim):
                for cell in row:
                    assert cell[:1] not in ("=", "+", "-", "@", "\t", "\r"), (path.name, cell)
    exported = read_csv_rows(tmp_path / "out.csv")
    assert exported[0]["indication"] == "'=cmd|' /C calc'!A0" and exported[0]["improvement_pct"] == "'-20"
    # the import reading them back strips the added quote: a lossless round trip
    back = cli(tmp_path, "import", tmp_path / "out.csv", "-o", tmp_path / "b2.json")
    assert back.exit_code == 0, back
    again = cli(tmp_path, "export", tmp_path / "b2.json", "-o", tmp_path / "out2.csv")
    assert again.exit_code == 0 and (tmp_path / "out2.csv").read_bytes() == (tmp_path / "out.csv").read_bytes()
    outcomes = cli(tmp_path, "outcomes", tmp_path / "b.json", "--format", "csv")
    for row in csv.reader(outcomes.stdout.splitlines()):
        for cell in row:
            assert cell[:1] not in ("=", "+", "@", "\t", "\r"), cell


# --- temp files and permissions ---------------------------------------------------------------

def _limited_cli(tmp_path: Path, limit_bytes: int, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """The CLI with RLIMIT_FSIZE: any write past `limit_bytes` fails (EFBIG), as a full disk does."""
    code = ("import resource, sys, runpy; resource.setrlimit(resource.RLIMIT_FSIZE, "
            f"({limit_bytes}, {limit_bytes})); sys.argv = ['ruxo-fhir', *sys.argv[1:]]; "
            "runpy.run_module('ruxo_fhir', run_name='__main__')")
    env = {**os.environ, "RUXO_FHIR_STATE_DIR": str(tmp_path / "state")}
    env.pop("RUXO_FHIR_DEBUG", None)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("fmt", ["ndjson", "bundle"])
@pytest.mark.parametrize(("copies", "limit"), [(1, 2048), (40, 64 * 1024)])  # full at close / while writing
def test_temp_files_removed_on_every_failure_path_disk_full(tmp_path: Path, fmt: str, copies: int, limit: int) -> None:
    rows = read_csv_rows(EXAMPLE_CSV)
    rows[3]["sex"] = "?"  # one reject, so a rejects temp file exists when the disk fills up
    (tmp_path / "in").mkdir()
    cases = write_cases(tmp_path / "in" / "cases.csv", rows * copies)  # copies > 1: duplicates, more rejects
    out = tmp_path / "out"
    out.mkdir()
    proc = _limited_cli(tmp_path, limit, "import", cases, "-o", out / ("nd" if fmt == "ndjson" else "b.json"),
                        "--format", fmt, "--rejects", out / "rejects.csv")
    assert proc.returncode == 3, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    assert list(out.iterdir()) == [], list(out.rglob("*"))  # no temp folder, no rejects temp, no output


def test_patient_data_files_and_ledger_created_0600(tmp_path: Path, fhir_server) -> None:
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        assert cli(tmp_path, "import", EXAMPLE_CSV, "-o", out / "nd", "--format", "ndjson",
                   "--report", out / "report.json").exit_code == 0
        assert cli(tmp_path, "import", EXAMPLE_CSV, "-o", out / "b.json").exit_code == 0
        assert cli(tmp_path, "export", out / "b.json", "-o", out / "cases.csv").exit_code == 0
        assert cli(tmp_path, "push", out / "b.json", "--server", fhir_server.base_url).exit_code == 0
        assert cli(tmp_path, "pull", "--server", fhir_server.base_url, "-o", out / "pulled", "--format", "ndjson",
                   "--cursor", out / "c.cursor").exit_code == 0
    finally:
        os.umask(old)
    files = [*out.rglob("*"), *(tmp_path / "state").rglob("*")]
    assert any(p.name == STATE_LEDGER for p in files)
    for p in files:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o077 == 0, f"{p} is {oct(mode)}"


# --- corrupt ledger ---------------------------------------------------------------------------

def _corrupt(ledger: Path, how: str) -> None:
    if how == "garbage":
        ledger.write_bytes(b"this is not a database\n" * 100)
    elif how == "truncated":
        data = ledger.read_bytes()
        ledger.write_bytes(data[: len(data) // 3])
    elif how == "wrong-schema":
        ledger.unlink()
        db = sqlite3.connect(ledger)
        db.execute("CREATE TABLE pushed (a TEXT, b TEXT)")
        db.commit()
        db.close()
    elif how == "directory":
        ledger.unlink()
        ledger.mkdir()
        (ledger / "x").write_text("x")


@pytest.mark.parametrize("how", ["garbage", "truncated", "wrong-schema", "directory"])
def test_corrupt_ledger_one_line_exit_3_no_ledger_never_opens_it(tmp_path: Path, fhir_server, how: str) -> None:
    bundle = tmp_path / "b.json"
    assert cli(tmp_path, "import", EXAMPLE_CSV, "-o", bundle).exit_code == 0
    first = cli(tmp_path, "push", bundle, "--server", fhir_server.base_url)
    assert first.exit_code == 0, first
    state = tmp_path / "state"
    ledger = state / STATE_LEDGER
    db = sqlite3.connect(ledger)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("PRAGMA journal_mode=DELETE")
    db.close()
    for extra in state.glob(STATE_LEDGER + "-*"):
        extra.unlink()
    _corrupt(ledger, how)
    before = _snapshot(state)
    run = cli(tmp_path, "push", bundle, "--server", fhir_server.base_url)
    assert run.exit_code == 3, run
    assert len(run.lines) == 1 and str(ledger) in run.stderr and "--no-ledger" in run.stderr, run
    assert "Traceback" not in run.stderr
    skip = cli(tmp_path, "push", bundle, "--server", fhir_server.base_url, "--no-ledger")
    assert skip.exit_code == 0, skip
    assert _snapshot(state) == before  # --no-ledger never opened (nor created, nor repaired) it
