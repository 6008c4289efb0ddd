"""Unit tests of the case CSV reader: encodings, delimiters, row numbers, cross-row checks."""
from __future__ import annotations

import codecs
from decimal import Decimal
from pathlib import Path

import pytest
from helpers import default_mapping_data, write_mapping

from ruxo_fhir.errors import InputError
from ruxo_fhir.mapping.spec import MappingSpec, load_mapping
from ruxo_fhir.records import Accepted, CaseReader, Reject, format_decimal

HEADER = ["case_id", "patient_id", "sex", "birth_date", "indication", "treatment_start", "frequency",
          "improvement_pct", "site"]


@pytest.fixture(scope="module")
def mapping() -> MappingSpec:
    return load_mapping()


def read(path: Path, mapping: MappingSpec) -> tuple[CaseReader, list[Accepted], list[Reject]]:
    reader = CaseReader(path, mapping)
    items = list(reader)
    accepted = [i for i in items if isinstance(i, Accepted)]
    rejects = [i for i in items if isinstance(i, Reject)]
    assert reader.report.accepted == len(accepted)
    assert reader.report.rejected == len(rejects)
    return reader, accepted, rejects


def lines(*rows: list[str], delimiter: str = ",", newline: str = "\n") -> str:
    return "".join(delimiter.join(r) + newline for r in rows)


def put(tmp_path: Path, text: str, *, encoding: str = "utf-8", name: str = "cases.csv", bom: bytes = b"") -> Path:
    path = tmp_path / name
    path.write_bytes(bom + text.encode(encoding))
    return path


# --- delimiters and encodings --------------------------------------------------------------

@pytest.mark.parametrize("delimiter", [",", ";", "\t"], ids=["comma", "semicolon", "tab"])
def test_delimiter_is_detected(tmp_path: Path, mapping: MappingSpec, delimiter: str) -> None:
    text = lines(HEADER,
                 ["C1", "P1", "F", "1970-01-02", "morphea", "2024-05-02", "BID", "85", "face"],
                 ["C2", "P2", "M", "", "chilblains", "2024-06-03", "QD", "", "toes"],
                 delimiter=delimiter)
    reader, accepted, rejects = read(put(tmp_path, text), mapping)
    assert reader.report.delimiter == delimiter
    assert rejects == []
    assert [(a.record.case_id, a.record.patient_id, a.record.indication, a.record.site) for a in accepted] == [
        ("C1", "P1", "morphea", "face"), ("C2", "P2", "chilblains", "toes"),
    ]
    assert accepted[0].record.improvement_pct == Decimal("85")
    assert accepted[1].record.frequency == "QD"


def test_cp1252_oedeme_survives(tmp_path: Path, mapping: MappingSpec) -> None:
    text = lines(HEADER, ["C1", "P1", "F", "", "œdème", "2024-05-02", "BID", "", "épaule gauche"], delimiter=";")
    raw = text.encode("cp1252")
    assert b"\x9c" in raw  # œ is 0x9C in Windows-1252 and a C1 control in Latin-1
    path = tmp_path / "cases.csv"
    path.write_bytes(raw)
    reader, accepted, _ = read(path, mapping)
    assert reader.report.encoding == "cp1252"
    assert accepted[0].record.indication == "œdème"
    assert accepted[0].record.site == "épaule gauche"


