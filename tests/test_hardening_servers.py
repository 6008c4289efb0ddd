"""Issue 13, "Hostile or broken servers": one test per line, against hostile loopback servers
(and the real test FHIR server where the line is about working data)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from e2e_cli import Run, run_cli
from fhirserver import generate_smart_key
from helpers import EXAMPLE_CSV
from hostile import (  # noqa: F401 - `hostile` is a fixture
    Reply,
    capability,
    endless,
    fhir_basics,
    gzip_bomb,
    hostile,
    searchset,
)

pytestmark = pytest.mark.e2e
TOKEN = "tok-redirect-Secr3t-123"


def cli(tmp_path: Path, *args: str | Path, env: dict[str, str] | None = None, timeout: float = 120) -> Run:
    return run_cli(Run, *args, state=tmp_path / "state", env=env, timeout=timeout)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b.json"
    run = run_cli(Run, "import", EXAMPLE_CSV, "-o", out, state=out.parent / "state")
    assert run.exit_code == 0, run
    return out


# --- redirects --------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [307, 308])
def test_cross_origin_redirect_of_transaction_post_never_resends_the_bundle(tmp_path: Path, hostile, bundle: Path,
                                                                             status: int) -> None:
    elsewhere = hostile(lambda req: Reply(200, {"resourceType": "Bundle", "type": "transaction-response"}))

    def handler(req):  # type: ignore[no-untyped-def]
        if req.method == "POST":
            return Reply(status, headers={"Location": elsewhere.base_url})
        return fhir_basics(req)

    srv = hostile(handler)
    run = cli(tmp_path, "push", bundle, "--server", srv.base_url, "--no-ledger", env={"RUXO_FHIR_TOKEN": TOKEN})
    assert run.exit_code in (1, 4), run
    assert "another origin" in run.stderr and "Traceback" not in run.stderr
    assert any(r.method == "POST" and r.body for r in srv.requests)  # the bundle went to the server itself
    assert elsewhere.requests == []  # ... and never, body or token, to the other origin


@pytest.mark.parametrize("with_patient", [False, True])
def test_search_redirected_to_another_origin_is_an_error_cursor_does_not_advance(tmp_path: Path, hostile,
                                                                                 with_patient: bool) -> None:
    elsewhere = hostile(lambda req: Reply(200, searchset()))

    def handler(req):  # type: ignore[no-untyped-def]
        if req.fhir_path in ("Patient", "MedicationStatement"):
            return Reply(302, headers={"Location": elsewhere.root_url + req.raw_target})
        return fhir_basics(req)

    srv = hostile(handler)
    cursor = tmp_path / "nightly.cursor"
    saved = json.dumps({"server": srv.base_url, "since": "2020-01-01T00:00:00Z"})
    cursor.write_text(saved)
    extra = ("--patient", "P-SECRET-77") if with_patient else ()
    run = cli(tmp_path, "pull", "--server", srv.base_url, "-o", tmp_path / "p.json", "--cursor", cursor, *extra,
              env={"RUXO_FHIR_TOKEN": TOKEN})
    assert run.exit_code == 4, run
    assert "redirected" in run.stderr and "another origin" in run.stderr
    assert cursor.read_text() == saved  # not advanced on a failed pull
    assert not (tmp_path / "p.json").exists()
    assert elsewhere.requests == []  # --patient ids (and every search parameter) never sent there
    assert "P-SECRET-77" not in run.output


def test_same_origin_redirect_still_followed(hostile) -> None:
    from ruxo_fhir.transport.rest import FhirClient

    def handler(req):  # type: ignore[no-untyped-def]
        if req.fhir_path == "Patient":
            return Reply(301, headers={"Location": "/fhir/Patient2?" + req.raw_target.split("?", 1)[-1]})
        if req.fhir_path == "Patient2":
            return Reply(200, searchset([{"resourceType": "Patient", "id": "a"}]))
        return fhir_basics(req)

    srv = hostile(handler)
    with FhirClient(srv.base_url) as client:
        assert [r["id"] for r in client.search("Patient", {"identifier": "x|1"})] == ["a"]
    assert srv.paths() == ["Patient", "Patient2"]
    assert srv.requests[1].query == {"identifier": ["x|1"]}


# --- bounded responses ------------------------------------------------------------------------

def test_response_body_cap_is_configurable(tmp_path: Path, hostile) -> None:
    big = searchset([{"resourceType": "Patient", "id": f"p{i}", "text": {"status": "generated",
                     "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">" + "x" * 1000 + "</div>"}}
                     for i in range(3000)])  # ~3.3 MB

    def handler(req):  # type: ignore[no-untyped-def]
        return fhir_basics(req) if req.fhir_path == "metadata" else Reply(200, big)

    srv = hostile(handler)
    run = cli(tmp_path, "pull", "--server", srv.base_url, "-o", tmp_path / "p.json", "--max-response-mb", "1")
    assert run.exit_code == 4, run
    assert len(run.lines) == 1 and "larger than the 1 MB cap" in run.stderr, run
    ok = cli(tmp_path, "pull", "--server", srv.base_url, "-o", tmp_path / "p.json", "--max-response-mb", "10")
    assert "larger than" not in ok.stderr, ok


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_gzip_deflate_decompression_bounded_by_the_cap(tmp_path: Path, hostile, encoding: str) -> None:
    import zlib

    raw = b"\0" * (300 * 1024 * 1024)  # 300 MB once decompressed
    body = gzip_bomb(len(raw)) if encoding == "gzip" else zlib.compress(raw, 9)
    del raw
    assert len(body) < 2 * 1024 * 1024

    def handler(req):  # type: ignore[no-untyped-def]
        if req.fhir_path == "metadata":
            return fhir_basics(req)
        return Reply(200, body, headers={"Content-Encoding": encoding})

    srv = hostile(handler)
    started = time.monotonic()
    run = cli(tmp_path, "pull", "--server", srv.base_url, "-o", tmp_path / "p.json", "--max-response-mb", "4")
    assert run.exit_code == 4, run
    assert len(run.lines) == 1 and "cap" in run.stderr, run
    assert time.monotonic() - started < 30


def test_bounded_decoder_never_expands_beyond_the_room() -> None:
    from ruxo_fhir.transport.rest import _BoundedDecoder

    data = gzip_bomb(50 * 1024 * 1024)
    pieces = list(_BoundedDecoder("gzip").decode(data, 1000))
    assert sum(map(len, pieces)) == 1001  # one byte over the room: enough to know, no more


@pytest.mark.parametrize("shape", ["trickle", "endless-chunked"])
def test_timeout_is_a_deadline_for_the_whole_response(tmp_path: Path, hostile, shape: str) -> None:
    def handler(req):  # type: ignore[no-untyped-def]
        if shape == "trickle":  # 1 byte every 0.3 s of a 100 kB answer: never a read timeout
            return Reply(200, stream=endless(b"{"), pause=0.3, length=100_000)
        return Reply(200, stream=endless(b"[" * 64), pause=0.05, chunked=True)

    srv = hostile(handler, max_seconds=30)
    started = time.monotonic()
    run = cli(tmp_path, "pull", "--server", srv.base_url, "-o", tmp_path / "p.json", "--timeout", "2")
    elapsed = time.monotonic() - started
    assert run.exit_code == 4, run
    assert len(run.lines) == 1 and "deadline" in run.stderr, run
    assert elapsed < 2 + 6  # the deadline plus interpreter start-up, never the 30 s the server would go on
    assert len(srv.requests) == 1  # a deadline is not retried


# --- SMART ------------------------------------------------------------------------------------

def test_smart_token_endpoint_must_be_https_or_same_origin_check_says_why(tmp_path: Path, hostile) -> None:
    token_server = hostile(lambda req: Reply(200, {"access_token": "x" * 20, "token_type": "bearer",
                                                   "expires_in": 300}))

    def handler(req):  # type: ignore[no-untyped-def]
        if req.fhir_path == ".well-known/smart-configuration":
            return Reply(200, {"token_endpoint": token_server.root_url + "/token",
                               "token_endpoint_auth_methods_supported": ["private_key_jwt"]})
        return fhir_basics(req)

    srv = hostile(handler)
    pem, _jwk = generate_smart_key()
    key = tmp_path / "key.pem"
    key.write_bytes(pem)
    run = cli(tmp_path, "check", "--server", srv.base_url, "--auth", "smart", "--client-id", "c1",
              "--private-key", key)
    assert run.exit_code == 4, run
    assert "[FAIL] auth" in run.stdout and "not https" in run.stdout, run
    assert token_server.requests == []  # the client assertion never travelled in the clear


def test_smart_token_endpoint_rule() -> None:
    from ruxo_fhir.errors import AuthError
    from ruxo_fhir.transport.auth import check_token_endpoint

    check_token_endpoint("https://auth.example/token", "https://fhir.example/r4")
    check_token_endpoint("http://fhir.example:8080/auth/token", "http://fhir.example:8080/r4")
    for endpoint, base in (("http://auth.example/token", "https://fhir.example/r4"),
                           ("http://fhir.example/token", "https://fhir.example/r4"),
                           ("http://other:8080/token", "http://fhir.example:8080/r4")):
        with pytest.raises(AuthError, match="not https"):
            check_token_endpoint(endpoint, base)


# --- cursor, check, CapabilityStatement -------------------------------------------------------

def test_cursor_file_records_its_server_and_refuses_another(tmp_path: Path, hostile, fhir_server, bundle: Path) -> None:
    other = hostile(fhir_basics)
    cursor = tmp_path / "nightly.cursor"
    first = cli(tmp_path, "pull", "--server", other.base_url, "-o", tmp_path / "a.json", "--cursor", cursor)
    assert first.exit_code == 0, first
    assert json.loads(cursor.read_text())["server"] == other.base_url
    assert cli(tmp_path, "push", bundle, "--server", fhir_server.base_url).exit_code == 0
    saved = cursor.read_text()
    run = cli(tmp_path, "pull", "--server", fhir_server.base_url, "-o", tmp_path / "b.json", "--cursor", cursor)
    assert run.exit_code == 3, run
    assert len(run.lines) == 1 and "another server" in run.stderr and str(cursor) in run.stderr
    assert cursor.read_text() == saved and not (tmp_path / "b.json").exists()
    fresh = cli(tmp_path, "pull", "--server", fhir_server.base_url, "-o", tmp_path / "b.json",
                "--cursor", tmp_path / "own.cursor")
    assert fresh.exit_code == 0 and "pulled 74 resources" in fresh.stderr, fresh


def test_check_reads_a_bounded_number_of_pages(tmp_path: Path, hostile) -> None:
    def handler(req):  # type: ignore[no-untyped-def]
        if req.fhir_path == "Patient":  # every page links to a new next page, forever
            page = int(req.query.get("page", ["0"])[0])
            return Reply(200, searchset([{"resourceType": "Patient", "id": f"p{page}"}],
                                        next_url=f"{srv.base_url}/Patient?page={page + 1}"))
        return fhir_basics(req)

    srv = hostile(handler)
    run = cli(tmp_path, "check", "--server", srv.base_url, timeout=60)
    assert run.exit_code == 0, run
    assert srv.paths().count("Patient") == 1


@pytest.mark.parametrize("rest", ["nonsense", ["nonsense"], [{"resource": "x"}],
                                  [{"resource": [{"type": "Patient", "interaction": "all"}]}]])
def test_wrong_shaped_capability_statement_one_line_exit_4_or_5(tmp_path: Path, hostile, bundle: Path,
                                                                rest: object) -> None:
    def handler(req):  # type: ignore[no-untyped-def]
        if req.fhir_path == "metadata":
            return Reply(200, capability(rest=rest))
        return fhir_basics(req)

    srv = hostile(handler)
    for args in (("check",), ("push", bundle, "--no-ledger"), ("push", bundle, "--dry-run")):
        run = cli(tmp_path, *args, "--server", srv.base_url)
        assert run.exit_code in (4, 5), run
        assert "malformed" in run.output and "Traceback" not in run.output, run
        assert len(run.lines) <= 2, run  # check: its table on stdout plus one summary line
