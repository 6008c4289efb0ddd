"""End-to-end auth against the real test FHIR server: bearer, basic, SMART Backend Services.

Secrets are canaries (unique strings): they must never show up in stdout, stderr or -v logs,
and neither may a patient id. The CLI runs in a subprocess; the library is used where a client
must live longer than a token.
"""
from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from cohort_gen import generate_cases
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from e2e_cli import Run as BaseRun
from e2e_cli import run_cli
from fhirserver import TestFhirServer

pytestmark = pytest.mark.e2e  # every test here starts the test FHIR server

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CSV = REPO / "examples" / "cases.csv"
CLIENT_ID = "ruxo-backend-test"


class Run(BaseRun):
    pass


def cli(*args: str | Path, state: Path, env: dict[str, str] | None = None, timeout: float = 300) -> Run:
    return run_cli(Run, *args, state=state, env=env, timeout=timeout)


def canary(what: str) -> str:
    return f"canary-{what}-{uuid.uuid4().hex}"


def server_count(server: TestFhirServer) -> dict[str, int]:
    r = requests.get(f"{server.root_url}/$admin/count", timeout=30)
    r.raise_for_status()
    out: dict[str, int] = r.json()
    return out


def assert_one_clean_error_line(run: Run, *secrets: str) -> None:
    assert run.exit_code == 4, run
    assert len(run.lines) == 1, run
    assert run.lines[0].startswith("error:"), run
    assert "Traceback" not in run.output, run
    for secret in secrets:
        assert secret not in run.output, f"secret leaked\n{run}"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


EXAMPLE_TOTAL = {"AdverseEvent": 1, "Condition": 12, "MedicationStatement": 32, "Observation": 17, "Patient": 12}


# --------------------------------------------------------------------------------------------
# bearer token
# --------------------------------------------------------------------------------------------


def test_push_help_names_the_token_variable(state: Path) -> None:
    run = cli("push", "--help", state=state)
    assert run.exit_code == 0, run
    assert "RUXO_FHIR_TOKEN" in run.stdout


def test_bearer_token_right_and_wrong(fhir_server: TestFhirServer, state: Path, tmp_path: Path) -> None:
    good = canary("good-token")
    wrong = canary("wrong-token")
    fhir_server.configure(require_token=good)

    # no token at all: refused, one line
    none = cli("push", EXAMPLE_CSV, "--server", fhir_server.base_url, state=state)
    assert_one_clean_error_line(none)
    assert "401" in none.lines[0] or "auth" in none.lines[0].lower(), none

    # the wrong token: refused, one line, the token value never printed (also with -vv)
    for verbosity in ([], ["-vv"]):
        bad = cli(*verbosity, "push", EXAMPLE_CSV, "--server", fhir_server.base_url, state=state,
                  env={"RUXO_FHIR_TOKEN": wrong})
        assert bad.exit_code == 4, bad
        assert wrong not in bad.output, f"token leaked\n{bad}"
        assert "Traceback" not in bad.output, bad
        if not verbosity:
            assert_one_clean_error_line(bad, wrong)
    assert fhir_server.stats()["entries_written"] == 0
    assert server_count(fhir_server) == {}

    # the right token: works, and -vv logs do not show it
    ok = cli("-vv", "push", EXAMPLE_CSV, "--server", fhir_server.base_url, state=state,
             env={"RUXO_FHIR_TOKEN": good})
    assert ok.exit_code == 0, ok
    assert good not in ok.output, f"token leaked\n{ok}"
    assert server_count(fhir_server) == EXAMPLE_TOTAL

    # pull with the token too (bundle output)
    out = tmp_path / "pulled.json"
    pulled = cli("-vv", "pull", "--server", fhir_server.base_url, "-o", out, state=state,
                 env={"RUXO_FHIR_TOKEN": good})
    assert pulled.exit_code == 0, pulled
    assert good not in pulled.output
    assert len(json.loads(out.read_text(encoding="utf-8"))["entry"]) == sum(EXAMPLE_TOTAL.values())

    # check with the wrong token: exit 4
    chk = cli("check", "--server", fhir_server.base_url, state=state, env={"RUXO_FHIR_TOKEN": wrong})
    assert chk.exit_code == 4, chk
    assert wrong not in chk.output and "Traceback" not in chk.output, chk