def test_utf8_bom_is_not_part_of_the_first_column(tmp_path: Path, mapping: MappingSpec) -> None:
    text = lines(HEADER, ["C1", "P1", "F", "", "œdème", "2024-05-02", "BID", "", ""], delimiter=";")
    reader, accepted, rejects = read(put(tmp_path, text, bom=codecs.BOM_UTF8), mapping)
    assert rejects == []
    assert reader.report.encoding.startswith("utf-8")
    assert accepted[0].record.case_id == "C1"
    assert accepted[0].record.indication == "œdème"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_with_bom(tmp_path: Path, mapping: MappingSpec, encoding: str) -> None:
    text = lines(HEADER, ["C1", "P1", "F", "1950", "œdème", "2024-05-02", "BID", "12,5", "visage"],
                 delimiter="\t", newline="\r\n")
    bom = {"utf-16": b"", "utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE}[encoding]
    path = put(tmp_path, text, encoding=encoding, bom=bom)  # Python's "utf-16" writes its own BOM
    assert path.read_bytes()[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    reader, accepted, rejects = read(path, mapping)
    assert rejects == []
    assert reader.report.delimiter == "\t"
    record = accepted[0].record
    assert (record.case_id, record.indication, record.site, record.birth_date) == ("C1", "œdème", "visage", "1950")
    assert record.improvement_pct == Decimal("12.5")


def test_bytes_undefined_in_cp1252_and_invalid_utf8_are_a_file_error(tmp_path: Path, mapping: MappingSpec) -> None:
    path = tmp_path / "cases.csv"
    path.write_bytes(lines(HEADER).encode() + b"C1,P1,F,,morph\x81a,2024-05-02,BID,,\n")
    with pytest.raises(InputError) as info:
        CaseReader(path, mapping)
    assert str(path) in str(info.value)
    assert "encoding" in str(info.value)


# --- numbers ------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "expected"), [
    ("85,5", Decimal("85.5")),
    ("-12,25", Decimal("-12.25")),
    ("85.50", Decimal("85.5")),
    ("85 %", Decimal("85")),
    ("0", Decimal("0")),
])
def test_decimal_comma_and_percent_sign(tmp_path: Path, mapping: MappingSpec, raw: str, expected: Decimal) -> None:
    text = lines(HEADER, ["C1", "P1", "F", "", "morphea", "2024-05-02", "BID", raw, ""], delimiter=";")
    _, accepted, rejects = read(put(tmp_path, text), mapping)
    assert rejects == []
    assert accepted[0].record.improvement_pct == expected


def test_decimal_comma_in_a_quoted_comma_delimited_field(tmp_path: Path, mapping: MappingSpec) -> None:
    text = lines(HEADER, ["C1", "P1", "F", "", "morphea", "2024-05-02", "BID", '"33,3"', ""])
    _, accepted, _ = read(put(tmp_path, text), mapping)
    assert accepted[0].record.improvement_pct == Decimal("33.3")


@pytest.mark.parametrize(("value", "text"), [
    (None, ""),
    (Decimal("85.50"), "85.5"),
    (Decimal("85"), "85"),
    (Decimal("1E+2"), "100"),
    (Decimal("100.00"), "100"),
    (Decimal("-0"), "0"),
    (Decimal("0.00"), "0"),
    (Decimal("-12.5"), "-12.5"),
    (Decimal("0.05"), "0.05"),
    (Decimal("1E-7"), "0.0000001"),
    (Decimal("-100"), "-100"),
])
def test_format_decimal(value: Decimal | None, text: str) -> None:
    assert format_decimal(value) == text


# --- rows and physical line numbers ------------------------------------------------------

def test_blank_lines_are_not_rows_but_count_for_line_numbers(tmp_path: Path, mapping: MappingSpec) -> None:
    text = (
        "\n"                                                    # 1 (blank before the header)
        + lines(HEADER)                                         # 2
        + "\n"                                                  # 3
        + lines(["C1", "P1", "F", "", "morphea", "2024-05-02", "BID", "", ""])   # 4
        + " \n"                                                 # 5 (spaces only)
        + ",,,,,,,,\n"                                          # 6 (only delimiters)
        + lines(["C2", "P2", "F", "", "morphea", "2024-05-02", "XX", "", ""])    # 7 (bad frequency)
        + "\n\n"                                                # 8, 9
        + lines(["C3", "P3", "F", "", "morphea", "2024-05-02", "BID", "", ""])   # 10
    )
    reader, accepted, rejects = read(put(tmp_path, text), mapping)
    assert [(a.record.case_id, a.record.row) for a in accepted] == [("C1", 4), ("C3", 10)]
    assert [(r.row, r.column) for r in rejects] == [(7, "frequency")]
    assert reader.report.total == 3


