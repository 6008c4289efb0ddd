"""End to end on local files: the example cohort to FHIR (R4 and R5, bundle and ndjson) and back."""
from __future__ import annotations

import copy
import csv
import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    CANONICAL,
    CASE_SYSTEM,
    DATA,
    EXAMPLE_CSV,
    PATIENT_SYSTEM,
    RESOURCE_SYSTEM,
    CliResult,
    bundle_resources,
    by_reference,
    case_row,
    identifier_values,
    invoke,
    ndjson_resources,
    of_type,
    read_csv_rows,
    read_exported_rows,
    write_cases,
)

GOLDEN = DATA / "golden" / "example_roundtrip.csv"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
ATC = "http://www.whocc.no/atc"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
EDQM = "http://standardterms.edqm.eu"
TIMING = "http://terminology.hl7.org/CodeSystem/v3-GTSAbbreviation"

# From mappings/TERMINOLOGY.md (Indications): label -> (SNOMED CT or None, ICD-10).
INDICATION_CODES = {
    "dermatomyositis": ("396230008", "M33.1"),
    "discoid_lupus": ("200938002", "L93.0"),
    "lupus_panniculitis": ("15084002", "L93.2"),
    "cutaneous_sarcoidosis": ("55941000", "D86.3"),
    "calcinosis_cutis": (None, "L94.2"),
    "chilblains": ("37869000", "T69.1"),
    "morphea": ("201048007", "L94.0"),
    "sweet_syndrome": ("84625002", "L98.2"),
    "mixed_facial_dermatosis": ("95320005", "L98.9"),
}


def ok(result: CliResult, code: int = 0) -> CliResult:
    assert result.exit_code == code, str(result)
    assert "Traceback" not in result.stderr, str(result)
    return result


def example_rows() -> list[dict[str, str]]:
    return read_csv_rows(EXAMPLE_CSV)


def codings(concept: dict[str, Any] | None, system: str) -> list[str]:
    return [c["code"] for c in (concept or {}).get("coding", []) if c.get("system") == system]


