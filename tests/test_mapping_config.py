"""Mappings are data: a site mapping changes columns, codes and systems with no Python change."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import (
    DEFAULT_MAPPING,
    EXAMPLE_CSV,
    REPO,
    all_codings,
    bundle_resources,
    case_row,
    default_mapping_data,
    identifier_values,
    invoke,
    of_type,
    read_csv_header,
    read_csv_rows,
    write_cases,
    write_mapping,
)

TERMINOLOGY = REPO / "mappings" / "TERMINOLOGY.md"

SITE_CASE = "https://chu-lyon.example/sid/numero-sejour"
SITE_PATIENT = "https://chu-lyon.example/sid/ipp"
SITE_RESOURCE = "https://chu-lyon.example/sid/ruxo-resource"


def terminology_text() -> str:
    if not TERMINOLOGY.is_file():
        pytest.fail(f"{TERMINOLOGY} is missing: the terminology facts live in the repository")
    return TERMINOLOGY.read_text(encoding="utf-8")


# --- a site mapping ---------------------------------------------------------------------

@pytest.fixture
def site_mapping(tmp_path: Path) -> Path:
    data = default_mapping_data()
    data["columns"]["case_id"]["aliases"] = ["dossier"]
    data["columns"]["patient_id"]["aliases"] = ["IPP"]
    # "lupus cutané (general)" in TERMINOLOGY.md: SNOMED 7119001 (C), ICD-10 L93 (C)
    data["indications"]["cutaneous_lupus"] = {
        "display": "Cutaneous lupus erythematosus",
        "seed_wording": "lupus cutané",
        "codes": [
            {"system": "snomed", "code": "7119001", "display": "Cutaneous lupus erythematosus", "confidence": "C"},
            {"system": "icd10", "code": "L93", "confidence": "C"},
        ],
    }
    data["identifier_systems"] = {"case": SITE_CASE, "patient": SITE_PATIENT, "resource": SITE_RESOURCE}
    return write_mapping(tmp_path / "site-lyon.yaml", data)


def site_csv(tmp_path: Path) -> tuple[Path, list[dict[str, str]]]:
    rows = [case_row("S-001", "900123", indication="cutaneous_lupus", evaluation_date="2024-07-01",
                     improvement_pct="70", site="face"),
            case_row("S-002", "900124", indication="morphea", sex="M")]
    columns = ["dossier", "IPP", "sex", "indication", "site", "treatment_start", "frequency",
               "evaluation_date", "improvement_pct"]
    renamed = [{("dossier" if k == "case_id" else "IPP" if k == "patient_id" else k): v for k, v in r.items()}
               for r in rows]
    return write_cases(tmp_path / "sejours.csv", renamed, columns=columns, delimiter=";"), rows


def test_site_mapping_renames_columns_adds_an_indication_and_changes_systems(
    tmp_path: Path, site_mapping: Path,
) -> None:
    src, rows = site_csv(tmp_path)
    out = tmp_path / "bundle.json"
    result = invoke("import", src, "-o", out, "--mapping", site_mapping)
    assert result.exit_code == 0, str(result)
    assert result.last_stderr_line == "accepted 2, rejected 0, total 2"
    assert "cutaneous_lupus" not in result.stderr  # a known label now: no "unknown label" warning
    resources = bundle_resources(out)

    statements = of_type(resources, "MedicationStatement")
    assert sorted(v for s in statements for v in identifier_values(s, SITE_CASE)) == ["S-001", "S-002"]
    patients = of_type(resources, "Patient")
    assert sorted(v for p in patients for v in identifier_values(p, SITE_PATIENT)) == ["900123", "900124"]
    conditions = of_type(resources, "Condition")
    assert sorted(v for c in conditions for v in identifier_values(c, SITE_RESOURCE)) == [
        "S-001:condition", "S-002:condition",
    ]
    lupus = next(c for c in conditions if identifier_values(c, SITE_RESOURCE) == ["S-001:condition"])
    pairs = {(c["system"], c["code"]) for c in lupus["code"]["coding"]}
    assert ("http://snomed.info/sct", "7119001") in pairs
    assert ("http://hl7.org/fhir/sid/icd-10", "L93") in pairs

    # no default identifier system survives anywhere in the output
    default_systems = set(default_mapping_data()["identifier_systems"].values())
    used = {c["system"] for r in resources for c in all_codings(r)}
    assert used.isdisjoint(default_systems)

    # export with the same mapping gives the rows back under the canonical names
    back = tmp_path / "back.csv"
    result = invoke("export", out, "-o", back, "--mapping", site_mapping)
    assert result.exit_code == 0, str(result)
    assert read_csv_rows(back) == rows

    # with the default mapping, none of these resources is ours
    result = invoke("export", out, "-o", tmp_path / "default.csv")
    assert result.exit_code == 0, str(result)
    assert read_csv_rows(tmp_path / "default.csv") == []
    assert any(line.startswith("warning") and "skip" in line for line in result.stderr_lines), str(result)


def test_site_mapping_renamed_column_is_unknown_to_the_default_mapping(tmp_path: Path) -> None:
    src, _ = site_csv(tmp_path)
    out = tmp_path / "bundle.json"
    result = invoke("import", src, "-o", out)
    assert result.exit_code == 3, str(result)
    assert len(result.stderr_lines) == 1
    assert str(src) in result.stderr and "case_id" in result.stderr
    assert not out.exists()


def test_mapping_json_is_accepted_too(tmp_path: Path) -> None:
    import json

    data = default_mapping_data()
    data["columns"]["case_id"]["aliases"] = ["dossier"]
    data["columns"]["patient_id"]["aliases"] = ["IPP"]
    mapping = tmp_path / "site.json"
    mapping.write_text(json.dumps(data), encoding="utf-8")
    src, _ = site_csv(tmp_path)
    out = tmp_path / "bundle.json"
    result = invoke("import", src, "-o", out, "--mapping", mapping)
    assert result.exit_code == 0, str(result)
    # cutaneous_lupus is not in this mapping: kept as text, with a warning
    assert "cutaneous_lupus" in result.stderr
    lupus = [c for c in of_type(bundle_resources(out), "Condition") if c["code"].get("text") == "cutaneous_lupus"]
    assert len(lupus) == 1 and "coding" not in lupus[0]["code"]


# --- broken mapping files ---------------------------------------------------------------

def _mutate(path: Path, change: Any) -> Path:
    data = default_mapping_data()
    change(data)
    return write_mapping(path, data)


def _set_system(data: dict[str, Any]) -> None:
    data["indications"]["morphea"]["codes"][0]["system"] = "snowmed"


def _drop_case_system(data: dict[str, Any]) -> None:
    del data["identifier_systems"]["case"]


def _typo_key(data: dict[str, Any]) -> None:
    data["body_site"] = data.pop("body_sites")  # optional key misspelt: must not be silently ignored


def _typo_required_key(data: dict[str, Any]) -> None:
    data["indicatons"] = data.pop("indications")


def _bad_confidence(data: dict[str, Any]) -> None:
    data["medication"]["codes"][0]["confidence"] = "maybe"


@pytest.mark.parametrize(("change", "needles"), [
    (_set_system, ["snowmed", "indications.morphea"]),
    (_drop_case_system, ["identifier_systems.case"]),
    (_typo_key, ["body_site"]),
    (_typo_required_key, ["indications"]),
    (_bad_confidence, ["medication.codes", "confidence"]),
], ids=["unknown-system", "missing-key", "unknown-key", "missing-required-key", "bad-confidence"])
def test_broken_mapping_exits_3_with_one_line_naming_file_and_key(
    tmp_path: Path, change: Any, needles: list[str],
) -> None:
    mapping = _mutate(tmp_path / "broken.yaml", change)
    out = tmp_path / "bundle.json"
    result = invoke("import", EXAMPLE_CSV, "-o", out, "--mapping", mapping)
    assert result.exit_code == 3, str(result)
    assert "Traceback" not in result.stderr
    assert len(result.stderr_lines) == 1, str(result)
    assert str(mapping) in result.stderr
    for needle in needles:
        assert needle in result.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [mapping]  # no rejects file either


@pytest.mark.parametrize("content", [b"columns: [unclosed\n", b"indications:\n  - a\n b: c\n", b"- just\n- a list\n",
                                     b"\xff\xfe\x00garbage"])
def test_unparsable_mapping_exits_3_with_one_line(tmp_path: Path, content: bytes) -> None:
    mapping = tmp_path / "broken.yaml"
    mapping.write_bytes(content)
    commands: list[list[str | Path]] = [["import", EXAMPLE_CSV, "-o", tmp_path / "b.json"],
                                        ["export", EXAMPLE_CSV, "-o", tmp_path / "c.csv"]]
    for args in commands:
        result = invoke(*args, "--mapping", mapping)
        assert result.exit_code == 3, str(result)
        assert "Traceback" not in result.stderr
        assert len(result.stderr_lines) == 1, str(result)
        assert str(mapping) in result.stderr
    assert list(tmp_path.iterdir()) == [mapping]


# libyaml accepts these two; PyYAML's pure parser (the reference here) refuses them
_LIBYAML_ONLY = [b"a:\tb\n", b"x: {display: Lupus pannic?litis}\n"]


@pytest.mark.parametrize("content", [DEFAULT_MAPPING.read_bytes(), *_LIBYAML_ONLY, b"columns: [unclosed\n",
                                     b"a: 1\n---\nb: 2\n", b"a: 2020-13-45\n", b"a: \xef\xbf\xbe\n"])
def test_mapping_yaml_is_read_as_the_pure_parser_reads_it(content: bytes) -> None:
    """The mapping is parsed by libyaml for speed only where the two parsers agree: same data,
    same refusals, same message."""
    from ruxo_fhir.mapping.spec import _parse_yaml

    def read(parse: Any) -> tuple[str, Any]:
        try:
            return "ok", parse(content)
        except (ValueError, yaml.YAMLError) as exc:
            return "refused", str(exc)

    assert read(_parse_yaml) == read(yaml.safe_load)


def test_libyaml_reads_what_the_pure_parser_refuses() -> None:
    """Why the cases above are routed to the pure parser (this fails once the parsers agree)."""
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is None:
        pytest.skip("PyYAML without libyaml: the pure parser reads every mapping")
    for content in _LIBYAML_ONLY:
        assert yaml.load(content, Loader=fast) is not None
        with pytest.raises(yaml.YAMLError):
            yaml.safe_load(content)


def test_missing_mapping_file_exits_3(tmp_path: Path) -> None:
    result = invoke("import", EXAMPLE_CSV, "-o", tmp_path / "b.json", "--mapping", tmp_path / "nope.yaml")
    assert result.exit_code == 3, str(result)
    assert len(result.stderr_lines) == 1 and "nope.yaml" in result.stderr


# --- the default mapping against TERMINOLOGY.md -----------------------------------------

SYSTEM_LABELS = {"snomed": "SNOMED", "icd10": "ICD-10", "icd10cm": "ICD-10", "rxnorm": "RxNorm", "atc": "ATC",
                 "edqm": "EDQM", "loinc": "LOINC"}


def markdown_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header cells, rows of cells) for every pipe table."""
    tables: list[tuple[list[str], list[list[str]]]] = []
    block: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.strip().startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2 and set("".join(block[1])) <= set("-: "):
            tables.append((block[0], block[2:]))
        block = []
    return tables