def test_crlf_line_endings_keep_line_numbers(tmp_path: Path, mapping: MappingSpec) -> None:
    text = lines(HEADER, [], ["C1", "P1", "F", "", "morphea", "2024-05-02", "BID", "", ""], [],
                 ["C2", "P2", "F", "", "morphea", "2024-05-02", "BID", "", ""], newline="\r\n")
    _, accepted, _ = read(put(tmp_path, text), mapping)
    assert [a.record.row for a in accepted] == [3, 5]


def test_quoted_multiline_field_row_numbers(tmp_path: Path, mapping: MappingSpec) -> None:
    text = (
        lines(HEADER)                                                              # 1
        + 'C1,P1,F,,morphea,2024-05-02,BID,,"face\nand\nhands"\n'                  # 2-4
        + "C2,P2,F,,morphea,2024-05-02,BID,101,\n"                                 # 5 (bad)
        + 'C3,P3,F,,morphea,2024-05-02,BID,,"neck\n\nback"\n'                      # 6-8 (blank line inside quotes)
        + "C4,P4,F,,morphea,2024-05-02,BID,,legs\n"                                # 9
    )
    _, accepted, rejects = read(put(tmp_path, text), mapping)
    assert [(a.record.case_id, a.record.row) for a in accepted] == [("C1", 2), ("C3", 6), ("C4", 9)]
    assert accepted[0].record.site == "face\nand\nhands"
    assert [(r.row, r.column, r.values["case_id"]) for r in rejects] == [(5, "improvement_pct", "C2")]


def test_duplicate_case_id_first_row_wins(tmp_path: Path, mapping: MappingSpec) -> None:
    text = lines(HEADER,
                 ["C1", "P1", "F", "", "morphea", "2024-05-02", "BID", "10", ""],
                 ["C2", "P2", "F", "", "morphea", "2024-05-02", "BID", "20", ""],
                 ["C1", "P3", "M", "", "chilblains", "2024-06-02", "QD", "30", ""])
    reader, accepted, rejects = read(put(tmp_path, text), mapping)
    assert [(a.record.case_id, a.record.improvement_pct) for a in accepted] == [
        ("C1", Decimal("10")), ("C2", Decimal("20")),
    ]
    assert len(rejects) == 1
    assert (rejects[0].row, rejects[0].column) == (4, "case_id")
    assert rejects[0].values["patient_id"] == "P3"  # the raw values of the rejected row are kept
    assert "C1" in rejects[0].error
    assert (reader.report.accepted, reader.report.rejected, reader.report.total) == (2, 1, 3)


def test_rejected_first_occurrence_does_not_block_a_later_valid_row(tmp_path: Path, mapping: MappingSpec) -> None:
    text = lines(HEADER,
                 ["C1", "P1", "F", "", "morphea", "2024-13-02", "BID", "", ""],
                 ["C1", "P1", "F", "", "morphea", "2024-05-02", "BID", "", ""])
    _, accepted, rejects = read(put(tmp_path, text), mapping)
    assert [(r.row, r.column) for r in rejects] == [(2, "treatment_start")]
    assert [(a.record.case_id, a.record.row) for a in accepted] == [("C1", 3)]


@pytest.mark.parametrize(("sex", "birth"), [("M", "1970-01-02"), ("F", "1971-01-02"), ("F", "")],
                         ids=["sex", "birth_date", "birth_date-missing"])
def test_patient_rows_that_disagree_are_rejected(tmp_path: Path, mapping: MappingSpec, sex: str, birth: str) -> None:
    text = lines(HEADER,
                 ["C1", "P1", "F", "1970-01-02", "morphea", "2024-05-02", "BID", "", ""],
                 ["C2", "P1", "female", "1970-01-02", "chilblains", "2024-06-02", "BID", "", ""],
                 ["C3", "P1", sex, birth, "morphea", "2024-07-02", "BID", "", ""])
    _, accepted, rejects = read(put(tmp_path, text), mapping)
    assert [a.record.case_id for a in accepted] == ["C1", "C2"]
    assert [a.new_patient for a in accepted] == [True, False]
    assert [(r.row, r.column) for r in rejects] == [(4, "patient_id")]


