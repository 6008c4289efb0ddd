"""Spreadsheets as hospitals keep them: LibreOffice fr_FR exports, .xlsx read directly, date formats, decimals.

The fixtures in tests/data/libreoffice_fr/ are LibreOffice Calc's own output (see make_fixtures.py):
a workbook with dd/mm/yyyy date cells and its fr_FR `;` CSV export.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from helpers import (
    DATA,
    EXAMPLE_CSV,
    case_row,
    default_mapping_data,
    invoke,
    read_csv_rows,
    write_cases,
    write_mapping,
)

FR = DATA / "libreoffice_fr"
FR_CSV, FR_XLSX, FR_ODS = FR / "cases_fr.csv", FR / "cases_fr.xlsx", FR / "cases_fr.ods"


@pytest.fixture(scope="module")
def example_bundle(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("ref") / "bundle.json"
    result = invoke("import", EXAMPLE_CSV, "-o", out)
    assert result.exit_code == 0, str(result)
    return out.read_bytes()


def test_the_fixtures_are_libreoffice_output_with_french_dates() -> None:
    with zipfile.ZipFile(FR_XLSX) as zf:
        assert b"LibreOffice" in zf.read("docProps/app.xml")
    head = FR_CSV.read_text(encoding="utf-8").splitlines()
    assert head[0].startswith("case_id;patient_id;sex;birth_date")
    assert ";09/03/1962;" in head[1] and ";14/05/2024;" in head[1]  # dd/mm/yyyy, as shown


def test_french_csv_with_date_formats_gives_the_example_byte_for_byte(tmp_path: Path, example_bundle: bytes) -> None:
    out = tmp_path / "fr.json"
    result = invoke("import", FR_CSV, "-o", out, "--date-format", "%d/%m/%Y", "--date-format", "%m/%Y")
    assert result.exit_code == 0, str(result)
    assert "accepted 12, rejected 0, total 12" in result.last_stderr_line
    assert out.read_bytes() == example_bundle


def test_the_mapping_key_date_formats_does_the_same(tmp_path: Path, example_bundle: bytes) -> None:
    data = default_mapping_data()
    data["date_formats"] = ["%d/%m/%Y", "%m/%Y", "%Y"]
    mapping = write_mapping(tmp_path / "fr.yaml", data)
    out = tmp_path / "fr.json"
    result = invoke("import", FR_CSV, "-o", out, "--mapping", mapping)
    assert result.exit_code == 0, str(result)
    assert out.read_bytes() == example_bundle


def test_without_a_format_no_date_is_guessed_and_every_bad_column_is_named(tmp_path: Path) -> None:
    out, rejects = tmp_path / "fr.json", tmp_path / "rej.csv"
    result = invoke("import", FR_CSV, "-o", out, "--rejects", rejects)
    assert result.exit_code == 1
    assert "accepted 0, rejected 12, total 12" in result.last_stderr_line
    first = read_csv_rows(rejects)[0]
    error = first["error"]
    for column in ("birth_date", "disease_onset", "treatment_start", "evaluation_date"):
        assert f"{column}: " in error or error.startswith(column), error
    assert "--date-format %d/%m/%Y would read it as 2024-05-14" in error
    assert "--date-format %m/%Y would read it as 2022-11" in error


def test_an_ambiguous_date_names_both_readings(tmp_path: Path) -> None:
    src = write_cases(tmp_path / "us.csv", [case_row("A1", treatment_start="05/06/2024")])
    rejects = tmp_path / "rej.csv"
    result = invoke("import", src, "-o", tmp_path / "b.json", "--rejects", rejects)
    assert result.exit_code == 1
    error = read_csv_rows(rejects)[0]["error"]
    assert "ambiguous" in error and "%d/%m/%Y reads 2024-06-05" in error and "%m/%d/%Y reads 2024-05-06" in error
    # told which one, it reads it; formats are tried in order
    us = invoke("import", src, "-o", tmp_path / "us.json", "--date-format", "%m/%d/%Y", "--date-format", "%d/%m/%Y")
    assert us.exit_code == 0, str(us)
    assert '"2024-05-06"' in (tmp_path / "us.json").read_text(encoding="utf-8")


def test_a_two_digit_year_in_the_future_is_refused(tmp_path: Path) -> None:
    src = write_cases(tmp_path / "yy.csv", [case_row("A1", birth_date="09/03/62", treatment_start="14/05/24")])
    rejects = tmp_path / "rej.csv"
    result = invoke("import", src, "-o", tmp_path / "b.json", "--rejects", rejects, "--date-format", "%d/%m/%y")
    assert result.exit_code == 1
    assert "two-digit year" in read_csv_rows(rejects)[0]["error"]


def test_a_date_format_must_be_a_format() -> None:
    result = invoke("import", EXAMPLE_CSV, "-o", "/tmp/never.json", "--date-format", "dd/mm/yyyy")
    assert result.exit_code == 2 and "strptime" in result.stderr


def test_xlsx_is_read_directly_with_the_same_fhir(tmp_path: Path, example_bundle: bytes) -> None:
    # date cells are dates; the month-year onsets LibreOffice kept as text need their format
    out = tmp_path / "x.json"
    result = invoke("import", FR_XLSX, "-o", out, "--date-format", "%m/%Y")
    assert result.exit_code == 0, str(result)
    assert "accepted 12, rejected 0, total 12" in result.last_stderr_line
    assert out.read_bytes() == example_bundle
    named = invoke("import", FR_XLSX, "--sheet", "Cas", "-o", tmp_path / "y.json", "--date-format", "%m/%Y")
    assert named.exit_code == 0 and (tmp_path / "y.json").read_bytes() == example_bundle
    # without the format: only the text onsets are rejected, and the reject says how to read them
    rejects = tmp_path / "rej.csv"
    bare = invoke("import", FR_XLSX, "-o", tmp_path / "z.json", "--rejects", rejects)
    assert bare.exit_code == 1 and "accepted 1, rejected 11, total 12" in bare.last_stderr_line
    assert all("disease_onset" in r["error"] and "%m/%Y" in r["error"] for r in read_csv_rows(rejects))
    assert read_csv_rows(rejects)[0]["row"] == "2"  # sheet rows, header = row 1


def test_an_unknown_sheet_is_one_line(tmp_path: Path) -> None:
    result = invoke("import", FR_XLSX, "--sheet", "Feuille9", "-o", tmp_path / "x.json")
    assert result.exit_code == 3
    assert len(result.stderr_lines) == 1 and "Feuille9" in result.stderr and "Cas" in result.stderr


def test_xlsx_numbers_and_dates_become_csv_text(tmp_path: Path) -> None:
    from datetime import datetime

    import openpyxl  # test extra: only to write a workbook the test controls

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["case_id", "patient_id", "sex", "indication", "treatment_start", "frequency",
                  "evaluation_date", "improvement_pct", "score_name", "baseline_score", "followup_score"])
    sheet.append(["A1", "P1", "F", "morphea", datetime(2024, 5, 2), "BID", datetime(2024, 7, 1), 45.5,
                  "CDASI", 20, 10.25])
    path = tmp_path / "w.xlsx"
    book.save(path)
    rows_csv = tmp_path / "rows.csv"
    result = invoke("import", path, "-o", tmp_path / "b.json")
    assert result.exit_code == 0, str(result)
    assert invoke("export", tmp_path / "b.json", "-o", rows_csv).exit_code == 0
    row = read_csv_rows(rows_csv)[0]
    assert (row["treatment_start"], row["evaluation_date"], row["improvement_pct"]) == ("2024-05-02", "2024-07-01", "45.5")
    assert (row["baseline_score"], row["followup_score"]) == ("20", "10.25")


@pytest.mark.parametrize("suffix", [".ods", ".xls"])
def test_other_workbooks_get_a_save_as_line(tmp_path: Path, suffix: str) -> None:
    src = FR_ODS if suffix == ".ods" else tmp_path / f"cases{suffix}"
    if suffix != ".ods":
        src.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504))  # an OLE2 (.xls) header
    result = invoke("import", src, "-o", tmp_path / "x.json")
    assert result.exit_code == 3
    assert len(result.stderr_lines) == 1 and "save it as .xlsx or CSV" in result.stderr


@pytest.mark.parametrize("command", [["outcomes"], ["push", "--server", "http://127.0.0.1:9/fhir"], ["export", "-o", "x.csv"]])
def test_fhir_commands_given_a_workbook_say_import_it_first(tmp_path: Path, command: list[str]) -> None:
    result = invoke(command[0], FR_XLSX, *command[1:])
    assert result.exit_code == 3, str(result)
    assert "import it first" in result.stderr and "surrogates" not in result.stderr
    assert "ConnectionError" not in result.stderr  # refused before any request


def test_excel_export_writes_decimal_commas(tmp_path: Path) -> None:
    src = write_cases(tmp_path / "d.csv", [case_row("A1", evaluation_date="2024-07-01", improvement_pct="45.5",
                                                    score_name="CDASI", baseline_score="20.5", followup_score="11")])
    bundle = tmp_path / "b.json"
    assert invoke("import", src, "-o", bundle).exit_code == 0
    excel, point, comma = tmp_path / "e.csv", tmp_path / "p.csv", tmp_path / "c.csv"
    assert invoke("export", bundle, "-o", excel, "--excel").exit_code == 0
    row = read_csv_rows(excel, delimiter=";", encoding="utf-8-sig")[0]
    assert (row["improvement_pct"], row["baseline_score"], row["followup_score"]) == ("45,5", "20,5", "11")
    assert invoke("export", bundle, "-o", point, "--excel", "--decimal", "point").exit_code == 0
    assert read_csv_rows(point, delimiter=";", encoding="utf-8-sig")[0]["improvement_pct"] == "45.5"
    assert invoke("export", bundle, "-o", comma, "--decimal", "comma").exit_code == 0
    assert read_csv_rows(comma)[0]["improvement_pct"] == "45,5"
    # the decimal-comma file imports back to the same FHIR
    again = tmp_path / "again.json"
    assert invoke("import", excel, "-o", again).exit_code == 0
    assert again.read_bytes() == bundle.read_bytes()
