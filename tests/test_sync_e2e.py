"""End-to-end push and pull against the real test FHIR server (Medplum's engine, tests/fhir_server).

No mocks of our code: the CLI runs in a subprocess (`python -m ruxo_fhir`) with its own push
ledger per test (RUXO_FHIR_STATE_DIR=tmp_path/state), or the library's `push()` runs with a real
`FhirClient` where a short-sleeping RetryPolicy keeps the fault-injection runs fast. What the
server holds is read through its admin API (`/$admin/count`, `/$admin/stats`), independently of
the code under test.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import requests
from cohort_gen import generate_cases
from e2e_cli import Run as BaseRun
from e2e_cli import run_cli
from engines import both_engines_fixture, medplum_only
from fhirserver import TestFhirServer

pytestmark = pytest.mark.e2e  # every test here starts the test FHIR server

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CSV = REPO / "examples" / "cases.csv"
CASE_SYSTEM = "https://ruxo-fhir.example/sid/case-id"
PATIENT_SYSTEM = "https://ruxo-fhir.example/sid/patient-id"
RESOURCE_SYSTEM = "https://ruxo-fhir.example/sid/case-resource"
FHIR_JSON = "application/fhir+json"
ALL_FAULTS = {"429": 7, "503": 11, "drop_before": 13, "drop_after": 17}
SUMMARY = re.compile(r"created (\d+), updated (\d+), unchanged (\d+), conflict (\d+), rejected (\d+), total (\d+)")
RUN_LINE = re.compile(r"mode (\w+), (\d+) bundle\(s\), (\d+) request\(s\)")
# How push counts a `PUT Type/id` that created the resource. FHIR says 201; Medplum's router answers
# 200 with an `ok` outcome; push read the server before writing (nothing there), so it counts created.
PUT_CREATE_COUNTED_AS = "created"
# ... per engine: HAPI FHIR JPA answers 201 Created.
PUT_CREATE_COUNTED = {"medplum": PUT_CREATE_COUNTED_AS, "hapi": "created"}


def declared_system_interactions(server: Any) -> set[str]:
    """The system interactions the CapabilityStatement lists (push bundles its reads where it
    lists `batch`, else `transaction`)."""
    statement = requests.get(server.base_url + "/metadata", headers={"Accept": FHIR_JSON}, timeout=60).json()
    return {str(i.get("code")) for rest in statement.get("rest", []) for i in rest.get("interaction", [])}


def counted_as(server: Any) -> str:
    """The summary field a `PUT Type/id` that created the resource lands in, on this engine."""
    return PUT_CREATE_COUNTED[getattr(server, "engine", "medplum")]


pytestmark = pytest.mark.e2e

# Every test here runs on both real engines: Medplum's router (tests/fhir_server) and HAPI FHIR JPA
# (tests/hapi_server behind tests/fault_front.py).
fhir_server = both_engines_fixture()

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


class Run(BaseRun):

    def summary(self) -> dict[str, int]:
        found = SUMMARY.findall(self.stderr)
        assert found, f"no push summary line\n{self}"
        created, updated, unchanged, conflict, rejected, total = map(int, found[-1])
        return {"created": created, "updated": updated, "unchanged": unchanged, "conflict": conflict,
                "rejected": rejected, "total": total}

    def run_line(self) -> tuple[str, int, int]:
        found = RUN_LINE.findall(self.stderr)
        assert found, f"no 'mode ..., N bundle(s), M request(s)' line\n{self}"
        mode, bundles, reqs = found[-1]
        return mode, int(bundles), int(reqs)


def cli(*args: str | Path, state: Path, env: dict[str, str] | None = None, timeout: float = 300) -> Run:
    """`python -m ruxo_fhir ARGS` in a subprocess, with a per-test ledger directory."""
    return run_cli(Run, *args, state=state, env=env, timeout=timeout)


def import_bundle(csv_path: Path, out: Path, state: Path) -> Path:
    run = cli("import", csv_path, "-o", out, state=state)
    assert run.exit_code == 0, run
    return out


def bundle_resources(path: Path) -> list[dict[str, Any]]:
    return [e["resource"] for e in json.loads(path.read_text(encoding="utf-8"))["entry"]]


def type_counts(resources: Iterable[dict[str, Any]]) -> dict[str, int]:
    return dict(Counter(r["resourceType"] for r in resources))


def keys(resources: Iterable[dict[str, Any]]) -> set[str]:
    return {f"{r['resourceType']}/{r['id']}" for r in resources}


def server_count(server: TestFhirServer) -> dict[str, int]:
    r = requests.get(f"{server.root_url}/$admin/count", timeout=30)
    r.raise_for_status()
    out: dict[str, int] = r.json()
    return out


def server_keys(server: TestFhirServer, types: Iterable[str]) -> set[str]:
    """Type/id of every resource on the server (read with plain requests, every page)."""
    found: set[str] = set()
    for kind in types:
        url: str | None = f"{server.base_url}/{kind}?_count=1000&_elements=id"
        while url:
            page = requests.get(url, headers={"Accept": FHIR_JSON}, timeout=30).json()
            found |= {f"{kind}/{e['resource']['id']}" for e in page.get("entry", [])}
            url = next((ln["url"] for ln in page.get("link", []) if ln["relation"] == "next"), None)
    return found


def identifier_values(resource: dict[str, Any], system: str) -> list[str]:
    ident = resource.get("identifier")
    idents = [ident] if isinstance(ident, dict) else (ident or [])
    return [i.get("value") for i in idents if i.get("system") == system]


def case_group(resources: list[dict[str, Any]], case_id: str, patient_id: str) -> list[dict[str, Any]]:
    """The resources of one case plus its Patient (for a patient with only this case)."""
    out = []
    for r in resources:
        if identifier_values(r, CASE_SYSTEM) == [case_id] or any(v.startswith(f"{case_id}:") for v in identifier_values(r, RESOURCE_SYSTEM)) or (r["resourceType"] == "Patient" and identifier_values(r, PATIENT_SYSTEM) == [patient_id]):
            out.append(r)
    return out


def read_rows(path: Path) -> set[tuple[tuple[str, str], ...]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        return {tuple(sorted(row.items())) for row in csv.DictReader(fh)}


def ndjson_dir(directory: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(directory.glob("*.ndjson")):
        out += [json.loads(ln) for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return out


def _json_value(node: Any) -> Any:
    """JSON numbers compare by value (a server may write 1.0 back as 1)."""
    if isinstance(node, dict):
        return {k: _json_value(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_json_value(v) for v in node]
    if isinstance(node, float) and node.is_integer():
        return int(node)
    return node


def without_meta(resource: dict[str, Any]) -> str:
    """Canonical text of a resource without `meta` (which the server owns)."""
    return json.dumps(_json_value({k: v for k, v in resource.items() if k != "meta"}), sort_keys=True)


def post(server: TestFhirServer, resource: dict[str, Any]) -> dict[str, Any]:
    r = requests.post(f"{server.base_url}/{resource['resourceType']}", data=json.dumps(resource),
                      headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}, timeout=30)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def example_bundle(tmp_path: Path, state: Path) -> Path:
    return import_bundle(EXAMPLE_CSV, tmp_path / "example.json", state)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, Path]]:
    """{n: (cases.csv, bundle.json)} for generated cohorts, imported once per module."""
    from ruxo_fhir.importer import import_cases
    from ruxo_fhir.mapping.spec import load_mapping

    base = tmp_path_factory.mktemp("generated")
    out: dict[int, tuple[Path, Path]] = {}
    for n in (1500, 1000, 120, 100):
        src = base / f"cases{n}.csv"
        src.write_text(generate_cases(n, seed=20240), encoding="utf-8")
        dst = base / f"bundle{n}.json"
        result = import_cases(src, dst, mapping=load_mapping())
        assert result.report.rejected == 0, "the generator must produce valid rows only"
        assert result.report.accepted == n
        out[n] = (src, dst)
    return out


def test_cohort_generator_is_seeded_valid_and_varied() -> None:
    from cohort_gen import COLUMNS, INDICATIONS, generate_rows

    assert generate_cases(200, seed=3) == generate_cases(200, seed=3)
    assert generate_cases(200, seed=3) != generate_cases(200, seed=4)
    rows = generate_rows(300, seed=3)
    assert {r["indication"] for r in rows} == set(INDICATIONS)
    per_patient = Counter(r["patient_id"] for r in rows)
    assert max(per_patient.values()) >= 2 and min(per_patient.values()) == 1
    for column in COLUMNS:
        values = [r[column] for r in rows]
        if column in ("case_id", "patient_id", "sex", "indication", "treatment_start", "frequency"):
            assert all(values), column
        else:
            assert any(values) and not all(values), f"{column} is never/always empty"
    by_patient: dict[str, set[tuple[str, str]]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], set()).add((r["sex"], r["birth_date"]))
    assert all(len(v) == 1 for v in by_patient.values())  # one sex and birth date per patient


# --------------------------------------------------------------------------------------------
# 1. push twice: exact counts, the second run writes nothing
# --------------------------------------------------------------------------------------------


def test_push_example_twice_exact_counts_second_run_sends_nothing(
    fhir_server: TestFhirServer, example_bundle: Path, state: Path
) -> None:
    from ruxo_fhir.sync.pull import PART_TYPES

    want = type_counts(bundle_resources(example_bundle))
    assert want["Patient"] == 12

    first = cli("push", example_bundle, "--server", fhir_server.base_url, state=state)
    assert first.exit_code == 0, first
    s1 = first.summary()
    assert s1[counted_as(fhir_server)] == s1["total"] == sum(want.values()), first
    assert s1["created"] + s1["updated"] == s1["total"] and s1["unchanged"] == s1["rejected"] == 0, first
    mode, bundles, reqs = first.run_line()
    assert (mode, bundles) == ("transaction", 1), first
    # one GET /metadata, one transaction POST, the reads of what is there already (one `_id`
    # search per type: another team's or a clinician's data is never overwritten blindly, issue
    # 12) and one `_summary=count` search per cohort type telling that nothing on the server is
    # stale (the whole cohort is read back only when a count differs). A server that declares
    # the `batch` interaction (Medplum) takes each set of searches as ONE batch of GET entries
    # (FHIR http.html#transaction); one that declares only `transaction` (HAPI JPA) as one
    # transaction of GET entries: 2 + 1 + 1 on both; 2 + 5 + 4 on a server declaring neither.
    bundled = bool(declared_system_interactions(fhir_server) & {"batch", "transaction"})
    assert reqs == 2 + (1 if bundled else len(want)) + (1 if bundled else len(PART_TYPES)), first
    assert "\r" not in first.stderr, "a progress bar was drawn although stderr is not a terminal"
    assert server_count(fhir_server) == want
    after_first = fhir_server.stats()
    assert after_first["writes"] == 1
    assert after_first["entries_written"] == after_first["write_entries_received"] == sum(want.values())

    second = cli("push", example_bundle, "--server", fhir_server.base_url, state=state)
    assert second.exit_code == 0, second
    s2 = second.summary()
    assert s2["unchanged"] == s2["total"] == sum(want.values()), second
    assert s2["created"] == s2["updated"] == s2["rejected"] == 0, second
    assert second.run_line()[1] == 0, second  # no bundle sent
    after_second = fhir_server.stats()
    assert after_second["writes"] == after_first["writes"], "the second push wrote to the server"
    assert after_second["write_entries_received"] == after_first["write_entries_received"]
    assert after_second["entries_written"] == after_first["entries_written"]
    # ... POSTs only of batches/transactions of GET entries (reads, which the fronts count as reads)
    assert after_second["by_method"].get("POST", 0) - after_first["by_method"].get("POST", 0) \
        == (2 if bundled else 0)
    assert server_count(fhir_server) == want
    assert server_count(fhir_server)["Patient"] == 12

    # the CSV itself maps to the same stable ids: pushing it is a no-op too
    third = cli("push", EXAMPLE_CSV, "--server", fhir_server.base_url, state=state)
    assert third.exit_code == 0, third
    assert third.summary()["unchanged"] == sum(want.values()), third
    assert fhir_server.stats()["writes"] == after_first["writes"]
    assert server_count(fhir_server) == want


def test_push_twice_without_ledger_creates_no_duplicates(
    fhir_server: TestFhirServer, example_bundle: Path, state: Path
) -> None:
    want = type_counts(bundle_resources(example_bundle))
    for _ in range(2):
        run = cli("push", example_bundle, "--server", fhir_server.base_url, "--no-ledger", state=state)
        assert run.exit_code == 0, run
        assert server_count(fhir_server) == want
    assert server_keys(fhir_server, want) == keys(bundle_resources(example_bundle))


def test_push_foreign_bundle_with_urn_uuid_references_twice(
    fhir_server: TestFhirServer, state: Path, tmp_path: Path
) -> None:
    """A transaction Bundle from another tool: no ids, `urn:uuid` fullUrls and references."""
    patient_url = "urn:uuid:5f0c1d2e-0000-4000-8000-000000000001"
    obs_url = "urn:uuid:5f0c1d2e-0000-4000-8000-000000000002"
    doc = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": patient_url, "resource": {"resourceType": "Patient", "gender": "female"},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": obs_url, "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                                          "subject": {"reference": patient_url}},
         "request": {"method": "POST", "url": "Observation"}},
    ]}
    path = tmp_path / "foreign.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    for _ in range(2):
        run = cli("push", path, "--server", fhir_server.base_url, state=state)
        assert run.exit_code == 0, run
        assert server_count(fhir_server) == {"Patient": 1, "Observation": 1}
    patient = requests.get(f"{fhir_server.base_url}/Patient", timeout=30).json()["entry"][0]["resource"]
    obs = requests.get(f"{fhir_server.base_url}/Observation", timeout=30).json()["entry"][0]["resource"]
    assert obs["subject"]["reference"] == f"Patient/{patient['id']}"


# --------------------------------------------------------------------------------------------
# 2. the ledger is never trusted blindly
# --------------------------------------------------------------------------------------------


def test_server_reset_after_push_gets_everything_again(
    fhir_server: TestFhirServer, example_bundle: Path, state: Path
) -> None:
    resources = bundle_resources(example_bundle)
    want = type_counts(resources)
    first = cli("push", example_bundle, "--server", fhir_server.base_url, state=state)
    assert first.exit_code == 0, first
    assert server_count(fhir_server) == want

    fhir_server.reset()  # same URL, now empty (sandboxes do this)
    assert server_count(fhir_server) == {}

    again = cli("push", example_bundle, "--server", fhir_server.base_url, state=state)
    assert again.exit_code == 0, again
    s = again.summary()
    assert s[counted_as(fhir_server)] == s["total"] == len(resources), again
    assert s["unchanged"] == 0, again
    assert server_count(fhir_server) == want
    assert server_keys(fhir_server, want) == keys(resources)


def references(node: Any) -> set[str]:
    """Every `reference` string inside a resource (or a list of them)."""
    if isinstance(node, dict):
        return set().union(*(({v} if k == "reference" and isinstance(v, str) else references(v))
                             for k, v in node.items()))
    if isinstance(node, list):
        return set().union(*(references(v) for v in node))
    return set()


def test_resources_deleted_or_edited_behind_our_back_are_pushed_again(
    fhir_server: TestFhirServer, example_bundle: Path, state: Path
) -> None:
    resources = bundle_resources(example_bundle)
    want = type_counts(resources)
    assert cli("push", example_bundle, "--server", fhir_server.base_url, state=state).exit_code == 0

    # someone deletes one of our resources that nothing references (a server enforcing
    # referential integrity, as HAPI JPA does, refuses to delete a referenced one: 409)
    referenced = references(resources)
    observation = next(r for r in resources if r["resourceType"] == "Observation"
                       and f"Observation/{r['id']}" not in referenced)
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    r = requests.delete(f"{fhir_server.base_url}/Observation/{observation['id']}", timeout=30)
    assert r.status_code in (200, 204), r.text
    assert server_count(fhir_server)["Observation"] == want["Observation"] - 1
    edited = {**patient, "gender": "unknown" if patient["gender"] != "unknown" else "other"}
    r = requests.put(f"{fhir_server.base_url}/Patient/{patient['id']}", data=json.dumps(edited),
                     headers={"Content-Type": FHIR_JSON}, timeout=30)
    assert r.status_code == 200, r.text

    # the deleted Observation is written again; the Patient edited on the server is a conflict:
    # not overwritten, one line, exit 1 (issue 12: no lost updates)
    run = cli("push", example_bundle, "--server", fhir_server.base_url, state=state)
    assert run.exit_code == 1, run
    s = run.summary()
    assert s["created"] == 1 and s["updated"] == 0 and s["conflict"] == 1, run
    assert s["unchanged"] == len(resources) - 2, run
    assert server_count(fhir_server) == want
    restored = requests.get(f"{fhir_server.base_url}/Observation/{observation['id']}", timeout=30)
    assert restored.status_code == 200, restored.text
    assert without_meta(restored.json()) == without_meta(observation)
    lines = [ln for ln in run.lines if ln.startswith("conflict:")]
    assert len(lines) == 1 and "Patient/" + patient["id"] in lines[0] and "gender" in lines[0], run
    on_server = requests.get(f"{fhir_server.base_url}/Patient/{patient['id']}", timeout=30).json()
    assert on_server["gender"] == edited["gender"]

    # asked to overwrite: the local copy wins, with If-Match on the version just read
    run = cli("push", example_bundle, "--server", fhir_server.base_url, "--on-conflict", "overwrite", state=state)
    assert run.exit_code == 0, run
    s = run.summary()
    assert s["updated"] == 1 and s["conflict"] == 0 and s["unchanged"] == len(resources) - 1, run
    on_server = requests.get(f"{fhir_server.base_url}/Patient/{patient['id']}", timeout=30).json()
    assert on_server["gender"] == patient["gender"]


def test_push_killed_midway_then_rerun_ends_exact(
    fhir_server: TestFhirServer, generated: dict[int, tuple[Path, Path]], state: Path
) -> None:
    """A push killed (SIGKILL, no cleanup) in the middle; the rerun completes it exactly."""
    src, bundle = generated[100]
    resources = bundle_resources(bundle)
    fhir_server.configure(latency_ms=100)
    env = {k: v for k, v in os.environ.items() if k not in ("RUXO_FHIR_TOKEN", "RUXO_FHIR_DEBUG")}
    env["RUXO_FHIR_STATE_DIR"] = str(state)
    proc = subprocess.Popen([sys.executable, "-m", "ruxo_fhir", "push", str(src), "--server", fhir_server.base_url,
                             "--batch-size", "20"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while fhir_server.stats()["entries_written"] < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.kill()
    finally:
        proc.wait(timeout=30)
    landed = sum(server_count(fhir_server).values())
    assert 0 < landed < len(resources), f"not killed in the middle ({landed} of {len(resources)})"

    fhir_server.configure(latency_ms=0)
    received = fhir_server.stats()["write_entries_received"]
    run = cli("push", src, "--server", fhir_server.base_url, "--batch-size", "20", state=state)
    assert run.exit_code == 0, run
    s = run.summary()
    assert s["total"] == len(resources) and s["rejected"] == 0, run
    # only what had not landed is sent again, plus at most the chunk in flight at the kill (it
    # may have landed after its reply was lost with the process: a chunk has at most 20 entries)
    resent = fhir_server.stats()["write_entries_received"] - received
    missing = len(resources) - landed
    print(f"\nkill -9 + rerun: {landed} of {len(resources)} had landed; the rerun sent {resent} write "
          f"entries ({missing} missing + {resent - missing} from the chunk in flight)")
    assert missing <= resent <= missing + 20, (landed, resent)
    assert s["unchanged"] >= landed - 20, run  # what the killed run confirmed is not written again
    _assert_exact(fhir_server, resources)


# --------------------------------------------------------------------------------------------
# 3. thousands of cases with every fault switch on
# --------------------------------------------------------------------------------------------


def _library_push_until_done(server: TestFhirServer, resources: list[dict[str, Any]], ledger_path: Path,
                             *, mode: str | None, batch_size: int, runs: int = 3) -> tuple[Any, int]:
    """Push with the library (short sleeps); a run that runs out of retries is rerun, as a user
    would. Returns (the last PushResult, number of runs)."""
    from ruxo_fhir.errors import TemporaryServerError
    from ruxo_fhir.mapping.spec import load_mapping
    from ruxo_fhir.sync.ledger import Ledger
    from ruxo_fhir.sync.push import PushOptions, push
    from ruxo_fhir.transport.rest import FhirClient, RetryPolicy

    mapping = load_mapping()
    for attempt in range(1, runs + 1):
        retry = RetryPolicy(backoff_base=0.01, backoff_cap=0.05, max_total_seconds=5, jitter=0)
        options = PushOptions(batch_size=batch_size, mode=mode or "transaction", mode_explicit=mode is not None,
                              sleep=lambda s: time.sleep(min(s, 0.05)))
        with FhirClient(server.base_url, retry=retry) as client, Ledger(ledger_path) as ledger:
            try:
                return push(client, resources, mapping, options, ledger=ledger), attempt
            except TemporaryServerError:
                if attempt == runs:
                    raise
    raise AssertionError("unreachable")


def _assert_exact(server: TestFhirServer, resources: list[dict[str, Any]]) -> None:
    want = type_counts(resources)
    assert server_count(server) == want
    assert server_keys(server, want) == keys(resources)
    assert server.stats()["entries_written"] >= len(resources)


def server_resources(server: TestFhirServer, types: Iterable[str]) -> list[dict[str, Any]]:
    """Every resource on the server, whole (read with plain requests, every page followed)."""
    found: list[dict[str, Any]] = []
    for kind in types:
        url: str | None = f"{server.base_url}/{kind}?_count=1000"
        while url:
            r = requests.get(url, headers={"Accept": FHIR_JSON}, timeout=120)
            assert r.status_code == 200, r.text[:500]
            page = r.json()
            found += [e["resource"] for e in page.get("entry", [])]
            url = next((ln["url"] for ln in page.get("link", []) if ln["relation"] == "next"), None)
    return found


def _assert_exact_content(server: TestFhirServer, resources: list[dict[str, Any]]) -> None:
    """The server holds exactly `resources`: same Type/id set, each once, each with our content."""
    want = type_counts(resources)
    assert server_count(server) == want  # the engine's own tables: no duplicates, nothing extra
    on_server = server_resources(server, want)
    assert len(on_server) == len(resources), "a resource is listed twice (or missing) in the searches"
    assert keys(on_server) == keys(resources)
    ours = {f"{r['resourceType']}/{r['id']}": without_meta(r) for r in resources}
    differ = [k for k, text in ((f"{r['resourceType']}/{r['id']}", without_meta(r)) for r in on_server)
              if ours[k] != text]
    assert not differ, f"{len(differ)} resource(s) differ from what was pushed, e.g. {differ[:5]}"


@pytest.mark.parametrize(("n", "mode", "batch_only", "rerun"), [
    pytest.param(1500, None, False, False, id="transaction-1500"),
    pytest.param(1000, "batch", False, False, id="batch-1000"),
    # the ledger rerun is slow on Medplum (its `_id` searches scan the whole type): once is enough
    pytest.param(1000, None, True, True, id="batch-only-server-1000"),
])
def test_push_thousands_with_every_fault_exact_counts(
    fhir_server: TestFhirServer, generated: dict[int, tuple[Path, Path]], tmp_path: Path,
    n: int, mode: str | None, batch_only: bool, rerun: bool,
) -> None:
    """Every fault on (and, once, a rerun with the ledger). Exact on any engine: every entry is
    accounted for (rejected 0, no conflict), the server ends with exactly our resources (ids and
    content, each once), and the rerun writes nothing. Not exact: how the first run splits
    created/updated/unchanged. After a `drop_after` the server applied a request whose reply was
    lost; engines answer the retried PUTs differently (HAPI: a no-op update, 200 with the same
    version -- FHIR lets a server skip an update that changes nothing -- which push rightly counts
    unchanged). So only entries of requests dropped after being applied may be anything but
    `created`."""
    from ruxo_fhir.bundle import iter_push_resources

    batch_size = 100
    resources = list(iter_push_resources(generated[n][1]))
    assert len(resources) > 6 * n  # a few thousand cases -> ~10k resources
    fhir_server.configure(faults=ALL_FAULTS, retry_after=0, batch_only=batch_only)
    started = time.monotonic()
    result, runs = _library_push_until_done(fhir_server, resources, tmp_path / "ledger.sqlite3",
                                            mode=mode, batch_size=batch_size)
    elapsed = time.monotonic() - started
    stats = fhir_server.stats()
    assert all(stats["faults_injected"][k] > 0 for k in ALL_FAULTS), stats  # every fault really fired
    assert result.rejected == 0 and result.conflict == 0, result.snapshot()
    assert result.errors == [] and result.conflicts == [] and result.rejects == []
    assert result.created + result.updated + result.unchanged == result.total == len(resources)
    if runs == 1:  # (a rerun after running out of retries counts what had landed as unchanged)
        lost_replies = stats["faults_injected"]["drop_after"]
        assert result.total - result.created <= lost_replies * batch_size, (result.snapshot(), stats)
    assert result.mode == ("batch" if mode == "batch" or batch_only else "transaction")
    switch_notices = [t for t in result.notices if "batch" in t.lower()]
    assert len(switch_notices) == (1 if batch_only else 0), result.notices
    _assert_exact_content(fhir_server, resources)
    print(f"\n{n} cases, {len(resources)} resources, mode {result.mode}: {elapsed:.1f} s "
          f"({len(resources) / elapsed:.0f} resources/s with faults), {runs} run(s); created "
          f"{result.created}, updated {result.updated}, unchanged {result.unchanged}; "
          f"{stats['faults_injected']['drop_after']} reply(ies) lost after the write")

    if not rerun:
        return
    # a rerun with the ledger, faults still on: every entry unchanged and not one write sent
    before = fhir_server.stats()
    started = time.monotonic()
    again, _ = _library_push_until_done(fhir_server, resources, tmp_path / "ledger.sqlite3",
                                        mode=mode, batch_size=batch_size)
    after = fhir_server.stats()
    assert again.unchanged == again.total == len(resources), again.snapshot()
    assert again.created == again.updated == again.conflict == again.rejected == 0
    assert again.bundles_sent == 0
    for key in ("writes", "write_entries_received", "entries_written"):
        assert after[key] == before[key], (key, before[key], after[key])
    assert server_count(fhir_server) == type_counts(resources)
    print(f"rerun: {time.monotonic() - started:.1f} s, 0 writes")


def test_cli_push_batch_only_server_with_faults_switches_by_itself(
    fhir_server: TestFhirServer, generated: dict[int, tuple[Path, Path]], state: Path
) -> None:
    """The CLI (real backoff) on a batch-only server with every fault on: no --mode given."""
    src, bundle = generated[120]
    resources = bundle_resources(bundle)
    fhir_server.configure(faults=ALL_FAULTS, retry_after=0, batch_only=True)
    runs = []
    for _ in range(3):  # a run that ran out of retries is simply run again
        run = cli("push", src, "--server", fhir_server.base_url, "--batch-size", "100", state=state)
        runs.append(run)
        if run.exit_code == 0:
            break
        assert run.exit_code == 4, run
        assert "Traceback" not in run.stderr, run
    assert runs[-1].exit_code == 0, runs[-1]
    switch = [ln for ln in runs[0].lines if "batch" in ln.lower() and "switch" in ln.lower()]
    assert len(switch) == 1, runs[0]
    assert runs[-1].run_line()[0] == "batch", runs[-1]
    _assert_exact(fhir_server, resources)


class _MetadataClaimsTransaction(requests.Session):
    """A server that declares `transaction` in its CapabilityStatement but refuses it (the test
    server's batch_only switch also drops it from /metadata; this puts it back on the wire)."""

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        resp = super().request(method, url, *args, **kwargs)
        if str(url).endswith("/metadata") and resp.status_code == 200:
            cs = resp.json()
            cs["rest"][0].setdefault("interaction", []).append({"code": "transaction"})
            resp._content = json.dumps(cs).encode()
        return resp


def test_batch_only_server_found_out_by_the_refusal(
    fhir_server: TestFhirServer, example_bundle: Path, tmp_path: Path
) -> None:
    from ruxo_fhir.bundle import iter_push_resources
    from ruxo_fhir.mapping.spec import load_mapping
    from ruxo_fhir.sync.ledger import Ledger
    from ruxo_fhir.sync.push import PushOptions, push
    from ruxo_fhir.transport.rest import FhirClient

    resources = list(iter_push_resources(example_bundle))
    fhir_server.configure(batch_only=True)
    with FhirClient(fhir_server.base_url, session=_MetadataClaimsTransaction()) as client, \
            Ledger(tmp_path / "ledger.sqlite3") as ledger:
        assert "transaction" in {i["code"] for i in client.capabilities()["rest"][0]["interaction"]}
        result = push(client, resources, load_mapping(), PushOptions(batch_size=20), ledger=ledger)
    assert result.mode == "batch"
    assert len([n for n in result.notices if "batch" in n]) == 1, result.notices
    assert getattr(result, counted_as(fhir_server)) == result.total == len(resources) and result.rejected == 0
    _assert_exact(fhir_server, resources)


# --------------------------------------------------------------------------------------------
# 4. a bundle-size cap leads to smaller chunks, not failure
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [None, "batch"])
def test_bundle_size_cap_smaller_chunks(
    fhir_server: TestFhirServer, generated: dict[int, tuple[Path, Path]], state: Path, mode: str | None
) -> None:
    src, bundle = generated[100]
    resources = bundle_resources(bundle)
    fhir_server.configure(max_bundle_entries=30)
    args = ["push", src, "--server", fhir_server.base_url, "--batch-size", "200"]
    if mode:
        args += ["--mode", mode]
    run = cli(*args, state=state)
    assert run.exit_code == 0, run
    s = run.summary()
    assert s[counted_as(fhir_server)] == s["total"] == len(resources), run
    assert s["rejected"] == 0
    assert any("chunks of" in ln for ln in run.lines), run  # it says it went smaller
    assert "Traceback" not in run.stderr
    _assert_exact(fhir_server, resources)
    assert fhir_server.stats()["by_status"].get("413", 0) >= 1  # the cap really refused something