def ref(resource: dict[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


# --- module fixtures: one import per variant --------------------------------------------

@pytest.fixture(scope="module")
def outdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("example")


@pytest.fixture(scope="module")
def r4_bundle(outdir: Path) -> Path:
    out = outdir / "r4" / "bundle.json"
    result = ok(invoke("import", EXAMPLE_CSV, "-o", out))
    assert result.last_stderr_line == "accepted 12, rejected 0, total 12"
    return out


@pytest.fixture(scope="module")
def r4_resources(r4_bundle: Path) -> list[dict[str, Any]]:
    return bundle_resources(r4_bundle)


@pytest.fixture(scope="module")
def r4_ndjson(outdir: Path) -> Path:
    out = outdir / "nd" / "out"
    ok(invoke("import", EXAMPLE_CSV, "-o", out, "--format", "ndjson"))
    return out


@pytest.fixture(scope="module")
def r5_bundle(outdir: Path) -> Path:
    out = outdir / "r5" / "bundle.json"
    ok(invoke("import", EXAMPLE_CSV, "-o", out, "--fhir-version", "R5"))
    return out


# --- the example cohort, R4 -------------------------------------------------------------

def test_example_bundle_is_a_transaction_that_validates_with_r4b(r4_bundle: Path) -> None:
    from fhir.resources.R4B import get_fhir_model_class

    bundle = json.loads(r4_bundle.read_text(encoding="utf-8"))
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "transaction"
    get_fhir_model_class("Bundle").model_validate(bundle)
    for entry in bundle["entry"]:
        res = entry["resource"]
        get_fhir_model_class(res["resourceType"]).model_validate(res)
        assert entry["request"]["method"] in ("PUT", "POST")
        assert entry["request"]["url"].startswith(res["resourceType"])
    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(set(full_urls)) == len(full_urls)


def test_example_bundle_passes_the_validate_command(r4_bundle: Path) -> None:
    result = ok(invoke("validate", r4_bundle))
    assert result.stdout.strip() == ""  # no problem lines


def test_example_has_12_patients_matching_the_csv(r4_resources: list[dict[str, Any]]) -> None:
    patients = of_type(r4_resources, "Patient")
    assert len(patients) == 12
    by_pid = {identifier_values(p, PATIENT_SYSTEM)[0]: p for p in patients}
    for row in example_rows():
        patient = by_pid[row["patient_id"]]
        assert patient["gender"] == {"F": "female", "M": "male"}[row["sex"]]
        assert patient["birthDate"] == row["birth_date"]
    assert sorted(p["gender"] for p in patients).count("female") == 10


def test_example_has_12_ruxolitinib_statements_with_the_case_identifier(r4_resources: list[dict[str, Any]]) -> None:
    rows = {r["case_id"]: r for r in example_rows()}
    index = by_reference(r4_resources)
    statements = [s for s in of_type(r4_resources, "MedicationStatement") if identifier_values(s, CASE_SYSTEM)]
    assert sorted(identifier_values(s, CASE_SYSTEM)[0] for s in statements) == sorted(rows)
    for st in statements:
        row = rows[identifier_values(st, CASE_SYSTEM)[0]]
        med = st["medicationCodeableConcept"]
        assert "D11AH09" in codings(med, ATC)
        assert codings(med, RXNORM) in ([], ["1193326"])
        assert "1.5" in med["text"] or "15 mg/g" in med["text"]
        assert st["status"] in ("active", "completed", "intended")
        assert st["effectivePeriod"]["start"] == row["treatment_start"]
        assert index[st["subject"]["reference"]]["resourceType"] == "Patient"
        assert identifier_values(index[st["subject"]["reference"]], PATIENT_SYSTEM) == [row["patient_id"]]
        (dosage,) = st["dosage"]
        assert codings(dosage["timing"]["code"], TIMING) == [row["frequency"]]
        expected_repeat = {"BID": 2, "QD": 1}[row["frequency"]]
        assert dosage["timing"]["repeat"]["frequency"] == expected_repeat
        assert (dosage["timing"]["repeat"]["period"], dosage["timing"]["repeat"]["periodUnit"]) == (1, "d")
        assert "20003000" in codings(dosage["route"], EDQM)
        (reason,) = st["reasonReference"]
        assert index[reason["reference"]]["resourceType"] == "Condition"
    # the other statements are the prior treatments, status completed
    others = [s for s in of_type(r4_resources, "MedicationStatement") if not identifier_values(s, CASE_SYSTEM)]
    expected_prior = sum(len([x for x in r["prior_treatments"].split(";") if x]) for r in rows.values())
    assert len(others) == expected_prior
    assert {s["status"] for s in others} == {"completed"}


def test_example_has_one_indication_condition_per_case(r4_resources: list[dict[str, Any]]) -> None:
    rows = {r["case_id"]: r for r in example_rows()}
    index = by_reference(r4_resources)
    conditions = of_type(r4_resources, "Condition")
    assert len(conditions) == 12
    statements = {identifier_values(s, CASE_SYSTEM)[0]: s
                  for s in of_type(r4_resources, "MedicationStatement") if identifier_values(s, CASE_SYSTEM)}
    seen = set()
    for case_id, st in statements.items():
        condition = index[st["reasonReference"][0]["reference"]]
        seen.add(ref(condition))
        assert identifier_values(condition, RESOURCE_SYSTEM) == [f"{case_id}:condition"]
        snomed, icd10 = INDICATION_CODES[rows[case_id]["indication"]]
        assert codings(condition["code"], SNOMED) == ([snomed] if snomed else [])
        assert codings(condition["code"], ICD10) == [icd10]
        assert condition["bodySite"][0]["text"] == rows[case_id]["site"]
        assert condition["onsetDateTime"] == rows[case_id]["disease_onset"]
        assert condition["subject"] == st["subject"]
    assert seen == {ref(c) for c in conditions}
    # body site "face" carries SNOMED 89545001 (TERMINOLOGY.md), other sites stay text
    face = [c for c in conditions if c["bodySite"][0]["text"] == "face"]
    assert face and all(codings(c["bodySite"][0], SNOMED) == ["89545001"] for c in face)
    legs = [c for c in conditions if c["bodySite"][0]["text"] == "legs"]
    assert legs and all("coding" not in c["bodySite"][0] for c in legs)


def test_example_observations_point_at_statement_and_condition(r4_resources: list[dict[str, Any]]) -> None:
    rows = {r["case_id"]: r for r in example_rows()}
    index = by_reference(r4_resources)
    statements = {identifier_values(s, CASE_SYSTEM)[0]: s
                  for s in of_type(r4_resources, "MedicationStatement") if identifier_values(s, CASE_SYSTEM)}
    observations = of_type(r4_resources, "Observation")
    improvements = {}
    for obs in observations:
        (part,) = identifier_values(obs, RESOURCE_SYSTEM)
        case_id = part.split(":")[0]
        st = statements[case_id]
        assert [p["reference"] for p in obs["partOf"]] == [ref(st)]
        assert [f["reference"] for f in obs["focus"]] == [st["reasonReference"][0]["reference"]]
        assert index[obs["focus"][0]["reference"]]["resourceType"] == "Condition"
        assert obs["subject"] == st["subject"]
        assert "derivedFrom" not in obs
        if "valueQuantity" in obs and obs["valueQuantity"].get("code") == "%":
            improvements[case_id] = obs
    assert sorted(improvements) == sorted(rows)  # every example case has an improvement %
    for case_id, obs in improvements.items():
        q = obs["valueQuantity"]
        assert (q["system"], q["unit"]) == (UCUM, "%")
        assert Decimal(str(q["value"])) == Decimal(rows[case_id]["improvement_pct"])
        assert obs["effectiveDateTime"] == rows[case_id]["evaluation_date"]
    # the two cases with a score have a baseline and a follow-up observation with those values
    scored = {r["case_id"]: r for r in rows.values() if r["score_name"]}
    assert sorted(scored) == ["C02", "C07"]
    for case_id, row in scored.items():
        values = sorted(Decimal(str(o["valueQuantity"]["value"])) for o in observations
                        if o.get("code", {}).get("text") == row["score_name"]
                        and identifier_values(o, RESOURCE_SYSTEM)[0].startswith(case_id + ":"))
        assert values == sorted([Decimal(row["baseline_score"]), Decimal(row["followup_score"])])


def test_all_references_resolve_inside_the_bundle(r4_resources: list[dict[str, Any]]) -> None:
    index = by_reference(r4_resources)
    assert len(index) == len(r4_resources)  # ids unique per type

    def refs(obj: Any) -> list[str]:
        if isinstance(obj, dict):
            own = [obj["reference"]] if isinstance(obj.get("reference"), str) else []
            return own + [r for v in obj.values() for r in refs(v)]
        if isinstance(obj, list):
            return [r for v in obj for r in refs(v)]
        return []

    found = [r for res in r4_resources for r in refs(res)]
    assert found
    assert [r for r in found if r not in index] == []


def test_example_adverse_event_and_recurrence(r4_resources: list[dict[str, Any]]) -> None:
    (ae,) = of_type(r4_resources, "AdverseEvent")
    assert identifier_values(ae, RESOURCE_SYSTEM)[0].startswith("C09:")
    assert "90673000" in codings(ae["event"], SNOMED)  # burning sensation (TERMINOLOGY.md)
    booleans = [o for o in of_type(r4_resources, "Observation") if "valueBoolean" in o]
    assert [(identifier_values(o, RESOURCE_SYSTEM)[0].split(":")[0], o["valueBoolean"]) for o in booleans] == [
        ("C05", True),
    ]


# --- determinism ------------------------------------------------------------------------

def test_same_input_gives_byte_identical_bundle(r4_bundle: Path, tmp_path: Path) -> None:
    again = tmp_path / "bundle.json"
    ok(invoke("import", EXAMPLE_CSV, "-o", again))
    assert again.read_bytes() == r4_bundle.read_bytes()


def test_same_input_gives_byte_identical_ndjson(r4_ndjson: Path, tmp_path: Path) -> None:
    again = tmp_path / "out"
    ok(invoke("import", EXAMPLE_CSV, "-o", again, "--format", "ndjson"))
    names = sorted(p.name for p in r4_ndjson.iterdir())
    assert sorted(p.name for p in again.iterdir()) == names
    for name in names:
        assert (again / name).read_bytes() == (r4_ndjson / name).read_bytes(), name


def test_same_input_gives_byte_identical_r5(r5_bundle: Path, tmp_path: Path) -> None:
    again = tmp_path / "bundle.json"
    ok(invoke("import", EXAMPLE_CSV, "-o", again, "--fhir-version", "R5"))
    assert again.read_bytes() == r5_bundle.read_bytes()


def test_resource_ids_do_not_depend_on_row_order(r4_resources: list[dict[str, Any]], tmp_path: Path) -> None:
    rows = example_rows()
    shuffled = write_cases(tmp_path / "reversed.csv", list(reversed(rows)))
    out = tmp_path / "b.json"
    ok(invoke("import", shuffled, "-o", out))
    assert sorted(ref(r) for r in bundle_resources(out)) == sorted(ref(r) for r in r4_resources)


# --- ndjson layout ----------------------------------------------------------------------

def test_ndjson_layout_is_one_file_per_type(r4_ndjson: Path, r4_resources: list[dict[str, Any]]) -> None:
    files = ndjson_resources(r4_ndjson)
    types = {r["resourceType"] for r in r4_resources}
    assert sorted(files) == sorted(f"{t}.ndjson" for t in types)
    assert sorted(p.name for p in r4_ndjson.iterdir()) == sorted(files)  # nothing else in the folder
    for name, resources in files.items():
        assert {r["resourceType"] for r in resources} == {name.removesuffix(".ndjson")}
        raw = (r4_ndjson / name).read_text(encoding="utf-8")
        assert raw.endswith("\n") and "\n\n" not in raw  # one resource per line
    assert sorted(json.dumps(r, sort_keys=True) for rs in files.values() for r in rs) == sorted(
        json.dumps(r, sort_keys=True) for r in r4_resources
    )


# --- R5 ---------------------------------------------------------------------------------

def test_r5_output_validates_with_r5_models(r5_bundle: Path) -> None:
    from fhir.resources import get_fhir_model_class

    bundle = json.loads(r5_bundle.read_text(encoding="utf-8"))
    get_fhir_model_class("Bundle").model_validate(bundle)
    resources = [e["resource"] for e in bundle["entry"]]
    statements = of_type(resources, "MedicationStatement")
    prior = sum(len([x for x in r["prior_treatments"].split(";") if x]) for r in example_rows())
    assert len(statements) == 12 + prior
    for st in statements:
        get_fhir_model_class("MedicationStatement").model_validate(st)
        assert st["status"] == "recorded"
        assert "medicationCodeableConcept" not in st
        assert "concept" in st["medication"]
    rux = [s for s in statements if identifier_values(s, CASE_SYSTEM)]
    assert len(rux) == 12
    assert all("D11AH09" in codings(s["medication"]["concept"], ATC) for s in rux)
    ok(invoke("validate", r5_bundle, "--fhir-version", "R5"))


def test_r5_output_is_not_valid_r4(r5_bundle: Path) -> None:
    result = invoke("validate", r5_bundle)
    assert result.exit_code == 1, str(result)
    assert "MedicationStatement" in result.stdout


# --- export: rows back ------------------------------------------------------------------

def golden_lines() -> list[str]:
    return GOLDEN.read_text(encoding="utf-8").splitlines()


def exported(source: Path, tmp_path: Path, *extra: str, name: str = "cases.csv") -> tuple[Path, CliResult]:
    out = tmp_path / name
    result = ok(invoke("export", source, "-o", out, *extra))
    return out, result


def test_golden_file_is_the_example_in_canonical_form() -> None:
    lines = golden_lines()
    assert lines[0] == ",".join(CANONICAL)
    assert len(lines) == 13
    assert read_csv_rows(GOLDEN) == example_rows()


def test_export_of_the_bundle_gives_the_golden_rows(r4_bundle: Path, tmp_path: Path) -> None:
    out, result = exported(r4_bundle, tmp_path)
    raw = out.read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf")
    assert raw.decode("utf-8").splitlines() == golden_lines()
    assert "12" in result.last_stderr_line


def test_export_of_the_ndjson_folder_gives_the_golden_rows(r4_ndjson: Path, tmp_path: Path) -> None:
    out, _ = exported(r4_ndjson, tmp_path)
    assert out.read_text(encoding="utf-8").splitlines() == golden_lines()


def test_export_of_the_r5_bundle_gives_the_golden_rows(r5_bundle: Path, tmp_path: Path) -> None:
    out, _ = exported(r5_bundle, tmp_path)
    assert out.read_text(encoding="utf-8").splitlines() == golden_lines()


def test_export_of_a_collection_bundle(r4_bundle: Path, tmp_path: Path) -> None:
    bundle = json.loads(r4_bundle.read_text(encoding="utf-8"))
    collection = {"resourceType": "Bundle", "type": "collection",
                  "entry": [{"fullUrl": e["fullUrl"], "resource": e["resource"]} for e in bundle["entry"]]}
    src = tmp_path / "collection.json"
    src.write_text(json.dumps(collection), encoding="utf-8")
    out, _ = exported(src, tmp_path)
    assert out.read_text(encoding="utf-8").splitlines() == golden_lines()


def test_export_skips_foreign_resources_and_counts_them(r4_bundle: Path, tmp_path: Path) -> None:
    bundle = json.loads(r4_bundle.read_text(encoding="utf-8"))
    foreign_patient = {"resourceType": "Patient", "id": "other-team-1", "gender": "male",
                       "identifier": [{"system": "urn:oid:1.2.250.1.213.1.4.8", "value": "1234567"}]}
    foreign_obs = {"resourceType": "Observation", "id": "other-team-obs", "status": "final",
                   "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                   "subject": {"reference": "Patient/other-team-1"},
                   "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}}
    # put them first and in the middle: position must not matter
    entries = bundle["entry"]
    entries.insert(0, {"fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111", "resource": foreign_patient,
                       "request": {"method": "PUT", "url": "Patient/other-team-1"}})
    entries.insert(len(entries) // 2, {"fullUrl": "urn:uuid:22222222-2222-4222-8222-222222222222",
                                       "resource": foreign_obs,
                                       "request": {"method": "PUT", "url": "Observation/other-team-obs"}})
    src = tmp_path / "shared.json"
    src.write_text(json.dumps(bundle), encoding="utf-8")
    out, result = exported(src, tmp_path)
    assert out.read_text(encoding="utf-8").splitlines() == golden_lines()
    warnings = [line for line in result.stderr_lines if line.startswith("warning")]
    assert len(warnings) == 1, str(result)
    assert re.search(r"\b2\b", warnings[0]), warnings[0]


def test_excel_export_has_bom_and_semicolons(r4_bundle: Path, tmp_path: Path) -> None:
    out, _ = exported(r4_bundle, tmp_path, "--excel")
    raw = out.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    text = raw[3:].decode("utf-8")
    assert text.splitlines()[0] == ";".join(CANONICAL)
    rows = list(csv.DictReader(text.splitlines(), delimiter=";"))
    assert rows == example_rows()


# --- smaller cohorts --------------------------------------------------------------------

def import_rows(tmp_path: Path, rows: list[dict[str, str]], *extra: str) -> tuple[list[dict[str, Any]], CliResult]:
    src = write_cases(tmp_path / "cases.csv", rows)
    out = tmp_path / "bundle.json"
    result = ok(invoke("import", src, "-o", out, *extra))
    return bundle_resources(out), result


def export_rows(tmp_path: Path) -> list[dict[str, str]]:
    out = tmp_path / "back.csv"
    ok(invoke("export", tmp_path / "bundle.json", "-o", out))
    return read_exported_rows(out)


def test_several_cases_of_one_patient_give_one_patient(tmp_path: Path) -> None:
    rows = [
        case_row("A1", "P1", birth_date="1960-02-03", indication="dermatomyositis", improvement_pct="50",
                 evaluation_date="2024-06-02"),
        case_row("B7", "P2", sex="M", indication="chilblains"),
        case_row("A2", "P1", birth_date="1960-02-03", indication="morphea", treatment_start="2024-09-01"),
        case_row("A3", "P1", birth_date="1960-02-03", indication="dermatomyositis", frequency="QD"),
    ]
    resources, result = import_rows(tmp_path, rows)
    assert result.last_stderr_line == "accepted 4, rejected 0, total 4"
    patients = of_type(resources, "Patient")
    assert sorted(identifier_values(p, PATIENT_SYSTEM)[0] for p in patients) == ["P1", "P2"]
    p1 = next(p for p in patients if identifier_values(p, PATIENT_SYSTEM) == ["P1"])
    statements = {identifier_values(s, CASE_SYSTEM)[0]: s for s in of_type(resources, "MedicationStatement")}
    assert sorted(statements) == ["A1", "A2", "A3", "B7"]
    assert {statements[c]["subject"]["reference"] for c in ("A1", "A2", "A3")} == {ref(p1)}
    assert statements["B7"]["subject"]["reference"] != ref(p1)
    assert len(of_type(resources, "Condition")) == 4
    assert export_rows(tmp_path) == rows


def test_unknown_labels_are_kept_as_text_without_coding(tmp_path: Path) -> None:
    rows = [case_row("C1", indication="lichen_planus", prior_treatments="phototherapy;tacrolimus",
                     adverse_events="headache;burning", evaluation_date="2024-07-01")]
    resources, result = import_rows(tmp_path, rows)
    assert result.last_stderr_line == "accepted 1, rejected 0, total 1"
    warned = " ".join(result.stderr_lines[:-1])
    for label in ("lichen_planus", "phototherapy", "headache"):
        assert label in warned
    (condition,) = of_type(resources, "Condition")
    assert condition["code"] == {"text": "lichen_planus"}
    prior = [s for s in of_type(resources, "MedicationStatement") if not identifier_values(s, CASE_SYSTEM)]
    assert prior[0]["medicationCodeableConcept"] == {"text": "phototherapy"}
    assert prior[1]["medicationCodeableConcept"].get("coding")  # known label keeps its coding
    events = of_type(resources, "AdverseEvent")
    assert events[0]["event"] == {"text": "headache"}
    assert "90673000" in codings(events[1]["event"], SNOMED)
    assert export_rows(tmp_path) == rows


def test_evaluation_date_without_improvement_gives_data_absent_reason(tmp_path: Path) -> None:
    rows = [case_row("C1", evaluation_date="2024-08-01"), case_row("C2", patient_id="P2")]
    resources, _ = import_rows(tmp_path, rows)
    observations = of_type(resources, "Observation")
    assert len(observations) == 1  # no evaluation, no improvement: no observation for C2
    (obs,) = observations
    assert identifier_values(obs, RESOURCE_SYSTEM)[0].startswith("C1:")
    assert obs["effectiveDateTime"] == "2024-08-01"
    assert obs["dataAbsentReason"]["coding"][0]["system"] == "http://terminology.hl7.org/CodeSystem/data-absent-reason"
    assert not [k for k in obs if k.startswith("value")]
    assert obs["partOf"] and obs["focus"]
    assert export_rows(tmp_path) == rows


def test_score_name_without_values_is_not_lost(tmp_path: Path) -> None:
    # score_name, baseline_score and followup_score are each optional: a row may name its score
    # before any value is recorded. It is accepted, so import -> export must keep the name.
    rows = [case_row("C1", score_name="CDASI", evaluation_date="2024-08-01", improvement_pct="20"),
            case_row("C2", patient_id="P2", score_name="CLASI")]
    _, result = import_rows(tmp_path, rows)
    assert result.last_stderr_line == "accepted 2, rejected 0, total 2"
    assert export_rows(tmp_path) == rows


def test_r5_round_trip_of_every_optional_column(tmp_path: Path) -> None:
    rows = [
        case_row("C1", birth_date="1950", site="face", disease_onset="2019", prior_treatments="isotretinoin",
                 evaluation_date="2024-07-01", improvement_pct="-12.5", score_name="CLASI", baseline_score="12",
                 followup_score="14.25", adverse_events="pruritus;erythema", recurrence_after_stop="no",
                 sex="other"),
        case_row("C2", patient_id="P2", sex="unknown", frequency="QD", recurrence_after_stop="yes"),
    ]
    resources, _ = import_rows(tmp_path, rows, "--fhir-version", "R5")
    assert {s["status"] for s in of_type(resources, "MedicationStatement")} == {"recorded"}
    assert export_rows(tmp_path) == rows


def test_export_keeps_case_order_and_lists_in_input_order(tmp_path: Path) -> None:
    rows = [case_row("Z9", prior_treatments="tacrolimus;topical_steroids;pimecrolimus"),
            case_row("A1", patient_id="P2", adverse_events="erythema;burning;pruritus")]
    import_rows(tmp_path, rows)
    assert export_rows(tmp_path) == rows


def test_export_of_foreign_only_data_writes_a_header_and_warns(tmp_path: Path) -> None:
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": {"resourceType": "Patient", "id": "x1", "gender": "female"}, "search": {"mode": "match"}},
    ]}
    src = tmp_path / "foreign.json"
    src.write_text(json.dumps(bundle), encoding="utf-8")
    out, result = exported(src, tmp_path)
    assert out.read_text(encoding="utf-8").splitlines() == [",".join(CANONICAL)]
    warnings = [line for line in result.stderr_lines if line.startswith("warning")]
    assert len(warnings) == 1 and re.search(r"\b1\b", warnings[0]), str(result)


