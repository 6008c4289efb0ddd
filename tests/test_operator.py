"""Operator experience: run reports, log formats, help that teaches, no secrets or PHI in output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_sync_e2e import counted_as

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cases.csv"
COMMANDS = ("import", "validate", "export", "outcomes", "push", "pull", "check")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "ruxo_fhir", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_ends_with_a_real_example(command: str) -> None:
    proc = run(command, "--help")
    assert proc.returncode == 0
    assert "Example:" in proc.stdout
    assert "ruxo-fhir " + command in proc.stdout


def test_import_report_has_counts_inputs_and_versions(tmp_path: Path) -> None:
    report = tmp_path / "run.json"
    proc = run("import", str(EXAMPLE), "-o", str(tmp_path / "b.json"), "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(report.read_text())
    assert doc["command"] == "import" and doc["status"] == "ok"
    assert doc["counts"]["accepted"] == 12 and doc["counts"]["total"] == 12
    assert doc["inputs"][0]["sha256"] and len(doc["inputs"][0]["sha256"]) == 64
    assert doc["tool"]["version"] and doc["mapping"]["version"] and len(doc["mapping"]["sha256"]) == 64
    assert doc["start"] <= doc["end"]


def test_failed_import_still_writes_a_report(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    report = tmp_path / "run.json"
    proc = run("import", str(bad), "-o", str(tmp_path / "b.json"), "--report", str(report))
    assert proc.returncode == 3
    doc = json.loads(report.read_text())
    assert doc["status"] == "failed" and "missing required column" in doc["errors"][0]


def test_json_logs_and_no_patient_data(tmp_path: Path) -> None:
    """A canary in the name-like columns must never reach logs, warnings or the report."""
    canary = "Canary-Dupont-7Q"
    csv_text = EXAMPLE.read_text().splitlines()
    header = csv_text[0] + ",patient_name"
    rows = [line + f",{canary}" for line in csv_text[1:]]
    rows.append(f"C99,P99,F,1970,morphea,{canary}-site,,,not-a-date,BID,,,,,,,,{canary}")
    src = tmp_path / "cases.csv"
    src.write_text("\n".join([header, *rows]) + "\n")
    report = tmp_path / "run.json"
    proc = run("-vv", "--log-format", "json", "import", str(src), "-o", str(tmp_path / "b.json"),
               "--report", str(report))
    assert proc.returncode == 1
    assert canary not in proc.stderr and canary not in proc.stdout
    assert canary not in report.read_text()
    # issue 14: with --log-format json the summary line is JSON as well
    assert json.loads(proc.stderr.strip().splitlines()[-1])["msg"] == "accepted 12, rejected 1, total 13"


def test_json_log_lines_are_json(tmp_path: Path, fhir_server: Any) -> None:
    env = {"RUXO_FHIR_STATE_DIR": str(tmp_path / "state")}
    proc = run("-v", "--log-format", "json", "pull", "--server", fhir_server.base_url, "-o",
               str(tmp_path / "p.json"), env=env)
    assert proc.returncode == 0, proc.stderr
    log_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("{")]
    assert log_lines, proc.stderr
    for line in log_lines:
        doc = json.loads(line)
        assert {"ts", "level", "logger", "msg"} <= set(doc)


def test_quiet_keeps_only_the_summary(tmp_path: Path) -> None:
    proc = run("-q", "import", str(EXAMPLE), "-o", str(tmp_path / "b.json"))
    assert proc.returncode == 0
    assert proc.stderr.strip().splitlines() == ["accepted 12, rejected 0, total 12"]


def test_progress_is_silent_when_not_a_terminal(tmp_path: Path, fhir_server: Any) -> None:
    env = {"RUXO_FHIR_STATE_DIR": str(tmp_path / "state")}
    proc = run("push", str(EXAMPLE), "--server", fhir_server.base_url, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr


def test_ndjson_folder_push_to_a_server_that_checks_references(tmp_path: Path, fhir_server: Any) -> None:
    """Type files are pushed in reference order, so a referential-integrity server (as HAPI is by
    default) accepts an ndjson folder as well as a bundle."""
    fhir_server.configure(referential_integrity=True)
    nd = tmp_path / "nd"
    assert run("import", str(EXAMPLE), "-o", str(nd), "--format", "ndjson").returncode == 0
    env = {"RUXO_FHIR_STATE_DIR": str(tmp_path / "state")}
    proc = run("push", str(nd), "--server", fhir_server.base_url, "--batch-size", "10", env=env)
    assert proc.returncode == 0, proc.stderr
    # created vs updated is what the engine says (this one answers 200 to a PUT that created)
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "created 74," if counted_as(fhir_server) == "created" else "created 0, updated 74,"), proc.stderr
    proc = run("push", str(nd), "--server", fhir_server.base_url, "--batch-size", "10", "--mode", "batch",
               "--no-ledger", env=env)
    assert proc.returncode == 0, proc.stderr


def test_check_with_smart_reports_the_token_and_its_expiry(tmp_path: Path, fhir_server: Any) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from fhirserver import generate_smart_key

    from ruxo_fhir.transport.auth import jwk_thumbprint

    pem, jwk = generate_smart_key(kid="placeholder", alg="ES384")
    jwk["kid"] = jwk_thumbprint(load_pem_private_key(pem, password=None))
    key = tmp_path / "key.pem"
    key.write_bytes(pem)
    fhir_server.configure(require_auth=True, token_lifetime=60,
                          smart_clients=[{"client_id": "ops-check", "jwks": {"keys": [jwk]}}])
    proc = run("check", "--server", fhir_server.base_url, "--auth", "smart", "--client-id", "ops-check",
               "--private-key", str(key))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SMART token obtained" in proc.stdout and "expires in" in proc.stdout
    wrong = run("check", "--server", fhir_server.base_url, "--auth", "smart", "--client-id", "nobody",
                "--private-key", str(key))
    assert wrong.returncode == 4
    assert "Traceback" not in wrong.stderr
