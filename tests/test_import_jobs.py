"""`import --jobs N`: same bytes as one process at every chunk boundary; a worker that dies,
a worker that raises and a Ctrl-C each stop the run cleanly (no hang, no file left behind).

The 20k-row equality test is in test_streaming.py; here chunks are made small so that the
cross-row cases (an invalid first case of a patient whose Patient then goes out with a later
case, in the next chunk) fall on chunk boundaries.
"""
from __future__ import annotations

import csv
import filecmp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cohort_gen import COLUMNS, iter_rows, write_cases
from helpers import REPO

import ruxo_fhir.import_jobs as import_jobs
from ruxo_fhir.errors import WorkerError
from ruxo_fhir.importer import import_cases
from ruxo_fhir.mapping.spec import load_mapping

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="signals and fork are POSIX")


def _boundary_rows(path: Path) -> None:
    """1,000 rows with duplicates and conflicts; first cases of new patients that fail FHIR
    validation on both sides of 50-row chunk boundaries, each patient's next case valid."""
    rows = [[r[c] for c in COLUMNS] for r in iter_rows(1000, 5, dup_every=37, conflict_every=41)]
    for n, i in enumerate((0, 49, 99, 100, 248, 500, 998)):
        rows[i][1:4] = rows[i + 1][1:4] = [f"VP{n}", "F", "1970-01-01"]
        rows[i][12:15] = ["BAD  SCORE", "3", ""]
    for i in (149, 150, 151):  # two invalid cases in a row, then the one carrying the Patient
        rows[i][1:4] = ["VPX", "M", "1960-02-02"]
    rows[149][12:15] = rows[150][12:15] = ["BAD  SCORE", "3", ""]
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)


@pytest.mark.parametrize(("fmt", "version"), [("ndjson", "R4"), ("bundle", "R4"), ("ndjson", "R5")])
def test_jobs_write_the_same_bytes_at_chunk_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       fmt: str, version: str) -> None:
    src = tmp_path / "cases.csv"
    _boundary_rows(src)
    monkeypatch.setattr(import_jobs, "CHUNK_ROWS", 50)
    mapping = load_mapping()
    results = {}
    for jobs in (1, 2):
        out = tmp_path / (f"out{jobs}" if fmt == "ndjson" else f"out{jobs}.json")
        results[jobs] = import_cases(src, out, mapping=mapping, fmt=fmt, version=version,  # type: ignore[arg-type]
                                     rejects_path=tmp_path / f"rejects{jobs}.csv", jobs=jobs)
    one, two = results[1], results[2]
    assert one.report.rejected > 8 and one.report.rejected == two.report.rejected
    assert list(one.resources.items()) == list(two.resources.items())  # same counts, same key order
    assert filecmp.cmp(tmp_path / "rejects1.csv", tmp_path / "rejects2.csv", shallow=False)
    if fmt == "bundle":
        assert filecmp.cmp(one.output, two.output, shallow=False)
        return
    names = sorted(p.name for p in one.output.iterdir())
    assert names == sorted(p.name for p in two.output.iterdir())
    assert filecmp.cmpfiles(one.output, two.output, names, shallow=False)[1:] == ([], [])
    assert list(tmp_path.glob(".*")) == []  # no temporary file or folder left


def _boom(rows: list[tuple[int, list[str]]]) -> object:
    raise ValueError("a bug in a worker")


def test_a_worker_that_raises_stops_the_run_with_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_cases(tmp_path / "cases.csv", 600)
    monkeypatch.setattr(import_jobs, "CHUNK_ROWS", 100)
    real = import_jobs._worker_rows
    main = os.getpid()
    # the first chunk runs in this process before the workers fork; they raise
    monkeypatch.setattr(import_jobs, "_worker_rows", lambda rows: real(rows) if os.getpid() == main else _boom(rows))
    with pytest.raises(ValueError, match="a bug in a worker") as err:
        import_cases(src, tmp_path / "out", mapping=load_mapping(), fmt="ndjson",
                     rejects_path=tmp_path / "rejects.csv", jobs=2)
    assert "Traceback" in str(err.value.__cause__)  # the worker's own traceback, for RUXO_FHIR_DEBUG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases.csv"]  # nothing written, no temp file


def _start_import(tmp_path: Path) -> subprocess.Popen[str]:
    src = write_cases(tmp_path / "cases.csv", 20_000, 3)
    return subprocess.Popen(
        [sys.executable, "-m", "ruxo_fhir", "import", str(src), "-o", str(tmp_path / "out"), "--format", "ndjson",
         "--jobs", "2", "--rejects", str(tmp_path / "rejects.csv")],
        stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)


def _workers(pid: int, timeout: float = 60) -> list[int]:
    """The import's worker processes, once both exist (they fork after the first chunk)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        if len(kids) >= 2:
            return kids
        time.sleep(0.05)
    raise AssertionError("the import never started its workers")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from /proc")
def test_a_killed_worker_stops_the_run_with_one_line(tmp_path: Path) -> None:
    proc = _start_import(tmp_path)
    try:
        os.kill(_workers(proc.pid)[0], signal.SIGKILL)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == WorkerError.exit_code, err
    assert err.strip().splitlines()[-1].startswith("error: an import worker process was killed by signal 9")
    assert "--jobs 1" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases.csv"]  # nothing written, no temp file


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from /proc")
def test_ctrl_c_stops_workers_and_main_process(tmp_path: Path) -> None:
    proc = _start_import(tmp_path)
    try:
        workers = _workers(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the whole foreground group
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases.csv"]
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # stopped and reaped


def test_spawned_workers_write_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where fork is missing (macOS default, Windows) workers are spawned and build their own state."""
    import multiprocessing

    src = tmp_path / "cases.csv"
    _boundary_rows(src)
    monkeypatch.setattr(import_jobs, "CHUNK_ROWS", 100)
    monkeypatch.setattr(import_jobs, "_pool_context", lambda: multiprocessing.get_context("spawn"))
    outs = [import_cases(src, tmp_path / f"out{jobs}", mapping=load_mapping(), fmt="ndjson",
                         rejects_path=tmp_path / f"rejects{jobs}.csv", jobs=jobs).output for jobs in (1, 2)]
    names = sorted(p.name for p in outs[0].iterdir())
    assert filecmp.cmpfiles(outs[0], outs[1], names, shallow=False)[1:] == ([], [])
    assert filecmp.cmp(tmp_path / "rejects1.csv", tmp_path / "rejects2.csv", shallow=False)
