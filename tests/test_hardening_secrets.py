"""Issue 13, "Secrets never leave": one test per line of the issue, against hostile loopback servers."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from e2e_cli import Run, run_cli
from helpers import EXAMPLE_CSV
from hostile import Reply, fhir_basics, hostile, outcome  # noqa: F401 - `hostile` is a fixture

pytestmark = pytest.mark.e2e

TOKEN = "tok-3f9a.Secr3t_value-XYZ"
USER, PASSWORD = "alice", "pa55-w0rd!x"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def cli(tmp_path: Path, *args: str | Path, env: dict[str, str] | None = None, timeout: float = 120) -> Run:
    return run_cli(Run, *args, state=tmp_path / "state", env=env, timeout=timeout)


def _echoing(status: int):  # type: ignore[no-untyped-def]
    """A server answering every data request with `status` and our Authorization header in the body."""

    def handler(req):  # type: ignore[no-untyped-def]
        if req.fhir_path == "metadata":
            return fhir_basics(req)
        auth = req.headers.get("Authorization", "")
        text = f"denied: you sent Authorization: {auth} (raw {auth.split(' ', 1)[-1]})"
        headers = {"Retry-After": "0", "WWW-Authenticate": f'Bearer error="{auth}"'}
        if status == 400:  # a plain-text body, not an OperationOutcome
            return Reply(status, text, headers={"Content-Type": "text/plain", **headers})
        return Reply(status, outcome(text), headers=headers)

    return handler


def _assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in (TOKEN, PASSWORD, BASIC):
            assert secret not in text, f"secret leaked: {text[:2000]}"


@pytest.mark.parametrize("status", [401, 403, 400, 500])
def test_echoed_authorization_header_never_reaches_stderr_or_report(tmp_path: Path, hostile, status: int) -> None:
    srv = hostile(_echoing(status))
    bundle = tmp_path / "b.json"
    assert cli(tmp_path, "import", EXAMPLE_CSV, "-o", bundle).exit_code == 0
    runs = []
    for auth_env, auth_args in (({"RUXO_FHIR_TOKEN": TOKEN}, ()),
                                ({"RUXO_FHIR_PASSWORD": PASSWORD}, ("--auth", "basic", "--user", USER))):
        report_pull, report_push = tmp_path / f"pull{status}.json", tmp_path / f"push{status}.json"
        pulled = cli(tmp_path, "-vv", "pull", "--server", srv.base_url, *auth_args, "-o", tmp_path / "p.json",
                     "--report", report_pull, env=auth_env)
        pushed = cli(tmp_path, "-vv", "push", bundle, "--server", srv.base_url, *auth_args, "--report", report_push,
                     "--no-ledger", env=auth_env)
        checked = cli(tmp_path, "-vv", "check", "--server", srv.base_url, *auth_args, env=auth_env)
        for run in (pulled, pushed, checked):
            assert run.exit_code in ((1, 4) if run is pushed else (4,)), run
            assert "Traceback" not in run.stderr
            runs.append(run)
        _assert_no_secret(report_pull.read_text(), report_push.read_text())
        if status != 400:  # OperationOutcome bodies are quoted (redacted); a plain-text one is not quoted
            assert "[redacted]" in report_pull.read_text() + report_push.read_text()
    # the server really did echo the credentials: the test would catch a leak
    assert any(TOKEN in r.headers.get("Authorization", "") for r in srv.requests)
    for run in runs:
        _assert_no_secret(run.stdout, run.stderr)


def test_redaction_knows_live_secrets_and_generic_shapes() -> None:
    from ruxo_fhir.redact import redact, remember, remember_basic

    remember("plain-live-secret-1")
    remember_basic("bob", "hunter22")
    bob = base64.b64encode(b"bob:hunter22").decode()
    jwt = "eyJhbGciOiJSUzM4NCJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----"
    text = (f"a plain-live-secret-1 b Basic {bob} c hunter22 d Bearer abc.def_123 e {jwt} f {pem} g "
            "client_assertion=xyz123 h")
    out = redact(text)
    for secret in ("plain-live-secret-1", bob, "hunter22", "abc.def_123", jwt, "MIIEvQIBADANBg", "xyz123"):
        assert secret not in out
    assert out.startswith("a [redacted] b Basic [redacted]") and out.endswith(" h")
    assert redact("bearer token is empty; basic information") == "bearer token is empty; basic information"


@pytest.mark.parametrize("where", ["flag", "profile"])
def test_credentials_in_url_refused_exit_2_never_stored(tmp_path: Path, hostile, where: str) -> None:
    srv = hostile(fhir_basics)
    url = srv.base_url.replace("http://", "http://bob:hunter2pw@")
    cursor, report = tmp_path / "c.json", tmp_path / "r.json"
    if where == "flag":
        args: tuple[str, ...] = ("--server", url)
    else:
        config = tmp_path / "config.toml"
        config.write_text(f'[servers.x]\nurl = "{url}"\n')
        args = ("--profile", "x", "--config", str(config))
    for run in (cli(tmp_path, "pull", *args, "-o", tmp_path / "p.json", "--cursor", cursor, "--report", report),
                cli(tmp_path, "check", *args)):
        assert run.exit_code == 2, run
        assert len(run.lines) == 1 and "credentials" in run.stderr, run
        assert "hunter2pw" not in run.output
    assert not cursor.exists() and not report.exists()
    assert srv.requests == []  # refused before anything was sent
    assert not (tmp_path / "state").exists() or "hunter2pw" not in "".join(
        p.read_text(errors="replace") for p in (tmp_path / "state").rglob("*") if p.is_file())


def test_pem_pasted_in_profile_private_key_refused_without_echo(tmp_path: Path) -> None:
    pem_body = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"
    config = tmp_path / "config.toml"
    config.write_text('[servers.x]\nurl = "http://127.0.0.1:9/fhir"\nauth = "smart"\nclient_id = "c"\n'
                      f'private_key = """-----BEGIN PRIVATE KEY-----\n{pem_body}\n-----END PRIVATE KEY-----"""\n')
    run = cli(tmp_path, "check", "--profile", "x", "--config", config)
    assert run.exit_code in (2, 3), run
    assert len(run.lines) == 1 and "private_key" in run.stderr and "path" in run.stderr
    assert pem_body not in run.output and "BEGIN" not in run.output


@pytest.mark.parametrize("token", ["abc\ndef-123", "abcé-123456", "abc def", "tok-12345\r"])
def test_token_with_newline_or_non_ascii_exit_2_one_line(tmp_path: Path, hostile, token: str) -> None:
    srv = hostile(fhir_basics)
    for debug in ("", "1"):
        run = cli(tmp_path, "pull", "--server", srv.base_url, "-o", tmp_path / "p.json",
                  env={"RUXO_FHIR_TOKEN": token, "RUXO_FHIR_DEBUG": debug})
        assert run.exit_code == 2, run
        assert len(run.lines) == 1 and "token" in run.stderr and "Traceback" not in run.stderr, run
        assert token.strip() not in run.output
    assert srv.requests == []


def test_debug_traceback_is_redacted(tmp_path: Path) -> None:
    """RUXO_FHIR_DEBUG's traceback (suggested for bug reports) passes the same redaction step."""
    import subprocess
    import sys

    code = ("import sys; from ruxo_fhir.redact import install_on_std_streams, remember; remember('live-tok-123');"
            "install_on_std_streams(); import traceback\n"
            "try:\n raise RuntimeError('boom Bearer live-tok-123 and eyJabcd.efgh.ijkl')\n"
            "except RuntimeError:\n traceback.print_exc()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "boom" in proc.stderr and "live-tok-123" not in proc.stderr and "eyJabcd" not in proc.stderr
    assert json.dumps(proc.stderr)  # one string, printable