def test_verbose_logs_carry_no_patient_id(fhir_server: TestFhirServer, state: Path, tmp_path: Path) -> None:
    """A patient id is PHI: -vv logs of push and `pull --patient` must not show it."""
    patient = canary("PAT").upper()
    token = canary("token")
    fhir_server.configure(require_token=token)
    src = tmp_path / "one.csv"
    src.write_text(
        "case_id,patient_id,sex,birth_date,indication,treatment_start,frequency,improvement_pct\n"
        f"K1,{patient},F,1970-01-02,morphea,2024-05-02,BID,50\n",
        encoding="utf-8",
    )
    env = {"RUXO_FHIR_TOKEN": token}
    push = cli("-vv", "push", src, "--server", fhir_server.base_url, state=state, env=env)
    assert push.exit_code == 0, push
    for fmt in ("plain", "json"):
        pull = cli("-vv", "--log-format", fmt, "pull", "--server", fhir_server.base_url,
                   "-o", tmp_path / f"p-{fmt}.json", "--patient", patient, state=state, env=env)
        assert pull.exit_code == 0, pull
        assert patient not in pull.output, f"patient id leaked\n{pull}"
        assert token not in pull.output
        doc = json.loads((tmp_path / f"p-{fmt}.json").read_text(encoding="utf-8"))
        assert {e["resource"]["resourceType"] for e in doc["entry"]} >= {"Patient", "MedicationStatement"}
    assert patient not in push.output and token not in push.output, push


# --------------------------------------------------------------------------------------------
# HTTP basic
# --------------------------------------------------------------------------------------------


def test_basic_auth(fhir_server: TestFhirServer, state: Path) -> None:
    password = canary("password")
    wrong = canary("wrong-password")
    fhir_server.configure(basic_auth={"user": "alice", "password": password})
    ok = cli("-vv", "push", EXAMPLE_CSV, "--server", fhir_server.base_url, "--auth", "basic", "--user", "alice",
             state=state, env={"RUXO_FHIR_PASSWORD": password})
    assert ok.exit_code == 0, ok
    assert password not in ok.output
    assert base64.b64encode(f"alice:{password}".encode()).decode() not in ok.output
    assert server_count(fhir_server) == EXAMPLE_TOTAL

    bad = cli("push", EXAMPLE_CSV, "--server", fhir_server.base_url, "--auth", "basic", "--user", "alice",
              state=state, env={"RUXO_FHIR_PASSWORD": wrong})
    assert_one_clean_error_line(bad, wrong, base64.b64encode(f"alice:{wrong}".encode()).decode())

    # no password at all: a clear message naming the variable, nothing sent
    missing = cli("push", EXAMPLE_CSV, "--server", fhir_server.base_url, "--auth", "basic", "--user", "alice",
                  state=state)
    assert missing.exit_code != 0, missing
    assert len(missing.lines) == 1 and "RUXO_FHIR_PASSWORD" in missing.lines[0], missing


# --------------------------------------------------------------------------------------------
# SMART Backend Services
# --------------------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int(n: int) -> str:
    return _b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))