def coded_entries(data: Any, where: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every {system, code} dict in the mapping file, with its key path."""
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(data, dict):
        if isinstance(data.get("system"), str) and "code" in data:
            out.append((where, data))
        for k, v in data.items():
            out += coded_entries(v, f"{where}.{k}" if where else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += coded_entries(v, f"{where}[{i}]")
    return out


def terminology_entry(code: str, system: str) -> tuple[str, str | None] | None:
    """(row text, confidence) of the TERMINOLOGY.md row listing `code` for `system`, if any."""
    label = SYSTEM_LABELS[system]
    token = re.compile(rf"(?<![\w.]){re.escape(code)}(?![\w])")
    for header, rows in markdown_tables(terminology_text()):
        for cells in rows:
            for i, cell in enumerate(cells):
                if not token.search(cell):
                    continue
                column = header[i] if i < len(header) else ""
                if label not in column and label not in cell and label not in cells[0]:
                    continue
                inline = re.search(rf"{re.escape(code)}[^;]*?\(([CPU])\)", cell)
                nxt = cells[i + 1] if i + 1 < len(cells) else ""
                conf = inline.group(1) if inline else (nxt if nxt in ("C", "P", "U") else None)
                return " | ".join(cells), conf
    return None


def test_terminology_file_is_readable_and_has_tables() -> None:
    tables = markdown_tables(terminology_text())
    assert len(tables) >= 4
    assert any("SNOMED CT" in header for header, _ in tables)


def test_every_standard_code_of_the_default_mapping_is_in_terminology() -> None:
    data = yaml.safe_load(DEFAULT_MAPPING.read_text(encoding="utf-8"))
    entries = coded_entries(data)
    standard = [(w, e) for w, e in entries if not e["system"].startswith("project:")]
    assert len(standard) >= 20  # 17 indication codes and more
    problems = []
    for where, entry in standard:
        system = entry["system"]
        if system not in SYSTEM_LABELS:
            problems.append(f"{where}: system {system!r} is not a terminology short name")
            continue
        found = terminology_entry(str(entry["code"]), system)
        if found is None:
            problems.append(f"{where}: {system} {entry['code']} is not in TERMINOLOGY.md")
            continue
        row, conf = found
        if conf is not None and entry.get("confidence", "C") != conf:
            problems.append(f"{where}: {entry['code']} has confidence {entry.get('confidence', 'C')}, "
                            f"TERMINOLOGY.md says {conf} ({row})")
        if conf == "U":
            problems.append(f"{where}: {entry['code']} is a U code and must not be used")
    assert problems == []


def test_terminology_check_rejects_an_invented_code() -> None:
    # the checker above can fail: an invented code and a code under the wrong system are not found
    assert terminology_entry("396230009", "snomed") is None
    assert terminology_entry("M33.1", "snomed") is None
    assert terminology_entry("396230008", "snomed") is not None
    panniculitis = terminology_entry("15084002", "snomed")
    assert panniculitis is not None and panniculitis[1] == "P"
    calcinosis = terminology_entry("L94.2", "icd10")
    assert calcinosis is not None and calcinosis[1] == "C"
    route = terminology_entry("20003000", "edqm")
    assert route is not None and route[1] == "C"


def test_the_nine_seed_indications_ship_in_the_default_mapping() -> None:
    data = yaml.safe_load(DEFAULT_MAPPING.read_text(encoding="utf-8"))
    assert set(data["indications"]) >= {
        "dermatomyositis", "discoid_lupus", "lupus_panniculitis", "cutaneous_sarcoidosis", "calcinosis_cutis",
        "chilblains", "morphea", "sweet_syndrome", "mixed_facial_dermatosis",
    }
    # calcinosis has no SNOMED code in TERMINOLOGY.md (U): none may be emitted
    assert [c["system"] for c in data["indications"]["calcinosis_cutis"]["codes"]] == ["icd10"]


def terminology_uris() -> set[str]:
    for header, rows in markdown_tables(terminology_text()):
        if [h.lower() for h in header] == ["system", "uri"]:
            return {cells[1] for cells in rows}
    pytest.fail("TERMINOLOGY.md has no 'system | URI' table")


def test_every_system_uri_in_the_output_is_from_terminology_or_the_project(tmp_path: Path) -> None:
    uris = terminology_uris()
    assert "http://snomed.info/sct" in uris and len(uris) >= 10
    data = default_mapping_data()
    # Two FHIR-defined HL7 code systems are needed by the spec itself and are not in
    # TERMINOLOGY.md: data-absent-reason (issue 3 asks for Observation.dataAbsentReason) and
    # condition-category (problem-list-item). They are core FHIR terminology, not invented
    # codes; anything else must come from TERMINOLOGY.md or be a project system.
    fhir_core = {"http://terminology.hl7.org/CodeSystem/data-absent-reason",
                 "http://terminology.hl7.org/CodeSystem/condition-category"}
    allowed = uris | fhir_core | set(data["project_systems"].values()) | set(data["identifier_systems"].values())
    # the example cohort plus a case that uses the remaining branches (no improvement value,
    # unknown labels, a score, recurrence "no")
    extra = [case_row("X1", "PX", evaluation_date="2024-09-01", prior_treatments="phototherapy",
                      adverse_events="pruritus;headache", score_name="CDASI", baseline_score="30",
                      followup_score="12", recurrence_after_stop="no", indication="lichen")]
    src = write_cases(tmp_path / "all.csv", [*read_csv_rows(EXAMPLE_CSV), *extra])
    assert read_csv_header(src)[0] == "case_id"
    for version in ("R4", "R5"):
        out = tmp_path / f"{version}.json"
        result = invoke("import", src, "-o", out, "--fhir-version", version)
        assert result.exit_code == 0, str(result)
        used = {c["system"] for r in bundle_resources(out) for c in all_codings(r)}
        assert used - allowed == set(), f"{version}: system URIs not in TERMINOLOGY.md nor the mapping"
