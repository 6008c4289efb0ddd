"""End-to-end `check`, `push --dry-run`, server profiles and `push --report` against the real
test FHIR server. The CLI runs in a subprocess; the server's admin API proves what was written.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import socket
import time
import uuid
from pathlib import Path

import pytest
import requests
from e2e_cli import Run as BaseRun
from e2e_cli import run_cli
from engines import both_engines_fixture, medplum_only
from fhirserver import TestFhirServer

pytestmark = pytest.mark.e2e  # every test here starts the test FHIR server

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CSV = REPO / "examples" / "cases.csv"
EXAMPLE_TOTAL = {"AdverseEvent": 1, "Condition": 12, "MedicationStatement": 32, "Observation": 17, "Patient": 12}
PLAN_ROW = re.compile(r"^\s+(\w+)\s+create\s+(\d+)\s+update\s+(\d+)\s+unchanged\s+(\d+)(?:\s+conflict\s+0)?\s*$")


class Run(BaseRun):

    def plan(self) -> dict[str, dict[str, int]]:
        """{type: {"create": n, "update": n, "unchanged": n}} from the dry-run table on stdout."""
        out = {}
        for line in self.stdout.splitlines():
            m = PLAN_ROW.match(line)
            if m:
                out[m.group(1)] = {"create": int(m.group(2)), "update": int(m.group(3)),
                                   "unchanged": int(m.group(4))}
        assert out, f"no plan table\n{self}"
        return out


def cli(*args: str | Path, state: Path, env: dict[str, str] | None = None, timeout: float = 300) -> Run:
    return run_cli(Run, *args, state=state, env=env, timeout=timeout)


def server_count(server: TestFhirServer) -> dict[str, int]:
    r = requests.get(f"{server.root_url}/$admin/count", timeout=30)
    r.raise_for_status()
    out: dict[str, int] = r.json()
    return out


def changed_example(path: Path, case_id: str = "C07", column: str = "improvement_pct", value: str = "70") -> Path:
    with EXAMPLE_CSV.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    hit = [r for r in rows if r["case_id"] == case_id]
    assert len(hit) == 1 and hit[0][column] != value
    hit[0][column] = value
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


pytestmark = pytest.mark.e2e

# Every test here runs on both real engines (Medplum's router and HAPI FHIR JPA) unless marked.
fhir_server = both_engines_fixture()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------


def test_check_default_server_usable(fhir_server: TestFhirServer, state: Path) -> None:
    run = cli("check", "--server", fhir_server.base_url, state=state)
    assert run.exit_code == 0, run
    assert not any("[FAIL]" in ln for ln in run.out_lines), run
    for item in ("reachable", "FHIR version", "transaction", "batch", "Patient", "Observation"):
        assert any(f"ok] {item}" in ln for ln in run.out_lines), f"{item} not ok\n{run}"
    assert fhir_server.stats()["writes"] == 0


# Medplum only: capabilities_omit rewrites the engine's CapabilityStatement; the HAPI front never does.
@medplum_only
def test_check_missing_transaction_and_batch_exit_5(fhir_server: TestFhirServer, state: Path) -> None:
    fhir_server.configure(capabilities_omit=["transaction", "batch"])
    run = cli("check", "--server", fhir_server.base_url, state=state)
    assert run.exit_code == 5, run
    failed = [ln for ln in run.out_lines if "[FAIL]" in ln]
    assert any("transaction" in ln for ln in failed), run
    assert any("batch" in ln for ln in failed), run
    assert len(failed) == 2, run
    assert "Traceback" not in run.output


def test_check_unreachable_port_exit_4_one_line(state: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    run = cli("check", "--server", f"http://127.0.0.1:{port}/fhir", state=state)
    elapsed = time.monotonic() - started
    assert run.exit_code == 4, run
    assert "Traceback" not in run.output, run
    assert len(run.out_lines) == 1, run  # one line: not reachable, and nothing else checked
    assert "reachable" in run.out_lines[0] and str(port) in run.out_lines[0], run
    final = [ln for ln in run.lines if "retry" not in ln]  # retry warnings are progress, not the message
    assert len(final) == 1, run
    print(f"\ncheck on a closed port took {elapsed:.1f} s ({len(run.lines) - 1} retry warning(s))")


# --------------------------------------------------------------------------------------------
# push --dry-run
# --------------------------------------------------------------------------------------------


def test_dry_run_empty_server_writes_nothing(fhir_server: TestFhirServer, state: Path) -> None:
    """Nothing written, proved by the server: no write request (both fronts classify requests by
    method and path: POST/PUT/PATCH/DELETE under the FHIR base are writes, except `POST
    Type/_search`, a batch of GET entries POSTed to the base (searches) and, on the HAPI front,
    `POST .../$validate`, FHIR's read-only operations), no write entry received, no resource
    version stored (HAPI: history rows in its database) and no resource there. Where the server
    offers `$validate` (HAPI) the dry run POSTs to it; where it declares `batch` (Medplum) its
    searches go as one batch POST."""
    run = cli("push", EXAMPLE_CSV, "--server", fhir_server.base_url, "--dry-run", state=state)
    assert run.exit_code == 0, run
    plan = run.plan()
    assert {k: v["create"] for k, v in plan.items()} == EXAMPLE_TOTAL
    assert all(v["update"] == v["unchanged"] == 0 for v in plan.values()), run
    stats = fhir_server.stats()
    assert stats["writes"] == 0 and stats["write_entries_received"] == 0, stats
    assert stats["entries_written"] == 0, stats
    assert server_count(fhir_server) == {}
    validated = re.search(r"validation: ([^)]*)\)", run.stdout)
    assert validated, run
    # reads only: GETs, and POSTs of $validate or of batches of GET searches (where the server
    # declares batch), which the fronts count as reads, not writes
    assert set(stats["by_method"]) <= {"GET", "POST"}, stats


def test_dry_run_after_push_says_unchanged(fhir_server: TestFhirServer, state: Path) -> None:
    push = cli("push", EXAMPLE_CSV, "--server", fhir_server.base_url, state=state)
    assert push.exit_code == 0, push
    writes = fhir_server.stats()["writes"]
    run = cli("push", EXAMPLE_CSV, "--server", fhir_server.base_url, "--dry-run", state=state)
    assert run.exit_code == 0, run
    assert fhir_server.stats()["writes"] == writes
    plan = run.plan()
    assert {k: v["unchanged"] for k, v in plan.items()} == EXAMPLE_TOTAL, run
    assert all(v["create"] == v["update"] == 0 for v in plan.values()), run


def test_dry_run_after_one_change_says_update_one(fhir_server: TestFhirServer, state: Path, tmp_path: Path) -> None:
    push = cli("push", EXAMPLE_CSV, "--server", fhir_server.base_url, state=state)
    assert push.exit_code == 0, push
    writes = fhir_server.stats()["writes"]
    changed = changed_example(tmp_path / "changed.csv")
    run = cli("push", changed, "--server", fhir_server.base_url, "--dry-run", state=state)
    assert run.exit_code == 0, run
    assert fhir_server.stats()["writes"] == writes
    plan = run.plan()
    assert plan["Observation"] == {"create": 0, "update": 1, "unchanged": EXAMPLE_TOTAL["Observation"] - 1}, run
    for kind in EXAMPLE_TOTAL.keys() - {"Observation"}:
        assert plan[kind] == {"create": 0, "update": 0, "unchanged": EXAMPLE_TOTAL[kind]}, f"{kind}\n{run}"


# --------------------------------------------------------------------------------------------
# profiles
# --------------------------------------------------------------------------------------------


@medplum_only  # require_token: the Medplum front's auth; HAPI here has no auth layer
def test_profile_config_for_push_and_check(fhir_server: TestFhirServer, state: Path, tmp_path: Path) -> None:
    token = f"canary-site-token-{uuid.uuid4().hex}"
    fhir_server.configure(require_token=token)
    config = tmp_path / "ruxo.toml"
    config.write_text(
        "[servers.site]\n"
        f'url = "{fhir_server.base_url}"\n'
        'token_env = "SITE_FHIR_TOKEN"\n'
        "batch_size = 10\n",
        encoding="utf-8",
    )
    env = {"SITE_FHIR_TOKEN": token}
    chk = cli("check", "--config", config, "--profile", "site", state=state, env=env)
    assert chk.exit_code == 0, chk
    push = cli("push", EXAMPLE_CSV, "--config", config, "--profile", "site", state=state, env=env)
    assert push.exit_code == 0, push
    bundles = int(re.search(r"(\d+) bundle\(s\)", push.stderr).group(1))  # type: ignore[union-attr]
    assert bundles >= 74 // 10, push  # the profile's batch_size was used
    assert server_count(fhir_server) == EXAMPLE_TOTAL
    assert token not in chk.output + push.output

    # a flag overrides the profile: a wrong URL in the profile, the right one on the command line
    config.write_text('[servers.site]\nurl = "http://127.0.0.1:9/nowhere"\ntoken_env = "SITE_FHIR_TOKEN"\n',
                      encoding="utf-8")
    again = cli("push", EXAMPLE_CSV, "--config", config, "--profile", "site", "--server", fhir_server.base_url,
                state=state, env=env)
    assert again.exit_code == 0, again


def test_profile_holding_a_token_is_refused(fhir_server: TestFhirServer, state: Path, tmp_path: Path) -> None:
    secret = f"canary-in-config-{uuid.uuid4().hex}"
    config = tmp_path / "ruxo.toml"
    config.write_text(f'[servers.leaky]\nurl = "{fhir_server.base_url}"\ntoken = "{secret}"\n', encoding="utf-8")
    for command in (["push", EXAMPLE_CSV], ["check"]):
        run = cli(*command, "--config", config, "--profile", "leaky", state=state)
        assert run.exit_code != 0, run
        assert len(run.lines) == 1, run
        assert "token" in run.lines[0] and "leaky" in run.lines[0], run
        assert secret not in run.output, run
        assert "Traceback" not in run.output
    assert fhir_server.stats()["requests"] == 0  # refused before contacting the server


# --------------------------------------------------------------------------------------------
# push --report
# --------------------------------------------------------------------------------------------


def test_push_report_json(fhir_server: TestFhirServer, state: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    run = cli("push", EXAMPLE_CSV, "--server", fhir_server.base_url, "--report", report, state=state)
    assert run.exit_code == 0, run
    text = report.read_text(encoding="utf-8")
    doc = json.loads(text)
    assert doc["server"] == fhir_server.base_url
    counts = doc["counts"]
    assert counts["created"] + counts["updated"] == counts["total"] == sum(EXAMPLE_TOTAL.values())
    assert counts["rejected"] == 0 and counts["unchanged"] == 0
    sha = hashlib.sha256(EXAMPLE_CSV.read_bytes()).hexdigest()
    assert any(i.get("sha256") == sha for i in doc["inputs"]), doc["inputs"]
    # no patient ids (local or server-side); case ids would be allowed
    with EXAMPLE_CSV.open(encoding="utf-8", newline="") as fh:
        patients = [row["patient_id"] for row in csv.DictReader(fh)]
    for pid in patients:
        assert not re.search(rf"\b{re.escape(pid)}\b", text), f"patient id {pid} in the report"
    pulled_ids = [e["resource"]["id"] for e in requests.get(f"{fhir_server.base_url}/Patient?_count=50",
                                                              timeout=30).json()["entry"]]
    assert len(pulled_ids) == 12
    for sid in pulled_ids:
        assert sid not in text

    # a second run's report: all unchanged
    again = tmp_path / "again.json"
    run = cli("push", EXAMPLE_CSV, "--server", fhir_server.base_url, "--report", again, state=state)
    assert run.exit_code == 0, run
    assert json.loads(again.read_text(encoding="utf-8"))["counts"]["unchanged"] == sum(EXAMPLE_TOTAL.values())


@medplum_only  # fhir_version switch rewrites the CapabilityStatement (Medplum front only)
def test_push_report_written_on_failure(fhir_server: TestFhirServer, state: Path, tmp_path: Path) -> None:
    fhir_server.configure(fhir_version="5.0.0")
    report = tmp_path / "report.json"
    run = cli("push", EXAMPLE_CSV, "--server", fhir_server.base_url, "--report", report, state=state)
    assert run.exit_code == 5, run
    doc = json.loads(report.read_text(encoding="utf-8"))
    assert doc["status"] != "ok"
    assert doc["server"] == fhir_server.base_url


def test_dry_run_after_push_of_a_bundle_with_integral_decimals_says_unchanged(
    fhir_server: TestFhirServer, state: Path, tmp_path: Path
) -> None:
    """A Bundle from another tool writes `2.0`; the server echoes `2` (the same JSON number).
    Pushing it again would change nothing, so the plan must say unchanged."""
    doc = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:0b7e0f4e-1111-4000-8000-000000000001",
         "resource": {"resourceType": "Patient", "id": "ext-p1", "gender": "female"},
         "request": {"method": "PUT", "url": "Patient/ext-p1"}},
        {"fullUrl": "urn:uuid:0b7e0f4e-1111-4000-8000-000000000002",
         "resource": {"resourceType": "Observation", "id": "ext-o1", "status": "final", "code": {"text": "dose"},
                      "subject": {"reference": "Patient/ext-p1"},
                      "valueQuantity": {"value": 2.0, "unit": "mg", "system": "http://unitsofmeasure.org",
                                        "code": "mg"}},
         "request": {"method": "PUT", "url": "Observation/ext-o1"}},
    ]}
    path = tmp_path / "other-tool.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    assert '"value": 2.0' in path.read_text(encoding="utf-8")
    push = cli("push", path, "--server", fhir_server.base_url, state=state)
    assert push.exit_code == 0, push
    entries_written = fhir_server.stats()["entries_written"]
    # a real second push (without the ledger) is a no-op on the server ...
    again = cli("push", path, "--server", fhir_server.base_url, "--no-ledger", state=state)
    assert again.exit_code == 0, again
    assert fhir_server.stats()["entries_written"] == entries_written
    # ... so the plan must not announce an update
    run = cli("push", path, "--server", fhir_server.base_url, "--dry-run", state=state)
    assert run.exit_code == 0, run
    assert run.plan() == {"Observation": {"create": 0, "update": 0, "unchanged": 1},
                          "Patient": {"create": 0, "update": 0, "unchanged": 1}}, run