def make_rsa_key(path: Path) -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    """An RSA key written as PEM, and its public JWK with kid = RFC 7638 thumbprint."""
    from ruxo_fhir.transport.auth import jwk_thumbprint

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    numbers = key.public_key().public_numbers()
    jwk = {"kty": "RSA", "n": _int(numbers.n), "e": _int(numbers.e)}
    # RFC 7638, computed here independently: SHA-256 of {"e","kty","n"} in lexical order, no spaces
    canonical = json.dumps({"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}, separators=(",", ":"), sort_keys=True)
    independent = _b64url(hashlib.sha256(canonical.encode()).digest())
    kid = jwk_thumbprint(key)
    assert kid == independent
    return key, {**jwk, "kid": kid, "alg": "RS384", "use": "sig"}


@pytest.fixture
def smart_key(fhir_server: TestFhirServer, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    pem = tmp_path / "key.pem"
    _, jwk = make_rsa_key(pem)
    fhir_server.configure(require_auth=True, token_lifetime=2,
                          smart_clients=[{"client_id": CLIENT_ID, "jwks": {"keys": [jwk]}}])
    return pem, jwk


def _smart_args(pem: Path, *extra: str) -> list[str]:
    return ["--auth", "smart", "--client-id", CLIENT_ID, "--private-key", str(pem), *extra]


def test_smart_backend_push_and_long_push_outliving_the_token(
    fhir_server: TestFhirServer, smart_key: tuple[Path, dict[str, Any]], state: Path, tmp_path: Path
) -> None:
    pem, _ = smart_key
    # without credentials the server refuses
    anon = cli("push", EXAMPLE_CSV, "--server", fhir_server.base_url, state=state)
    assert_one_clean_error_line(anon)

    ok = cli("-vv", "push", EXAMPLE_CSV, "--server", fhir_server.base_url, *_smart_args(pem), state=state)
    assert ok.exit_code == 0, ok
    assert server_count(fhir_server) == EXAMPLE_TOTAL
    assert fhir_server.stats()["tokens_issued"] >= 1
    assert "eyJ" not in ok.output, "a JWT (assertion) appears in the logs"
    assert "access_token" not in ok.output and "client_assertion=" not in ok.output, ok

    # a push that lasts several token lifetimes (2 s): small bundles, a slow server
    src = tmp_path / "cases.csv"
    src.write_text(generate_cases(40, seed=5), encoding="utf-8")
    fhir_server.configure(latency_ms=150)
    tokens_before = fhir_server.stats()["tokens_issued"]
    started = time.monotonic()
    long = cli("push", src, "--server", fhir_server.base_url, "--batch-size", "10", *_smart_args(pem), state=state)
    elapsed = time.monotonic() - started
    assert long.exit_code == 0, long
    assert elapsed > 4, f"the push was too short ({elapsed:.1f} s) to outlive a 2 s token"
    assert fhir_server.stats()["tokens_issued"] - tokens_before >= 2  # it got fresh tokens on the way
    summary = long.lines[-1]
    assert "rejected 0" in summary, long


def test_smart_same_client_after_token_expiry(
    fhir_server: TestFhirServer, smart_key: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """The library: one client, a push, a pause longer than the token lifetime, another push."""
    from ruxo_fhir.importer import source_resources
    from ruxo_fhir.mapping.spec import load_mapping
    from ruxo_fhir.sync.ledger import Ledger
    from ruxo_fhir.sync.pull import pull_cohort
    from ruxo_fhir.sync.push import push
    from ruxo_fhir.transport.auth import SmartBackendAuth
    from ruxo_fhir.transport.rest import FhirClient

    pem, jwk = smart_key
    mapping = load_mapping()
    auth = SmartBackendAuth(fhir_server.base_url, CLIENT_ID, pem.read_bytes())
    assert auth.key_id == jwk["kid"]
    resources = list(source_resources(EXAMPLE_CSV, mapping))
    with FhirClient(fhir_server.base_url, auth=auth) as client, Ledger(tmp_path / "ledger.sqlite3") as ledger:
        first = push(client, resources, mapping, ledger=ledger)
        assert first.created + first.updated == len(resources)
        time.sleep(2.5)  # the token (2 s) has expired
        second = push(client, resources, mapping, ledger=ledger)  # authorised reads for the ledger check
        assert second.unchanged == len(resources)
        time.sleep(2.5)
        pulled = list(pull_cohort(client, mapping))
        assert len(pulled) == len(resources)
    assert auth.token_requests >= 3
    assert server_count(fhir_server) == EXAMPLE_TOTAL


def test_smart_wrong_key_one_line(
    fhir_server: TestFhirServer, smart_key: tuple[Path, dict[str, Any]], state: Path, tmp_path: Path
) -> None:
    _, jwk = smart_key
    wrong_pem = tmp_path / "wrong.pem"
    make_rsa_key(wrong_pem)
    # the registered kid, but signed with another key: the signature does not verify
    forged = cli("push", EXAMPLE_CSV, "--server", fhir_server.base_url,
                 *_smart_args(wrong_pem, "--key-id", jwk["kid"]), state=state)
    assert_one_clean_error_line(forged)
    assert "signature" in forged.lines[0].lower(), forged
    # another key with its own thumbprint: the server knows no such kid
    unknown = cli("push", EXAMPLE_CSV, "--server", fhir_server.base_url, *_smart_args(wrong_pem), state=state)
    assert_one_clean_error_line(unknown)
    assert "eyJ" not in forged.output + unknown.output
    assert server_count(fhir_server) == {}
    assert fhir_server.stats()["tokens_issued"] == 0


def test_check_with_smart(fhir_server: TestFhirServer, smart_key: tuple[Path, dict[str, Any]], state: Path) -> None:
    pem, _ = smart_key
    run = cli("check", "--server", fhir_server.base_url, *_smart_args(pem), state=state)
    assert run.exit_code == 0, run
    assert "eyJ" not in run.output
