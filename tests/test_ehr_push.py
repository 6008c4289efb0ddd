"""EHR mode end to end (issue 12): server-assigned ids, linking to the EHR's Patients, no lost
updates, retractions -- the CLI in a subprocess against both real engines, Medplum
(tests/fhir_server) and HAPI FHIR JPA (tests/hapi_server), refusing client-assigned ids where the
test is about server-assigned ids (HAPI's own NOT_ALLOWED strategy; Medplum front `no_client_ids`,
as Epic does).

What the server holds is read with plain HTTP or the admin API, never through the code under test.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest
import requests
from e2e_cli import Run as BaseRun
from e2e_cli import run_cli
from engines import both_engines_fixture
from fhirserver import TestFhirServer
from helpers import DEFAULT_MAPPING, EXAMPLE_CSV, PATIENT_SYSTEM

pytestmark = pytest.mark.e2e
FHIR_JSON = "application/fhir+json"
RESOURCE_SYSTEM = "https://ruxo-fhir.example/sid/case-resource"
CASE_SYSTEM = "https://ruxo-fhir.example/sid/case-id"
MRN = "https://hospital.example/sid/mrn"
SUMMARY = re.compile(r"created (\d+), updated (\d+), unchanged (\d+), conflict (\d+), rejected (\d+), total (\d+)")
fhir_server = both_engines_fixture()  # Medplum and HAPI FHIR JPA
EXAMPLE_COUNTS = {"AdverseEvent": 1, "Condition": 12, "MedicationStatement": 32, "Observation": 17, "Patient": 12}


class Run(BaseRun):
    def summary(self) -> dict[str, int]:
        found = SUMMARY.findall(self.stderr)
        assert found, f"no push summary line\n{self}"
        names = ("created", "updated", "unchanged", "conflict", "rejected", "total")
        return dict(zip(names, map(int, found[-1])))


def cli(*args: str | Path, state: Path) -> Run:
    return run_cli(Run, *args, state=state)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def engine(server: TestFhirServer) -> str:
    return str(getattr(server, "engine", "medplum"))


def like_an_ehr(server: TestFhirServer, *, client_ids: bool = False) -> None:
    """Serial version ids and references checked (HAPI does both by itself; the Medplum front is
    switched to), client-assigned ids refused unless `client_ids`."""
    switches: dict[str, Any] = {} if client_ids else {"no_client_ids": True}
    if engine(server) == "medplum":
        switches.update(version_ids="serial", referential_integrity=True)
    if switches:
        server.configure(**switches)


@pytest.fixture
def ehr(fhir_server: TestFhirServer) -> TestFhirServer:
    """An EHR-like server: client-assigned ids refused, serial version ids, references checked."""
    like_an_ehr(fhir_server)
    return fhir_server


def counts(server: TestFhirServer) -> dict[str, int]:
    return server.counts()


def search_all(server: TestFhirServer, kind: str, **params: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    url: str | None = f"{server.base_url}/{kind}"
    query: dict[str, str] | None = {"_count": "200", **params}
    while url:
        page = requests.get(url, params=query, headers={"Accept": FHIR_JSON}, timeout=30).json()
        out += [e["resource"] for e in page.get("entry", [])]
        url = next((ln["url"] for ln in page.get("link", []) if ln["relation"] == "next"), None)
        query = None
    return out


def ident(resource: dict[str, Any], system: str) -> str | None:
    idents = resource.get("identifier")
    idents = [idents] if isinstance(idents, dict) else idents or []
    return next((i["value"] for i in idents if i.get("system") == system), None)


def by_identifier(server: TestFhirServer, kind: str, system: str, value: str) -> list[dict[str, Any]]:
    return search_all(server, kind, identifier=f"{system}|{value}")


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def mapping_with(tmp_path: Path, block: str) -> Path:
    path = tmp_path / "site.yaml"
    text = DEFAULT_MAPPING.read_text(encoding="utf-8")
    path.write_text(text.replace("identifier_systems:\n", block + "\nidentifier_systems:\n", 1), encoding="utf-8")
    return path


def outcome_counts(run: Run) -> tuple[int, int, int]:
    doc = json.loads(run.stdout)
    s = doc["summary"]
    return s["complete"], s["partial"], s["none"]


# --- server-assigned ids -------------------------------------------------------------------------

def test_ids_server_example_exact_counts_repush_nothing_pull_export_outcomes(
        ehr: TestFhirServer, state: Path, tmp_path: Path) -> None:
    base = ehr.base_url
    first = cli("push", EXAMPLE_CSV, "--server", base, "--ids", "server", state=state)
    assert first.exit_code == 0, first
    s = first.summary()
    assert (s["created"], s["total"]) == (74, 74) and s["updated"] == s["rejected"] == s["conflict"] == 0, first
    assert counts(ehr) == EXAMPLE_COUNTS
    writes = ehr.stats()["entries_written"]
    assert writes == 74

    # the server chose the ids: references point at them, not at our derived ids
    patients = {p["id"]: ident(p, PATIENT_SYSTEM) for p in search_all(ehr, "Patient")}
    statements = search_all(ehr, "MedicationStatement", identifier=f"{CASE_SYSTEM}|")
    assert len(statements) == 12
    for ms in statements:
        assert ms["subject"]["reference"].split("/")[1] in patients
    obs = search_all(ehr, "Observation")
    conditions = {c["id"] for c in search_all(ehr, "Condition")}
    assert all(o["focus"][0]["reference"].split("/")[1] in conditions for o in obs)

    again = cli("push", EXAMPLE_CSV, "--server", base, "--ids", "server", state=state)
    assert again.exit_code == 0, again
    assert again.summary()["unchanged"] == 74 and again.summary()["created"] == 0, again
    assert ehr.stats()["entries_written"] == writes, "the re-push wrote"

    pulled = tmp_path / "pulled.json"
    assert cli("pull", "--server", base, "-o", pulled, state=state).exit_code == 0
    out_csv = tmp_path / "back.csv"
    assert cli("export", pulled, "-o", out_csv, state=state).exit_code == 0
    with EXAMPLE_CSV.open(encoding="utf-8", newline="") as fh:
        want = list(csv.DictReader(fh))
    assert rows(out_csv) == want
    out = cli("outcomes", "--server", base, "--format", "json", state=state)
    assert out.exit_code == 0, out
    assert outcome_counts(out) == (6, 5, 1)


@pytest.mark.parametrize("flight", [
    (),
    # one bundle in flight: a refusal is met when the last bundles land (HAPI)
    ("--concurrency", "4"),
    # eight bundles, four in flight: met while later ones wait to be sent
    ("--concurrency", "4", "--batch-size", "10"),
], ids=["sequential", "c4-one-bundle", "c4-eight-bundles"])
def test_auto_picks_server_ids_and_says_so_once(ehr: TestFhirServer, state: Path, flight: tuple[str, ...]) -> None:
    run = cli("push", EXAMPLE_CSV, "--server", ehr.base_url, *flight, state=state)
    assert run.exit_code == 0, run
    said = [ln for ln in run.lines if "server-assigned ids" in ln]
    # the reason is whichever the engine gives first: its statement (Medplum front: updateCreate
    # false) or, where the statement does not say so (HAPI keeps updateCreate true whatever its id
    # strategy), the refusal of the first PUT-create -- which then wrote nothing
    statement = requests.get(f"{ehr.base_url}/metadata", headers={"Accept": FHIR_JSON}, timeout=30).json()
    declared = [r.get("updateCreate") for rest in statement.get("rest", []) for r in rest.get("resource", [])
                if r.get("type") in EXAMPLE_COUNTS]
    reason = "updateCreate false" if False in declared else "refused a client-assigned id"
    assert len(said) == 1 and reason in said[0], run
    assert run.summary()["created"] == 74 and counts(ehr) == EXAMPLE_COUNTS
    assert ehr.stats()["entries_written"] == 74


def test_ids_client_against_a_server_refusing_them_is_one_line(ehr: TestFhirServer, state: Path) -> None:
    run = cli("push", EXAMPLE_CSV, "--server", ehr.base_url, "--ids", "client", state=state)
    assert run.exit_code == 4, run
    assert "refuses client-assigned ids" in run.lines[-1] and "--ids server" in run.lines[-1], run
    assert "Traceback" not in run.stderr and counts(ehr) == {}


@pytest.mark.parametrize(("fault", "mode"), [("drop_after", "transaction"), ("drop_before", "transaction"),
                                             ("503", "transaction"), ("drop_after", "batch")])
def test_server_ids_lost_replies_and_retries_never_duplicate(ehr: TestFhirServer, state: Path, fault: str,
                                                              mode: str) -> None:
    """On HAPI the AdverseEvent (no identifier search in R4) is a plain POST: its bundle is never
    resent blindly; push looks again and counts what landed."""
    ehr.configure(faults={fault: 2})  # every second write fails or loses its reply
    run = cli("push", EXAMPLE_CSV, "--server", ehr.base_url, "--ids", "server", "--batch-size", "10",
              "--mode", mode, state=state)
    assert run.exit_code == 0, run
    s = run.summary()
    assert s["created"] == 74 and s["total"] == 74, run
    assert sum(ehr.stats()["faults_injected"].values()) > 0
    ehr.configure(faults={fault: 0})
    assert counts(ehr) == EXAMPLE_COUNTS  # nothing doubled
    again = cli("push", EXAMPLE_CSV, "--server", ehr.base_url, "--ids", "server", state=state)
    assert again.summary()["unchanged"] == 74, again


def test_several_matches_reject_that_case_naming_the_identifier(ehr: TestFhirServer, state: Path) -> None:
    first = cli("push", EXAMPLE_CSV, "--server", ehr.base_url, "--ids", "server", state=state)
    assert first.exit_code == 0, first
    # someone else created a second Observation with C03's improvement identifier
    dup = by_identifier(ehr, "Observation", RESOURCE_SYSTEM, "C03:improvement")[0]
    dup = {k: v for k, v in dup.items() if k not in ("id", "meta")}
    r = requests.post(f"{ehr.base_url}/Observation", data=json.dumps(dup),
                      headers={"Content-Type": FHIR_JSON}, timeout=30)
    assert r.status_code == 201, r.text
    changed = EXAMPLE_CSV.read_text(encoding="utf-8").replace("2024-10-08,85,", "2024-10-08,86,")
    changed = changed.replace("2024-06-14,90,", "2024-06-14,91,")  # C01 changes too
    src = state.parent / "cases.csv"
    src.write_text(changed, encoding="utf-8")
    run = cli("push", src, "--server", ehr.base_url, "--ids", "server", state=state)
    assert run.exit_code == 1, run
    s = run.summary()
    assert s["updated"] == 1 and s["rejected"] == 6, run  # C03 whole: Patient, Condition, 3 statements, Observation
    lines = [ln for ln in run.lines if ln.startswith("rejected:")]
    assert len(lines) == 1 and "case C03" in lines[0] and f"{RESOURCE_SYSTEM}|C03:improvement" in lines[0], run
    rejects = rows(state.parent / "cases.push-rejects.csv")
    assert [(r["case_id"], r["row"]) for r in rejects] == [("C03", "4")]
    c01 = by_identifier(ehr, "Observation", RESOURCE_SYSTEM, "C01:improvement")[0]
    assert c01["valueQuantity"]["value"] == 91
    assert all(o["valueQuantity"]["value"] == 85 for o in by_identifier(ehr, "Observation", RESOURCE_SYSTEM,
                                                                         "C03:improvement"))


# --- linking to the EHR's own Patients ------------------------------------------------------------

def ehr_patients(server: TestFhirServer, mrns: list[str]) -> dict[str, dict[str, Any]]:
    """Patients created beforehand by another client (the EHR), under its MRN system."""
    out = {}
    for mrn in mrns:
        body = {"resourceType": "Patient", "identifier": [{"system": MRN, "value": mrn}],
                "name": [{"family": "Registered"}], "gender": "female"}
        r = requests.post(f"{server.base_url}/Patient", data=json.dumps(body),
                          headers={"Content-Type": FHIR_JSON}, timeout=30)
        assert r.status_code == 201, r.text
        out[mrn] = r.json()
    return out


@pytest.mark.parametrize("ids", ["server", "client"])
def test_link_mode_references_existing_patients_never_writes_them(
        fhir_server: TestFhirServer, state: Path, tmp_path: Path, ids: str) -> None:
    like_an_ehr(fhir_server, client_ids=ids == "client")
    mapping = mapping_with(tmp_path, f"patients:\n  mode: link\n  match_system: {MRN}\n")
    existing = ehr_patients(fhir_server, [f"P{i:02d}" for i in range(1, 12)])  # P12 unknown to the EHR
    before = {mrn: (p["meta"]["versionId"], p["meta"]["lastUpdated"]) for mrn, p in existing.items()}

    run = cli("push", EXAMPLE_CSV, "--server", fhir_server.base_url, "--mapping", mapping, "--ids", ids,
              "--rejects", tmp_path / "rejects.csv", state=state)
    assert run.exit_code == 1, run
    s = run.summary()
    # C12 (patient P12: 4 resources) rejected; the other 11 cases' 58 resources created
    assert (s["created"], s["rejected"], s["total"]) == (58, 4, 62), run
    lines = [ln for ln in run.lines if ln.startswith("rejected:")]
    assert len(lines) == 1 and "case C12" in lines[0] and "P12 not found" in lines[0], run
    assert [(r["case_id"], r["row"], "P12" in r["error"]) for r in rows(tmp_path / "rejects.csv")] \
        == [("C12", "13", True)]

    # no Patient created or changed
    patients = search_all(fhir_server, "Patient")
    assert len(patients) == 11
    for p in patients:
        mrn = ident(p, MRN)
        assert mrn is not None and (p["meta"]["versionId"], p["meta"]["lastUpdated"]) == before[mrn]
    # every subject is the pre-existing Patient
    ids_by_mrn = {mrn: p["id"] for mrn, p in existing.items()}
    for kind in ("Condition", "MedicationStatement", "Observation", "AdverseEvent"):
        for r in search_all(fhir_server, kind):
            case = (ident(r, CASE_SYSTEM) or ident(r, RESOURCE_SYSTEM) or "").split(":")[0]
            assert r["subject"]["reference"] == f"Patient/{ids_by_mrn['P' + case[1:]]}", r

    again = cli("push", EXAMPLE_CSV, "--server", fhir_server.base_url, "--mapping", mapping, "--ids", ids,
                "--rejects", tmp_path / "rej.csv", state=state)
    assert again.summary()["unchanged"] == 58 and again.summary()["rejected"] == 4, again
    out = cli("outcomes", "--server", fhir_server.base_url, "--mapping", mapping, "--format", "json", state=state)
    assert out.exit_code == 0, out
    assert json.loads(out.stdout)["summary"]["n"] == 11


def test_link_or_create_creates_only_missing_patients_with_the_mrn(
        ehr: TestFhirServer, state: Path, tmp_path: Path) -> None:
    mapping = mapping_with(tmp_path, f"patients:\n  mode: link-or-create\n  match_system: {MRN}\n")
    existing = ehr_patients(ehr, ["P01", "P02"])
    run = cli("push", EXAMPLE_CSV, "--server", ehr.base_url, "--mapping", mapping, state=state)
    assert run.exit_code == 0, run
    s = run.summary()
    assert (s["created"], s["unchanged"]) == (72, 2), run  # 10 Patients + 62 case resources
    patients = search_all(ehr, "Patient")
    assert len(patients) == 12
    for p in patients:
        assert ident(p, MRN) is not None
        if ident(p, MRN) in existing:
            assert p["meta"]["versionId"] == existing[ident(p, MRN)]["meta"]["versionId"]  # untouched
            assert ident(p, PATIENT_SYSTEM) is None
        else:
            assert ident(p, PATIENT_SYSTEM) == ident(p, MRN)
    c01 = by_identifier(ehr, "MedicationStatement", CASE_SYSTEM, "C01")[0]
    assert c01["subject"]["reference"] == f"Patient/{existing['P01']['id']}"


# --- no lost updates ------------------------------------------------------------------------------

def test_server_edit_survives_repush_as_a_conflict_dry_run_shows_it(ehr: TestFhirServer, state: Path) -> None:
    assert cli("push", EXAMPLE_CSV, "--server", ehr.base_url, state=state).exit_code == 0
    # a clinician corrects C05's improvement in the EHR
    obs = by_identifier(ehr, "Observation", RESOURCE_SYSTEM, "C05:improvement")[0]
    obs["valueQuantity"]["value"] = 70
    r = requests.put(f"{ehr.base_url}/Observation/{obs['id']}", data=json.dumps(obs),
                     headers={"Content-Type": FHIR_JSON}, timeout=30)
    assert r.status_code == 200, r.text
    received = ehr.stats()["write_entries_received"]

    dry = cli("push", EXAMPLE_CSV, "--server", ehr.base_url, "--dry-run", state=state)
    assert dry.exit_code == 1, dry
    shown = [ln for ln in dry.out_lines if ln.strip().startswith("conflict:")]
    assert len(shown) == 1 and "case C05" in shown[0] and obs["id"] in shown[0] and "valueQuantity" in shown[0]

    run = cli("push", EXAMPLE_CSV, "--server", ehr.base_url, state=state)
    assert run.exit_code == 1, run
    s = run.summary()
    assert (s["conflict"], s["unchanged"], s["updated"], s["created"]) == (1, 73, 0, 0), run
    lines = [ln for ln in run.lines if ln.startswith("conflict:")]
    assert len(lines) == 1 and "case C05, row 6" in lines[0] and f"Observation/{obs['id']}" in lines[0], run
    assert ehr.stats()["write_entries_received"] == received
    assert by_identifier(ehr, "Observation", RESOURCE_SYSTEM, "C05:improvement")[0]["valueQuantity"]["value"] == 70
    report = state.parent / "report.json"
    again = cli("push", EXAMPLE_CSV, "--server", ehr.base_url, "--report", report, state=state)
    assert again.summary()["conflict"] == 1 and json.loads(report.read_text())["counts"]["conflict"] == 1


@pytest.mark.parametrize("ids", ["client", "server"])
def test_two_teams_same_identifiers_second_gets_conflicts_first_untouched(
        fhir_server: TestFhirServer, tmp_path: Path, ids: str) -> None:
    if ids == "server":
        fhir_server.configure(no_client_ids=True)  # HAPI: its NOT_ALLOWED id strategy
    team_a = cli("push", EXAMPLE_CSV, "--server", fhir_server.base_url, "--ids", ids, state=tmp_path / "a")
    assert team_a.exit_code == 0, team_a
    before = {k: sorted(json.dumps(r, sort_keys=True) for r in search_all(fhir_server, k)) for k in EXAMPLE_COUNTS}
    # team B, another workstation with the shipped mapping: its own C01/P01 (other patient, other data)
    team_b_csv = tmp_path / "b.csv"
    team_b_csv.write_text(
        "case_id,patient_id,sex,birth_date,indication,site,disease_onset,prior_treatments,treatment_start,"
        "frequency,evaluation_date,improvement_pct,score_name,baseline_score,followup_score,adverse_events,"
        "recurrence_after_stop\n"
        "C01,P01,M,1970-01-01,morphea,trunk,2020-01,,2024-01-10,QD,2024-03-10,20,,,,,\n", encoding="utf-8")
    team_b = cli("push", team_b_csv, "--server", fhir_server.base_url, "--ids", ids, state=tmp_path / "b")
    assert team_b.exit_code == 1, team_b
    s = team_b.summary()
    assert s["conflict"] == 4 and s["created"] == s["updated"] == 0, team_b  # Patient, Condition, statement, Obs
    assert len([ln for ln in team_b.lines if ln.startswith("conflict:")]) == 4
    after = {k: sorted(json.dumps(r, sort_keys=True) for r in search_all(fhir_server, k)) for k in EXAMPLE_COUNTS}
    assert after == before, "team A's data changed"
    out = cli("outcomes", "--server", fhir_server.base_url, "--format", "json", state=tmp_path / "a")
    assert outcome_counts(out) == (6, 5, 1)


# --- retractions ------------------------------------------------------------------------------------

def without_case(tmp_path: Path, case_id: str) -> Path:
    lines = EXAMPLE_CSV.read_text(encoding="utf-8").splitlines(keepends=True)
    out = tmp_path / "cases.csv"
    out.write_text("".join(ln for ln in lines if not ln.startswith(f"{case_id},")), encoding="utf-8")
    return out


def test_prune_retracts_exactly_a_removed_case_and_outcomes_drop_it(ehr: TestFhirServer, state: Path,
                                                                    tmp_path: Path) -> None:
    assert cli("push", EXAMPLE_CSV, "--server", ehr.base_url, state=state).exit_code == 0
    src = without_case(tmp_path, "C09")  # C09: Condition, 3 statements, Observation, AdverseEvent
    told = cli("push", src, "--server", ehr.base_url, state=state)
    assert told.exit_code == 0, told
    assert any("6 cohort resource(s) on the server are no longer produced" in ln for ln in told.lines), told
    assert counts(ehr) == EXAMPLE_COUNTS  # nothing retracted without --prune

    listed = cli("push", src, "--server", ehr.base_url, "--dry-run", "--prune", state=state)
    assert listed.exit_code == 0, listed
    shown = [ln.strip() for ln in listed.out_lines if ln.strip().startswith("would retract:")]
    assert len(shown) == 6 and all("case C09" in ln for ln in shown), listed
    assert sum("(delete)" in ln for ln in shown) == 1 and counts(ehr) == EXAMPLE_COUNTS

    run = cli("push", src, "--server", ehr.base_url, "--prune", state=state)
    assert run.exit_code == 0, run
    assert any("retracted 6 of 6" in ln for ln in run.lines), run
    assert counts(ehr) == {**EXAMPLE_COUNTS, "AdverseEvent": 0} or counts(ehr) == {
        k: v for k, v in EXAMPLE_COUNTS.items() if k != "AdverseEvent"}
    for kind in ("MedicationStatement", "Observation"):
        for r in search_all(ehr, kind):
            case = (ident(r, CASE_SYSTEM) or ident(r, RESOURCE_SYSTEM) or "").split(":")[0]
            assert (r["status"] == "entered-in-error") == (case == "C09"), r
    cond = by_identifier(ehr, "Condition", RESOURCE_SYSTEM, "C09:condition")[0]
    assert cond["verificationStatus"]["coding"][0]["code"] == "entered-in-error" and "clinicalStatus" not in cond
    assert len(search_all(ehr, "Patient")) == 12  # Patients never touched
    out = cli("outcomes", "--server", ehr.base_url, "--format", "json", state=state)
    doc = json.loads(out.stdout)
    assert doc["summary"]["n"] == 11 and "C09" not in {c["case_id"] for c in doc["cases"]}
    again = cli("push", src, "--server", ehr.base_url, "--prune", state=state)
    assert again.exit_code == 0 and again.summary()["unchanged"] == 67, again  # P09 left the source too

    # the case comes back: its retracted resources are written again (our own last write)
    back = cli("push", EXAMPLE_CSV, "--server", ehr.base_url, state=state)
    assert back.exit_code == 0, back
    assert back.summary()["conflict"] == 0 and back.summary()["updated"] == 5 and back.summary()["created"] == 1


def test_prune_guard_refuses_more_than_20_percent(ehr: TestFhirServer, state: Path, tmp_path: Path) -> None:
    assert cli("push", EXAMPLE_CSV, "--server", ehr.base_url, state=state).exit_code == 0
    lines = EXAMPLE_CSV.read_text(encoding="utf-8").splitlines(keepends=True)
    partial = tmp_path / "partial.csv"
    partial.write_text("".join(lines[:7]), encoding="utf-8")  # C01..C06 only: half the registry
    run = cli("push", partial, "--server", ehr.base_url, "--prune", state=state)
    assert run.exit_code == 1, run
    assert any("--prune refused" in ln and "--prune-max" in ln for ln in run.lines), run
    assert counts(ehr) == EXAMPLE_COUNTS
    gone = cli("push", partial, "--server", ehr.base_url, "--prune", "--prune-max", "60", state=state)
    assert gone.exit_code == 0, gone
    out = cli("outcomes", "--server", ehr.base_url, "--format", "json", state=state)
    assert json.loads(out.stdout)["summary"]["n"] == 6