# --------------------------------------------------------------------------------------------
# 5. a rejected entry
# --------------------------------------------------------------------------------------------

BAD_CASE, BAD_PATIENT = "C05", "P05"


@pytest.fixture
def bad_bundle(example_bundle: Path, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """The example bundle with C05's improvement Observation made invalid (no status).

    The test server (Medplum's validateResource) does not check required value-set bindings,
    so an unknown status CODE would be accepted; a missing required element is refused.
    """
    data = json.loads(example_bundle.read_text(encoding="utf-8"))
    bad = None
    for entry in data["entry"]:
        res = entry["resource"]
        if identifier_values(res, RESOURCE_SYSTEM) == [f"{BAD_CASE}:improvement"]:
            del res["status"]
            bad = res
    assert bad is not None
    out = tmp_path / "bad.json"
    out.write_text(json.dumps(data), encoding="utf-8")
    return out, bad


def test_rejected_entry_batch_mode_others_land(
    fhir_server: TestFhirServer, bad_bundle: tuple[Path, dict[str, Any]], state: Path
) -> None:
    path, bad = bad_bundle
    resources = bundle_resources(path)
    run = cli("push", path, "--server", fhir_server.base_url, "--mode", "batch", state=state)
    assert run.exit_code == 1, run
    assert "Traceback" not in run.stderr
    rejected = [ln for ln in run.lines if ln.startswith("rejected:")]
    assert len(rejected) == 1, run
    line = rejected[0]
    assert f"case {BAD_CASE}" in line, line
    assert f"Observation/{bad['id']}" in line, line
    assert "error" in line and "Observation.status" in line, line  # severity, where
    assert "required" in line.lower(), line  # the diagnostics
    s = run.summary()
    assert s["rejected"] == 1 and s["total"] == len(resources), run
    assert s[counted_as(fhir_server)] == len(resources) - 1, run
    want = type_counts(r for r in resources if r["id"] != bad["id"])
    assert server_count(fhir_server) == want
    assert f"Observation/{bad['id']}" not in server_keys(fhir_server, ["Observation"])


def test_rejected_entry_transaction_mode_bisects_other_cases_land(
    fhir_server: TestFhirServer, bad_bundle: tuple[Path, dict[str, Any]], state: Path
) -> None:
    path, bad = bad_bundle
    resources = bundle_resources(path)
    group = case_group(resources, BAD_CASE, BAD_PATIENT)
    assert bad["id"] in {r["id"] for r in group} and len(group) > 2
    run = cli("push", path, "--server", fhir_server.base_url, state=state)
    assert run.exit_code == 1, run
    assert "Traceback" not in run.stderr
    rejected = [ln for ln in run.lines if ln.startswith("rejected:")]
    assert rejected, run
    assert all(f"case {BAD_CASE}" in ln for ln in rejected), run
    assert any("Observation.status" in ln or "status" in ln for ln in rejected), run
    s = run.summary()
    assert s["rejected"] == len(group), run
    assert s[counted_as(fhir_server)] == len(resources) - len(group), run
    others = [r for r in resources if keys([r]) - keys(group)]
    assert server_keys(fhir_server, type_counts(resources)) == keys(others)
    assert server_count(fhir_server) == type_counts(others)


# --------------------------------------------------------------------------------------------
# 6. FHIR version check before writing
# --------------------------------------------------------------------------------------------


# Medplum only: the fhir_version switch changes what the engine's CapabilityStatement says; the
# HAPI front never rewrites HAPI's statement (an R5 HAPI would be another build).
@medplum_only
def test_r5_server_refused_before_writing(fhir_server: TestFhirServer, example_bundle: Path, state: Path) -> None:
    fhir_server.configure(fhir_version="5.0.0")
    run = cli("push", example_bundle, "--server", fhir_server.base_url, state=state)
    assert run.exit_code == 5, run
    assert len(run.lines) == 1, run
    assert "5.0.0" in run.lines[0] and "R4" in run.lines[0], run
    assert "Traceback" not in run.stderr
    assert fhir_server.stats()["writes"] == 0
    assert server_count(fhir_server) == {}


@medplum_only  # fhir_version switch: see above
def test_r4b_server_accepted_with_warning(fhir_server: TestFhirServer, example_bundle: Path, state: Path) -> None:
    fhir_server.configure(fhir_version="4.3.0")
    run = cli("push", example_bundle, "--server", fhir_server.base_url, state=state)
    assert run.exit_code == 0, run
    warnings = [ln for ln in run.lines if ln.lower().startswith("warning") and "4.3.0" in ln]
    assert len(warnings) == 1, run
    assert server_count(fhir_server) == type_counts(bundle_resources(example_bundle))


# --------------------------------------------------------------------------------------------
# 7. pull: small pages, only the cohort, round trip, --patient, --bulk
# --------------------------------------------------------------------------------------------


def _post_foreign(server: TestFhirServer, our_patient_id: str) -> set[str]:
    """Other people's resources on the shared server, plus foreign ones about OUR patient."""
    posted = []
    other = post(server, {"resourceType": "Patient", "identifier": [{"system": "urn:other:mrn", "value": "X1"}],
                          "gender": "male"})
    posted.append(other)
    for i in range(7):
        posted.append(post(server, {"resourceType": "Observation", "status": "final", "code": {"text": f"hb {i}"},
                                    "subject": {"reference": f"Patient/{other['id']}"}}))
    # about one of our patients, but not ours (no identifiers of our systems)
    posted.append(post(server, {"resourceType": "Observation", "status": "final", "code": {"text": "weight"},
                                "subject": {"reference": f"Patient/{our_patient_id}"}}))
    posted.append(post(server, {"resourceType": "MedicationStatement", "status": "active",
                                "medicationCodeableConcept": {"text": "aspirin"},
                                "subject": {"reference": f"Patient/{our_patient_id}"}}))
    posted.append(post(server, {"resourceType": "Condition", "code": {"text": "asthma"},
                                "identifier": [{"system": "urn:other:problem", "value": "C01:condition"}],
                                "subject": {"reference": f"Patient/{other['id']}"}}))
    return keys(posted)


def test_push_beside_other_peoples_data_says_nothing_is_stale_and_still_sees_a_removed_case(
    fhir_server: TestFhirServer, example_bundle: Path, state: Path, tmp_path: Path
) -> None:
    """After a push that landed everything, counts per type tell whether the server holds
    cohort resources the source no longer produces. Other people's resources make a count of a
    whole type larger than ours: that alone must never be taken for a removed case (no notice),
    and a case really removed from the source is still told."""
    resources = bundle_resources(example_bundle)
    assert cli("push", example_bundle, "--server", fhir_server.base_url, state=state).exit_code == 0
    our_patient = next(r for r in resources if r["resourceType"] == "Patient")
    _post_foreign(fhir_server, our_patient["id"])

    again = cli("push", example_bundle, "--server", fhir_server.base_url, state=state)
    assert again.exit_code == 0, again
    assert again.summary()["unchanged"] == len(resources), again
    assert not any("no longer produced" in ln for ln in again.lines), again

    kept = [r for r in resources if not any(v.startswith("C01") for system in (CASE_SYSTEM, RESOURCE_SYSTEM)
                                            for v in identifier_values(r, system))]
    removed = len([r for r in resources if r["resourceType"] != "Patient"]) \
        - len([r for r in kept if r["resourceType"] != "Patient"])
    assert removed > 0
    smaller = tmp_path / "without-C01.json"
    smaller.write_text(json.dumps({"resourceType": "Bundle", "type": "collection",
                                   "entry": [{"resource": r} for r in kept]}), encoding="utf-8")
    told = cli("push", smaller, "--server", fhir_server.base_url, state=state)
    assert any(f"{removed} cohort resource(s) on the server are no longer produced" in ln for ln in told.lines), told


def test_pull_small_pages_only_cohort_round_trip_patient_and_bulk(
    fhir_server: TestFhirServer, example_bundle: Path, state: Path, tmp_path: Path
) -> None:
    resources = bundle_resources(example_bundle)
    push = cli("push", EXAMPLE_CSV, "--server", fhir_server.base_url, state=state)
    assert push.exit_code == 0, push
    our_patient = next(r for r in resources if r["resourceType"] == "Patient")
    foreign = _post_foreign(fhir_server, our_patient["id"])
    fhir_server.configure(page_size=5)

    # paged pull, ndjson
    out = tmp_path / "pulled"
    reads_before = fhir_server.stats()["reads"]
    run = cli("pull", "--server", fhir_server.base_url, "-o", out, "--format", "ndjson", "--page-size", "5",
              state=state)
    assert run.exit_code == 0, run
    pulled = ndjson_dir(out)
    assert keys(pulled) == keys(resources)
    assert len(pulled) == len(resources)  # nothing twice
    assert not keys(pulled) & foreign
    by_key = {f"{r['resourceType']}/{r['id']}": r for r in resources}
    for res in pulled:
        assert without_meta(res) == without_meta(by_key[f"{res['resourceType']}/{res['id']}"])
    # 32 MedicationStatements in pages of 5 alone need 7 pages: every next link was followed
    assert fhir_server.stats()["reads"] - reads_before >= 7 + 4 + 3

    # pull -> export gives the example rows back
    csv_out = tmp_path / "pulled.csv"
    exp = cli("export", out, "-o", csv_out, state=state)
    assert exp.exit_code == 0, exp
    assert read_rows(csv_out) == read_rows(EXAMPLE_CSV)

    # --patient P03: only that patient's case (bundle format: a collection Bundle)
    one = tmp_path / "p03.json"
    run = cli("pull", "--server", fhir_server.base_url, "-o", one, "--patient", "P03", state=state)
    assert run.exit_code == 0, run
    doc = json.loads(one.read_text(encoding="utf-8"))
    assert doc["resourceType"] == "Bundle" and doc["type"] == "collection"
    got = [e["resource"] for e in doc["entry"]]
    assert keys(got) == keys(case_group(resources, "C03", "P03"))
    assert len(got) == len(keys(got))

    # --bulk: the same resources as the paged pull
    bulk = tmp_path / "bulk"
    run = cli("pull", "--server", fhir_server.base_url, "-o", bulk, "--format", "ndjson", "--bulk", state=state)
    assert run.exit_code == 0, run
    assert fhir_server.stats()["exports_started"] == 1
    bulk_pulled = ndjson_dir(bulk)
    assert sorted(map(without_meta, bulk_pulled)) == sorted(map(without_meta, pulled))
    assert sorted(p.name for p in bulk.glob("*.ndjson")) == sorted(p.name for p in out.glob("*.ndjson"))


# --------------------------------------------------------------------------------------------
# 8. incremental pull with a saved cursor
# --------------------------------------------------------------------------------------------


def test_incremental_pull_returns_only_changed_resources(
    fhir_server: TestFhirServer, state: Path, tmp_path: Path
) -> None:
    assert cli("push", EXAMPLE_CSV, "--server", fhir_server.base_url, state=state).exit_code == 0
    # The cursor is the server's HTTP Date (whole seconds) minus 1 s of overlap: let the pushed
    # resources get older than that before the first pull.
    time.sleep(2.2)
    cursor = tmp_path / "nightly.cursor"
    first = tmp_path / "first"
    run = cli("pull", "--server", fhir_server.base_url, "-o", first, "--format", "ndjson", "--cursor", cursor,
              state=state)
    assert run.exit_code == 0, run
    assert len(ndjson_dir(first)) == 74
    assert json.loads(cursor.read_text(encoding="utf-8"))["since"]

    time.sleep(1.2)
    with EXAMPLE_CSV.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        if row["case_id"] == "C07":
            assert row["improvement_pct"] == "52"
            row["improvement_pct"] = "70"
    changed = tmp_path / "changed.csv"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    changed.write_text(buf.getvalue(), encoding="utf-8")
    push = cli("push", changed, "--server", fhir_server.base_url, state=state)
    assert push.exit_code == 0, push
    s = push.summary()
    assert s["updated"] == 1 and s["unchanged"] == s["total"] - 1, push
    time.sleep(2.2)  # so that the cursor saved by the next pull is later than this change

    second = tmp_path / "second"
    run = cli("pull", "--server", fhir_server.base_url, "-o", second, "--format", "ndjson", "--cursor", cursor,
              state=state)
    assert run.exit_code == 0, run
    got = ndjson_dir(second)
    assert len(got) == 1, got
    (obs,) = got
    assert obs["resourceType"] == "Observation"
    assert identifier_values(obs, RESOURCE_SYSTEM) == ["C07:improvement"]
    assert obs["valueQuantity"]["value"] == 70

    # nothing changed since: the next nightly pull is empty
    third = tmp_path / "third"
    run = cli("pull", "--server", fhir_server.base_url, "-o", third, "--format", "ndjson", "--cursor", cursor,
              state=state)
    assert run.exit_code == 0, run
    assert ndjson_dir(third) == []


# --------------------------------------------------------------------------------------------
# requests per push and throughput, versus a raw transaction POST of the same bundles
# --------------------------------------------------------------------------------------------


def test_push_requests_and_throughput_vs_raw_transaction_post(
    fhir_server: TestFhirServer, generated: dict[int, tuple[Path, Path]], tmp_path: Path
) -> None:
    from ruxo_fhir.bundle import iter_push_resources
    from ruxo_fhir.mapping.spec import load_mapping
    from ruxo_fhir.sync.ledger import Ledger
    from ruxo_fhir.sync.push import PushOptions, push
    from ruxo_fhir.transport.rest import FhirClient

    _, bundle = generated[1000]
    resources = list(iter_push_resources(bundle))
    started = time.monotonic()
    with FhirClient(fhir_server.base_url) as client, Ledger(tmp_path / "ledger.sqlite3") as ledger:
        result = push(client, resources, load_mapping(), PushOptions(batch_size=200), ledger=ledger)
        requests_sent = client.request_count
    ours = time.monotonic() - started
    assert getattr(result, counted_as(fhir_server)) == result.total == len(resources)
    # a first push to an empty server: one GET /metadata, one POST per bundle, and the reads that
    # learn what is there already (at most one `_id` search per type and 50 resources, fewer
    # requests where the server takes them as one batch)
    reads = requests_sent - result.bundles_sent - 1
    # ... and the cohort read at the end that counts removed cases (issue 12): pages of 500 asked
    # for, capped by the server (HAPI JPA: 50)
    assert 0 < reads <= sum(-(-n // 50) for n in type_counts(resources).values()) \
        + 5 * (len(resources) // 1000 + 1) + len(resources) // 25 + 10
    # chunks keep whole cases (at most a dozen entries each) together: nearly full bundles
    assert -(-len(resources) // 200) <= result.bundles_sent <= -(-len(resources) // 188)
    _assert_exact(fhir_server, resources)

    fhir_server.reset()
    entries = json.loads(bundle.read_text(encoding="utf-8"))["entry"]
    started = time.monotonic()
    with requests.Session() as session:
        for i in range(0, len(entries), 200):
            r = session.post(fhir_server.base_url, timeout=120, headers={"Content-Type": FHIR_JSON},
                             data=json.dumps({"resourceType": "Bundle", "type": "transaction",
                                              "entry": entries[i:i + 200]}))
            assert r.status_code == 200, r.text[:500]
    raw = time.monotonic() - started
    _assert_exact(fhir_server, resources)
    print(f"\npush of {len(resources)} resources: ruxo-fhir {ours:.1f} s ({len(resources) / ours:.0f}/s, "
          f"{result.bundles_sent} bundles, {requests_sent} requests); raw transaction POSTs "
          f"{raw:.1f} s ({len(resources) / raw:.0f}/s, {-(-len(entries) // 200)} requests)")
