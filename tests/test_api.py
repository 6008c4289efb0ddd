"""The application layer as a library: README's example runs, results carry the CLI's exit codes."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import ruxo_fhir
from ruxo_fhir import api
from ruxo_fhir.errors import RuxoError, UsageError

ROOT = Path(__file__).resolve().parents[1]


def _readme_library_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use it as a library", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's 'Use it as a library' section has no python example"
    return match.group(1)


def test_readme_library_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = _readme_library_example().replace('"/tmp/ruxo-demo"', repr(str(tmp_path)))
    monkeypatch.chdir(ROOT)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "accepted 12, rejected 0, total 12"
    rate, ci = printed[1].split(" ", 1)
    assert 0 < float(rate) <= 1 and "," in ci
    assert (tmp_path / "cases.csv").read_text(encoding="utf-8").count("\n") == 13  # header + 12 rows


def test_package_reexports_the_layer() -> None:
    assert ruxo_fhir.import_file is api.import_file
    assert ruxo_fhir.PushOptions is api.PushOptions
    assert ruxo_fhir.api is api
    with pytest.raises(AttributeError):
        ruxo_fhir.no_such_thing  # noqa: B018


def test_import_result_carries_the_exit_code_of_rejected_rows(tmp_path: Path) -> None:
    src = tmp_path / "cases.csv"
    lines = (ROOT / "examples" / "cases.csv").read_text(encoding="utf-8").splitlines()
    header, first = lines[0], lines[1]
    bad = first.replace("1962-03-09", "not-a-date").replace("C01", "C99")
    src.write_text(f"{header}\n{first}\n{bad}\n", encoding="utf-8")
    done = api.import_file(src, tmp_path / "b.json", api.ImportOptions(report=tmp_path / "run.json"))
    assert (done.report.accepted, done.report.rejected, done.exit_code) == (1, 1, 1)
    assert '"rejected": 1' in (tmp_path / "run.json").read_text(encoding="utf-8")


def test_outcomes_wants_exactly_one_source() -> None:
    with pytest.raises(UsageError) as info:
        api.outcomes()
    assert info.value.exit_code == 2
    with pytest.raises(UsageError):
        api.outcomes("examples/cases.csv", api.ServerSettings(url="http://127.0.0.1:9/fhir"))


def test_write_back_to_a_file_needs_an_output(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="-o BUNDLE"):
        api.outcomes(ROOT / "examples" / "cases.csv", options=api.OutcomesOptions(write_back=True))


def test_write_back_into_a_bundle(tmp_path: Path) -> None:
    out = tmp_path / "derived.json"
    summary = api.outcomes(ROOT / "examples" / "cases.csv",
                           options=api.OutcomesOptions(write_back=True, output=out))
    written = json.loads(out.read_text(encoding="utf-8"))["entry"]
    assert summary.written == len(written) > 0
    assert {e["resource"]["resourceType"] for e in written} == {"Observation"}
    assert summary.exit_code == 0


def test_validate_collects_problems_without_a_callback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"resourceType": "Bundle", "type": "collection", "entry": [{"resource": '
                   '{"resourceType": "Patient", "id": "p1", "birthDate": "1962-13-45"}}]}', encoding="utf-8")
    result = api.validate(bad)
    assert (result.checked, result.invalid, result.exit_code) == (1, 1, 1)
    assert any("birthDate" in str(p) for p in result.problems)


def test_errors_are_ruxo_errors(tmp_path: Path) -> None:
    with pytest.raises(RuxoError) as info:
        api.import_file(tmp_path / "missing.csv", tmp_path / "out.json")
    assert info.value.exit_code == 3


def test_report_words_come_from_the_mapping(tmp_path: Path) -> None:
    """The title of the HTML report is the mapping's `report.title`, not a string in the code."""
    text = (ROOT / "mappings" / "default.yaml").read_text(encoding="utf-8")
    assert 'title: "Topical ruxolitinib: treatment outcomes"' in text
    site = tmp_path / "site.yaml"
    site.write_text(text.replace('title: "Topical ruxolitinib: treatment outcomes"',
                                 'title: "Site study: outcomes"'), encoding="utf-8")
    summary = api.outcomes(ROOT / "examples" / "cases.csv",
                           options=api.OutcomesOptions(mapping=site, report_format="html"))
    assert "<title>Site study: outcomes</title>" in summary.report_text
    assert "ruxolitinib: treatment outcomes" not in summary.report_text