def test_export_after_editing_a_value_in_fhir(r4_bundle: Path, tmp_path: Path) -> None:
    # export reads the resources, not a cache of the CSV: change one value, see it in the row
    bundle = json.loads(r4_bundle.read_text(encoding="utf-8"))
    changed = copy.deepcopy(bundle)
    for entry in changed["entry"]:
        res = entry["resource"]
        if res["resourceType"] == "Observation" and identifier_values(res, RESOURCE_SYSTEM) == ["C03:improvement"]:
            res["valueQuantity"]["value"] = 42.5
    src = tmp_path / "edited.json"
    src.write_text(json.dumps(changed), encoding="utf-8")
    out, _ = exported(src, tmp_path)
    rows = read_csv_rows(out)
    expected = example_rows()
    expected[2]["improvement_pct"] = "42.5"
    assert rows == expected


def test_decimals_keep_their_digits(tmp_path: Path) -> None:
    # A value must come back as written (normalised), never as the nearest binary float.
    # Up to 15 significant digits survive every JSON/FHIR hop; more are rejected with a clear
    # reason rather than silently rounded (33.33333333333333333 -> 33.333333333333336 would
    # invent a digit).
    rows = [case_row("C1", improvement_pct="33.3333333333333", score_name="CDASI",
                     baseline_score="123456789012.345", followup_score="0.1")]
    resources, _ = import_rows(tmp_path, rows)
    assert export_rows(tmp_path) == rows
    assert len(of_type(resources, "Observation")) == 3
    src = write_cases(tmp_path / "precise.csv", [case_row("C2", improvement_pct="33.33333333333333333")])
    result = invoke("import", src, "-o", tmp_path / "precise.json")
    assert result.exit_code == 1
    assert result.last_stderr_line == "accepted 0, rejected 1, total 1"
    assert "significant digits" in (tmp_path / "precise.rejects.csv").read_text()
