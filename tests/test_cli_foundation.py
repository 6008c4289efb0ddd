"""The CLI contract: help with examples, exit codes, one-line errors, -q, --version, --excel."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from helpers import (
    CANONICAL,
    EXAMPLE_CSV,
    REPO,
    SUMMARY_RE,
    CliResult,
    case_row,
    invoke,
    read_csv_rows,
    run_cli,
    write_cases,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def one_line_error(result: CliResult, code: int) -> str:
    assert result.exit_code == code, str(result)
    assert "Traceback" not in result.stderr, str(result)
    assert len(result.stderr_lines) == 1, str(result)
    assert "internal error" not in result.stderr
    return result.stderr_lines[0]


@pytest.fixture(scope="module")
def example_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "bundle.json"
    result = invoke("import", EXAMPLE_CSV, "-o", out)
    assert result.exit_code == 0, str(result)
    return out


# --- help and version -------------------------------------------------------------------

@pytest.mark.parametrize("command", ["import", "export", "validate"])
def test_help_has_an_example(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, str(result)
    assert "Example" in result.stdout
    assert f"ruxo-fhir {command} " in result.stdout  # the example uses the command itself
    assert "--mapping" in result.stdout


def test_top_level_help_lists_the_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("import", "export", "validate"):
        assert re.search(rf"^\s+{command}\b", result.stdout, re.MULTILINE), command


def test_python_dash_m_version_matches_the_package_metadata() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    result = run_cli("--version")
    assert result.exit_code == 0, str(result)
    assert version in result.stdout
    assert "ruxo-fhir" in result.stdout


# --- usage errors: exit 2 -----------------------------------------------------------------

def test_usage_error_exit_2_real_process(tmp_path: Path) -> None:
    result = run_cli("import", EXAMPLE_CSV, cwd=tmp_path)  # -o is required
    assert result.exit_code == 2, str(result)
    assert "Traceback" not in result.stderr
    assert "--output" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [
    ["import"],
    ["import", str(EXAMPLE_CSV), "-o", "x.json", "--format", "xml"],
    ["import", str(EXAMPLE_CSV), "-o", "x.json", "--fhir-version", "R3"],
    ["import", str(EXAMPLE_CSV), "-o", "x.json", "--no-such-option"],
    ["export", str(EXAMPLE_CSV)],
    ["validate"],
    ["frobnicate"],
], ids=["no-args", "bad-format", "bad-version", "unknown-option", "export-no-output", "validate-no-file",
        "unknown-command"])
def test_usage_errors_exit_2(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code == 2, str(result)
    assert "Traceback" not in result.stderr
    assert "Usage" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


# --- validate -----------------------------------------------------------------------------

def test_validate_valid_bundle_exits_0(example_bundle: Path) -> None:
    result = invoke("validate", example_bundle)
    assert result.exit_code == 0, str(result)
    assert result.stdout.strip() == ""


def test_validate_names_the_invalid_resource_and_location(example_bundle: Path, tmp_path: Path) -> None:
    bundle = json.loads(example_bundle.read_text(encoding="utf-8"))
    broken: list[str] = []
    for entry in bundle["entry"]:
        res = entry["resource"]
        if res["resourceType"] == "Observation" and not broken:
            res["effectiveDateTime"] = "last tuesday"
            broken.append(f"Observation/{res['id']}")
    src = tmp_path / "broken.json"
    src.write_text(json.dumps(bundle), encoding="utf-8")
    result = invoke("validate", src)
    assert result.exit_code == 1, str(result)
    assert "Traceback" not in result.stderr
    problem_lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(problem_lines) == 1, str(result)
    assert broken[0] in problem_lines[0]
    assert "effectiveDateTime" in problem_lines[0]


def test_validate_ndjson_folder_with_an_invalid_resource(tmp_path: Path) -> None:
    out = tmp_path / "nd"
    assert invoke("import", EXAMPLE_CSV, "-o", out, "--format", "ndjson").exit_code == 0
    lines = (out / "Patient.ndjson").read_text(encoding="utf-8").splitlines()
    patient = json.loads(lines[3])
    patient["gender"] = ["female"]
    lines[3] = json.dumps(patient)
    (out / "Patient.ndjson").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = invoke("validate", out)
    assert result.exit_code == 1, str(result)
    problems = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(problems) == 1
    assert f"Patient/{patient['id']}" in problems[0] and "gender" in problems[0]


def test_validate_an_unknown_resource_type(tmp_path: Path) -> None:
    src = tmp_path / "odd.json"
    src.write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Frobnication", "id": "f1"}}]}), encoding="utf-8")
    result = invoke("validate", src)
    assert result.exit_code == 1, str(result)
    assert "Frobnication/f1" in result.stdout


# --- unusable input files: exit 3, one line ----------------------------------------------

@pytest.mark.parametrize("command", ["import", "export", "validate"])
def test_missing_input_file_exits_3_with_one_line(command: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-file.csv"
    args: list[str | Path] = [command, missing]
    if command != "validate":
        args += ["-o", tmp_path / "out"]
    line = one_line_error(invoke(*args), 3)
    assert str(missing) in line
    assert list(tmp_path.iterdir()) == []


def test_missing_input_file_real_process(tmp_path: Path) -> None:
    missing = tmp_path / "absent.csv"
    line = one_line_error(run_cli("import", missing, "-o", tmp_path / "b.json"), 3)
    assert str(missing) in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2, 3]", b'{"resourceType": "Bundle", "entry": 5}'],
                         ids=["not-json", "not-a-resource", "bad-entry"])
def test_unusable_bundle_for_export_exits_3(content: bytes, tmp_path: Path) -> None:
    src = tmp_path / "in.json"
    src.write_bytes(content)
    out = tmp_path / "cases.csv"
    line = one_line_error(invoke("export", src, "-o", out), 3)
    assert str(src) in line
    assert not out.exists()


def test_unwritable_output_is_one_line_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x", encoding="utf-8")
    out = blocker / "bundle.json"
    result = invoke("import", EXAMPLE_CSV, "-o", out)
    assert result.exit_code in (2, 3), str(result)  # a usage/file problem, not an internal error
    line = one_line_error(result, result.exit_code)
    assert str(out) in line or str(blocker) in line


# --- -q and the summary line -------------------------------------------------------------

def test_quiet_still_prints_the_summary_line_last(tmp_path: Path) -> None:
    rows = [case_row("C1", indication="unheard_of"), case_row("C2", patient_id="P2", frequency="TID"),
            case_row("C3", patient_id="P3")]
    src = write_cases(tmp_path / "cases.csv", rows)
    loud = run_cli("import", src, "-o", tmp_path / "loud.json")
    quiet = run_cli("-q", "import", src, "-o", tmp_path / "quiet.json")
    for result in (loud, quiet):
        assert result.exit_code == 1, str(result)
        assert result.last_stderr_line == "accepted 2, rejected 1, total 3"
    assert any("unheard_of" in line for line in loud.stderr_lines)  # warnings without -q ...
    assert quiet.stderr_lines == ["accepted 2, rejected 1, total 3"]  # ... only the summary with -q
    assert (tmp_path / "quiet.json").read_bytes() == (tmp_path / "loud.json").read_bytes()


def test_summary_counts_add_up_and_exit_0_when_all_accepted(tmp_path: Path) -> None:
    result = run_cli("-q", "import", EXAMPLE_CSV, "-o", tmp_path / "b.json")
    assert result.exit_code == 0, str(result)
    m = re.fullmatch(SUMMARY_RE, result.last_stderr_line)
    assert m and int(m[1]) + int(m[2]) == int(m[3]) == 12


# --- export --excel ----------------------------------------------------------------------

def test_export_excel_writes_bom_and_semicolons(example_bundle: Path, tmp_path: Path) -> None:
    plain, excel = tmp_path / "plain.csv", tmp_path / "excel.csv"
    assert invoke("export", example_bundle, "-o", plain).exit_code == 0
    assert invoke("export", example_bundle, "-o", excel, "--excel").exit_code == 0
    raw = excel.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    header = raw[3:].decode("utf-8").splitlines()[0]
    assert header == ";".join(CANONICAL)
    assert not plain.read_bytes().startswith(b"\xef\xbb\xbf")
    assert plain.read_text(encoding="utf-8").splitlines()[0] == ",".join(CANONICAL)
    assert read_csv_rows(excel, delimiter=";", encoding="utf-8-sig") == read_csv_rows(plain)


def test_excel_export_reimports_to_the_same_bundle(example_bundle: Path, tmp_path: Path) -> None:
    excel = tmp_path / "excel.csv"
    assert invoke("export", example_bundle, "-o", excel, "--excel").exit_code == 0
    again = tmp_path / "again.json"
    result = invoke("import", excel, "-o", again)
    assert result.exit_code == 0, str(result)
    assert again.read_bytes() == example_bundle.read_bytes()