def test_extra_column_is_warned_once(tmp_path: Path, mapping: MappingSpec) -> None:
    rows = [[f"C{i}", f"P{i}", "F", "", "morphea", "2024-05-02", "BID", "", "", f"note {i}"] for i in range(5)]
    text = lines([*HEADER, "Commentaire"], *rows, delimiter=";")
    reader, accepted, rejects = read(put(tmp_path, text), mapping)
    assert len(accepted) == 5 and rejects == []
    extra = [w for w in reader.report.warning_lines() if "Commentaire" in w]
    assert len(extra) == 1
    assert "(" not in extra[0].split("Commentaire", 1)[1]  # not "(5 rows)": one warning, not one per row
    assert all("note" not in w for w in reader.report.warning_lines())  # values stay out of logs


def test_several_extra_columns_are_read_and_warned_once(tmp_path: Path, mapping: MappingSpec) -> None:
    # Spreadsheet exports often carry several extra columns (and empty trailing ones).
    text = lines([*HEADER, "Commentaire", "Service", ""],
                 ["C1", "P1", "F", "", "morphea", "2024-05-02", "BID", "", "", "x", "dermato", ""],
                 ["C2", "P2", "F", "", "morphea", "2024-05-02", "BID", "", "", "y", "dermato", ""],
                 delimiter=";")
    reader, accepted, rejects = read(put(tmp_path, text), mapping)
    assert [a.record.case_id for a in accepted] == ["C1", "C2"]
    assert rejects == []
    extra = [w for w in reader.report.warning_lines() if "Commentaire" in w or "Service" in w]
    assert len(extra) == 1
    assert "Commentaire" in extra[0] and "Service" in extra[0]


def test_header_names_are_case_insensitive_and_trimmed_in_any_order(tmp_path: Path, mapping: MappingSpec) -> None:
    header = [" Frequency ", "TREATMENT_START", "Indication", "Sex", "Patient_ID", " Case_Id"]
    text = lines(header, ["qd", "2024-05-02", "morphea", "male", "P1", "C1"])
    _, accepted, rejects = read(put(tmp_path, text), mapping)
    assert rejects == []
    r = accepted[0].record
    assert (r.case_id, r.patient_id, r.sex, r.frequency) == ("C1", "P1", "M", "QD")


def test_header_aliases_from_a_custom_mapping(tmp_path: Path) -> None:
    data = default_mapping_data()
    data["columns"]["case_id"]["aliases"] = ["Dossier", "N° séjour"]
    data["columns"]["improvement_pct"]["aliases"] = ["amélioration (%)"]
    site_mapping = load_mapping(write_mapping(tmp_path / "site.yaml", data))
    header = ["n° séjour", "patient_id", "sex", "indication", "treatment_start", "frequency", "Amélioration (%)"]
    text = lines(header, ["S-1", "P1", "F", "morphea", "2024-05-02", "BID", "40,5"], delimiter=";")
    path = put(tmp_path, text, encoding="cp1252")
    _, accepted, rejects = read(path, site_mapping)
    assert rejects == []
    assert accepted[0].record.case_id == "S-1"
    assert accepted[0].record.improvement_pct == Decimal("40.5")
    # without the alias, the renamed column is missing
    plain = put(tmp_path, lines(header[:-1], ["S-1", "P1", "F", "morphea", "2024-05-02", "BID"]), name="plain.csv")
    with pytest.raises(InputError) as info:
        CaseReader(plain, load_mapping())
    assert "case_id" in str(info.value)


