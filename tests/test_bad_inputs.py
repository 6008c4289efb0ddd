"""Data-driven: every CSV in tests/data/bad and tests/data/messy against its sidecar.

Each file is imported by the real CLI in a subprocess (`python -m ruxo_fhir import X.csv -o
OUT --rejects REJ`), so exit codes and stderr are what a user sees. The sidecar schema is in
tests/data/README.md. The imports run in parallel once per module; each file is its own test.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    CANONICAL,
    CASE_SYSTEM,
    DATA,
    REJECT_HEADER,
    CliResult,
    bundle_resources,
    identifier_values,
    invoke,
    of_type,
    read_csv_header,
    read_csv_rows,
    read_exported_rows,
    run_cli,
)

CASE_FILES = sorted((DATA / "bad").glob("*.csv")) + sorted((DATA / "messy").glob("*.csv"))
SUMMARY = re.compile(r"accepted (\d+), rejected (\d+), total (\d+)")


def sidecar_path(csv_path: Path) -> Path:
    return csv_path.with_name(csv_path.name.removesuffix(".csv") + ".expected.json")


def file_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


@dataclass
class Run:
    source: Path
    workdir: Path
    output: Path
    rejects: Path
    result: CliResult


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, Run]:
    """Import every data file once, in parallel (subprocesses), each into an empty folder."""
    base = tmp_path_factory.mktemp("bad_inputs")

    def one(index: int, source: Path) -> Run:
        workdir = base / f"{index:03d}-{source.parent.name}-{source.stem}"
        workdir.mkdir()
        output, rejects = workdir / "out.json", workdir / "rejects.csv"
        result = run_cli("import", source, "-o", output, "--rejects", rejects)
        return Run(source, workdir, output, rejects, result)

    with ThreadPoolExecutor(max_workers=max(2, min(8, (os.cpu_count() or 2) * 2))) as pool:
        done = list(pool.map(one, range(len(CASE_FILES)), CASE_FILES))
    return {r.source: r for r in done}


def test_the_data_folders_hold_files() -> None:
    assert len(list((DATA / "bad").glob("*.csv"))) >= 10
    assert len(list((DATA / "messy").glob("*.csv"))) >= 5


@pytest.mark.parametrize("source", CASE_FILES, ids=file_id)
def test_every_data_file_has_a_readable_sidecar(source: Path) -> None:
    sidecar = sidecar_path(source)
    assert sidecar.is_file(), f"{sidecar} is missing"
    spec = json.loads(sidecar.read_text(encoding="utf-8"))
    assert spec.get("exit_code") in (0, 1, 3)
    if source.parent.name == "bad":
        assert spec["kind"] in ("file", "rows")
    else:
        assert spec["exit_code"] == 0 and spec["rejected"] == 0


def load_spec(source: Path) -> dict[str, Any]:
    sidecar = sidecar_path(source)
    if not sidecar.is_file():
        pytest.fail(f"{sidecar} is missing")
    spec: dict[str, Any] = json.loads(sidecar.read_text(encoding="utf-8"))
    return spec


def check_summary(result: CliResult, accepted: int, rejected: int) -> None:
    last = result.last_stderr_line
    m = SUMMARY.fullmatch(last)
    assert m, f"last stderr line is {last!r}\n{result}"
    a, r, t = (int(x) for x in m.groups())
    assert a + r == t
    assert (a, r) == (accepted, rejected), str(result)


def written_statements(output: Path) -> list[str]:
    return [v for s in of_type(bundle_resources(output), "MedicationStatement") for v in identifier_values(s, CASE_SYSTEM)]


@pytest.mark.parametrize("source", CASE_FILES, ids=file_id)
def test_import_behaves_as_the_sidecar_says(source: Path, runs: dict[Path, Run], tmp_path: Path) -> None:
    spec = load_spec(source)
    run = runs[source]
    result = run.result
    assert "Traceback" not in result.stderr, str(result)
    assert "internal error" not in result.stderr, str(result)
    assert result.exit_code == spec["exit_code"], str(result)
    kind = spec.get("kind", "messy")

    if kind == "file":
        assert len(result.stderr_lines) == 1, str(result)
        message = result.stderr_lines[0].lower()
        assert source.name.lower() in message, str(result)
        for needle in spec.get("message_contains", []):
            assert needle.lower() in message, f"{needle!r} not in {message!r}"
        any_of = spec.get("message_contains_any")
        if any_of:
            assert any(n.lower() in message for n in any_of), f"none of {any_of} in {message!r}"
        assert not run.output.exists()
        assert not run.rejects.exists()
        assert list(run.workdir.iterdir()) == []  # no temp files left behind either
        return

    check_summary(result, spec["accepted"], spec["rejected"])
    assert run.output.is_file(), "the accepted rows must be written"
    statements = written_statements(run.output)
    assert len(statements) == spec["accepted"]
    assert len(set(statements)) == len(statements)

    assert run.rejects.is_file()
    assert read_csv_header(run.rejects) == list(REJECT_HEADER)
    rejects = read_csv_rows(run.rejects)
    if kind == "rows":
        expected = {e["row"]: e for e in spec["rejects"]}
        assert len(spec["rejects"]) == spec["rejected"] == len(expected)
        assert sorted(int(r["row"]) for r in rejects) == sorted(expected), rejects
        for rej in rejects:
            exp = expected[int(rej["row"])]
            if "column" in exp:
                assert rej["error"].startswith(f"{exp['column']}: "), rej["error"]
            if "error_contains" in exp:
                assert exp["error_contains"].lower() in rej["error"].lower(), rej["error"]
            # the rejected row's own values are kept under the canonical names
            assert any(rej[c] for c in CANONICAL), rej
    else:
        assert rejects == []
        warnings = [line for line in result.stderr_lines[:-1] if line.lower().startswith("warning")]
        for needle in spec.get("warnings_contains", []):
            hits = [w for w in warnings if needle.lower() in w.lower()]
            assert len(hits) == 1, f"{needle!r} should be named in exactly one warning: {warnings}"
        assert len(set(warnings)) == len(warnings)  # each warning once, not once per row

        back = tmp_path / "back.csv"
        exported = invoke("export", run.output, "-o", back)
        assert exported.exit_code == 0, str(exported)
        rows = {r["case_id"]: r for r in read_exported_rows(back)}
        assert len(rows) == spec["accepted"]
        for check in spec["checks"]:
            row = rows.get(check["case_id"])
            assert row is not None, f"case {check['case_id']} missing from export"
            assert row[check["column"]] == check["value"], (check, row)


def test_row_level_files_get_the_default_rejects_path(tmp_path: Path) -> None:
    source = tmp_path / "ward-7.csv"
    shutil.copyfile(DATA / "bad" / "duplicate_case_id.csv", source)
    outdir = tmp_path / "out"
    result = run_cli("import", source, "-o", outdir / "bundle.json")
    assert result.exit_code == 1, str(result)
    default = outdir / "ward-7.rejects.csv"
    assert default.is_file(), sorted(p.name for p in outdir.iterdir())
    assert [r["row"] for r in read_csv_rows(default)] == ["4"]


def test_failure_found_mid_file_writes_nothing_in_ndjson_mode(tmp_path: Path) -> None:
    # the unterminated quote is only found while reading rows, after the writer was opened
    source = DATA / "bad" / "unterminated_quote.csv"
    if not source.is_file():
        pytest.fail(f"{source} is missing")
    out = tmp_path / "nd"
    result = run_cli("import", source, "-o", out, "--format", "ndjson")
    assert result.exit_code == 3, str(result)
    assert len(result.stderr_lines) == 1 and source.name in result.stderr
    assert list(tmp_path.iterdir()) == []