# --- row errors ---------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "column"), [
    ({"case_id": ""}, "case_id"),
    ({"patient_id": " "}, "patient_id"),
    ({"sex": ""}, "sex"),
    ({"sex": "X"}, "sex"),
    ({"indication": ""}, "indication"),
    ({"treatment_start": ""}, "treatment_start"),
    ({"treatment_start": "02/05/2024"}, "treatment_start"),
    ({"treatment_start": "2024-02-30"}, "treatment_start"),
    ({"treatment_start": "2024-05"}, "treatment_start"),
    ({"frequency": ""}, "frequency"),
    ({"frequency": "TID"}, "frequency"),
    ({"birth_date": "1970-1-2"}, "birth_date"),
    ({"birth_date": "1970-02"}, "birth_date"),
    ({"disease_onset": "2020-13"}, "disease_onset"),
    ({"evaluation_date": "2024-05-01"}, "evaluation_date"),
    ({"evaluation_date": "2024-5-10"}, "evaluation_date"),
    ({"improvement_pct": "100.5"}, "improvement_pct"),
    ({"improvement_pct": "-101"}, "improvement_pct"),
    ({"improvement_pct": "abc"}, "improvement_pct"),
    ({"improvement_pct": "NaN"}, "improvement_pct"),
    ({"recurrence_after_stop": "maybe"}, "recurrence_after_stop"),
])
def test_row_errors_name_the_column(tmp_path: Path, mapping: MappingSpec, change: dict[str, str], column: str) -> None:
    header = ["case_id", "patient_id", "sex", "birth_date", "indication", "disease_onset", "treatment_start",
              "frequency", "evaluation_date", "improvement_pct", "recurrence_after_stop"]
    good = {"case_id": "C1", "patient_id": "P1", "sex": "F", "birth_date": "1970-01-02", "indication": "morphea",
            "disease_onset": "2020-03", "treatment_start": "2024-05-02", "frequency": "BID",
            "evaluation_date": "2024-06-02", "improvement_pct": "50", "recurrence_after_stop": "no"}
    bad = {**good, "case_id": "C2", "patient_id": "P2", **change}
    last = {**good, "case_id": "C3", "patient_id": "P3"}
    text = lines(header, *([row[c] for c in header] for row in (good, bad, last)))
    reader, accepted, rejects = read(put(tmp_path, text), mapping)
    assert [a.record.row for a in accepted] == [2, 4]
    assert len(rejects) == 1
    assert (rejects[0].row, rejects[0].column) == (3, column)
    assert column in rejects[0].message
    assert reader.report.total == 3


@pytest.mark.parametrize(("raw", "expected"), [("F", "F"), ("female", "F"), ("Male", "M"), ("m", "M"),
                                                ("other", "other"), ("Unknown", "unknown")])
def test_sex_is_normalised(tmp_path: Path, mapping: MappingSpec, raw: str, expected: str) -> None:
    text = lines(HEADER, ["C1", "P1", raw, "", "morphea", "2024-05-02", "BID", "", ""])
    _, accepted, _ = read(put(tmp_path, text), mapping)
    assert accepted[0].record.sex == expected


def test_lists_are_split_on_semicolons_in_order(tmp_path: Path, mapping: MappingSpec) -> None:
    header = [*HEADER, "prior_treatments", "adverse_events"]
    text = lines(header, ["C1", "P1", "F", "", "morphea", "2024-05-02", "BID", "", "",
                          '"tacrolimus; topical_steroids;;x"', '"pruritus;burning"'])
    _, accepted, _ = read(put(tmp_path, text), mapping)
    record = accepted[0].record
    assert record.prior_treatments == ("tacrolimus", "topical_steroids", "x")
    assert record.adverse_events == ("pruritus", "burning")


# --- file-level problems -----------------------------------------------------------------

@pytest.mark.parametrize(("content", "needle"), [
    (b"", "empty"),
    (b"\n\n  \n", "empty"),
    (b"case_id,patient_id,sex,indication,frequency\nC1,P1,F,morphea,BID\n", "treatment_start"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "NUL"),
])
def test_file_level_problems_raise_input_error_naming_the_file(
    tmp_path: Path, mapping: MappingSpec, content: bytes, needle: str,
) -> None:
    path = tmp_path / "cases.csv"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        list(CaseReader(path, mapping))
    assert str(path) in str(info.value)
    assert needle in str(info.value)


def test_header_only_file_has_no_rows(tmp_path: Path, mapping: MappingSpec) -> None:
    reader, accepted, rejects = read(put(tmp_path, lines(HEADER)), mapping)
    assert accepted == [] and rejects == []
    assert reader.report.total == 0
