"""Bulk Data Access $export: kick-off, polling, manifest, downloads, tokens, clean-up."""
from __future__ import annotations

import email.utils
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import responses

from ruxo_fhir.errors import AuthError, CapabilityError, FatalServerError, TemporaryServerError
from ruxo_fhir.transport import BearerAuth, FhirClient, RetryPolicy, bulk_export, bulk_export_to_dir

BASE = "https://fhir.example.org/r4"
STATUS = "https://fhir.example.org/r4/$export-poll-status?_jobId=job-1"
NOW = 1_700_000_000.0


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def make_client(sleeps: list[float]) -> FhirClient:
    retry = RetryPolicy(sleep=sleeps.append, jitter=0, wall_clock=lambda: NOW)
    return FhirClient(BASE, auth=BearerAuth("bulk-token"), retry=retry)


def ndjson(*resources: dict[str, Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in resources)


def serve_export(
    rsps: responses.RequestsMock,
    *,
    requires_token: bool = True,
    file_host: str = "https://fhir.example.org",
    polls: list[tuple[int, dict[str, str]]] | None = None,
) -> None:
    rsps.get(
        f"{BASE}/$export",
        status=202,
        headers={"Content-Location": STATUS},
        match=[
            responses.matchers.query_param_matcher({"_type": "Patient,Observation", "_since": "2024-01-01T00:00:00Z"}),
            responses.matchers.header_matcher({"Prefer": "respond-async", "Accept": "application/fhir+json"}),
        ],
    )
    default_polls = [(202, {"Retry-After": "2", "X-Progress": "10%"}), (202, {"Retry-After": "2"})]
    for status, headers in polls if polls is not None else default_polls:
        rsps.get(STATUS, status=status, headers=headers)
    manifest = {
        "transactionTime": "2024-06-01T00:00:00Z",
        "request": f"{BASE}/$export?_type=Patient,Observation",
        "requiresAccessToken": requires_token,
        "output": [
            {"type": "Patient", "url": f"{file_host}/files/patient-1.ndjson", "count": 2},
            {"type": "Observation", "url": f"{file_host}/files/obs-1.ndjson"},
            {"type": "Patient", "url": f"{file_host}/files/patient-2.ndjson", "count": 1},
        ],
        "error": [{"type": "OperationOutcome", "url": f"{file_host}/files/errors.ndjson"}],
    }
    rsps.get(STATUS, status=200, json=manifest)
    rsps.get(f"{file_host}/files/patient-1.ndjson", body=ndjson({"resourceType": "Patient", "id": "p1"}, {"resourceType": "Patient", "id": "p2"}))
    rsps.get(f"{file_host}/files/patient-2.ndjson", body=ndjson({"resourceType": "Patient", "id": "p3"}))
    rsps.get(f"{file_host}/files/obs-1.ndjson", body=ndjson({"resourceType": "Observation", "id": "o1"}))
    rsps.get(
        f"{file_host}/files/errors.ndjson",
        body=ndjson({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing", "diagnostics": "skipped one"}]}),
    )
    rsps.delete(STATUS, status=202)


def download_calls(rsps: responses.RequestsMock) -> list[Any]:
    return [c for c in rsps.calls if "/files/" in (c.request.url or "")]


def test_export_into_directory(rsps: responses.RequestsMock, tmp_path: Path) -> None:
    serve_export(rsps)
    sleeps: list[float] = []
    polls: list[float] = []
    (tmp_path / "Patient.ndjson").write_text('{"stale": true}\n')
    counts = bulk_export_to_dir(
        make_client(sleeps), ["Patient", "Observation"], "2024-01-01T00:00:00Z", tmp_path, poll_sleep=polls.append
    )
    assert counts == {"Patient": 3, "Observation": 1}
    assert polls == [2, 2] and sleeps == []
    patients = [json.loads(line)["id"] for line in (tmp_path / "Patient.ndjson").read_text().splitlines()]
    assert patients == ["p1", "p2", "p3"]  # two files appended, stale content replaced
    assert (tmp_path / "Observation.ndjson").read_text() == ndjson({"resourceType": "Observation", "id": "o1"})
    assert "skipped one" in (tmp_path / "error" / "OperationOutcome.ndjson").read_text()
    downloads = download_calls(rsps)
    assert len(downloads) == 4
    assert all(c.request.headers["Authorization"] == "Bearer bulk-token" for c in downloads)
    assert all(c.request.headers["Accept"] == "application/fhir+ndjson" for c in downloads)
    assert rsps.calls[-1].request.method == "DELETE"


def test_export_iterator_without_token_on_downloads(rsps: responses.RequestsMock, caplog: pytest.LogCaptureFixture) -> None:
    serve_export(rsps, requires_token=False, file_host="https://storage.example.net")
    polls: list[float] = []
    pairs = list(bulk_export(make_client([]), ["Patient", "Observation"], "2024-01-01T00:00:00Z", poll_sleep=polls.append))
    assert [(t, r["id"]) for t, r in pairs] == [("Patient", "p1"), ("Patient", "p2"), ("Observation", "o1"), ("Patient", "p3")]
    downloads = download_calls(rsps)
    assert len(downloads) == 4
    assert all("Authorization" not in c.request.headers for c in downloads)
    assert "processing: skipped one" in caplog.text
    assert rsps.calls[-1].request.method == "DELETE"


def test_token_not_sent_to_foreign_host_even_when_required(rsps: responses.RequestsMock, tmp_path: Path) -> None:
    serve_export(rsps, requires_token=True, file_host="https://storage.example.net")
    with pytest.raises(FatalServerError, match="refusing"):
        bulk_export_to_dir(make_client([]), ["Patient", "Observation"], "2024-01-01T00:00:00Z", tmp_path, poll_sleep=lambda s: None)
    assert download_calls(rsps) == []
    assert rsps.calls[-1].request.method == "DELETE"


def test_poll_honours_http_date_and_waits_out_temporary_errors(rsps: responses.RequestsMock, tmp_path: Path) -> None:
    serve_export(
        rsps,
        polls=[
            (202, {"Retry-After": email.utils.formatdate(NOW + 5, usegmt=True)}),
            (503, {"Retry-After": "3"}),
            (429, {}),
        ],
    )
    polls: list[float] = []
    counts = bulk_export_to_dir(
        make_client([]), ["Patient", "Observation"], "2024-01-01T00:00:00Z", tmp_path, poll_sleep=polls.append
    )
    assert counts["Patient"] == 3
    assert polls == [5, 3, 4]  # Retry-After as HTTP-date, as seconds, then default backoff at the third poll


@pytest.mark.parametrize("status", [404, 405, 501])
def test_kick_off_unsupported_is_capability_error(rsps: responses.RequestsMock, status: int) -> None:
    rsps.get(f"{BASE}/$export", status=status)
    with pytest.raises(CapabilityError, match=r"server does not support \$export"):
        list(bulk_export(make_client([]), ["Patient"], None))
    assert len(rsps.calls) == 1


def test_kick_off_without_202_is_fatal(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/$export", status=200, json={})
    with pytest.raises(FatalServerError, match="expected 202"):
        list(bulk_export(make_client([]), None, None))


def test_kick_off_forbidden_is_auth_error(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/$export", status=403)
    with pytest.raises(AuthError):
        list(bulk_export(make_client([]), None, None))


def test_export_failure_reported_and_job_deleted(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/$export", status=202, headers={"Content-Location": STATUS})
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception", "diagnostics": "export crashed"}]}
    rsps.get(STATUS, status=400, json=outcome)
    rsps.delete(STATUS, status=500)  # a failing clean-up is ignored
    with pytest.raises(FatalServerError, match="export crashed"):
        list(bulk_export(make_client([]), None, None, poll_sleep=lambda s: None))
    assert rsps.calls[-1].request.method == "DELETE"


def test_polling_is_bounded_by_max_wait(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/$export", status=202, headers={"Content-Location": STATUS})
    rsps.get(STATUS, status=202, headers={"Retry-After": "40"})
    rsps.delete(STATUS, status=202)
    polls: list[float] = []
    with pytest.raises(TemporaryServerError, match="not finished"):
        list(bulk_export(make_client([]), None, None, poll_sleep=polls.append, max_wait_seconds=100))
    assert polls == [40, 40, 20]
    assert rsps.calls[-1].request.method == "DELETE"


def test_manifest_with_path_like_type_is_refused(rsps: responses.RequestsMock, tmp_path: Path) -> None:
    rsps.get(f"{BASE}/$export", status=202, headers={"Content-Location": STATUS})
    rsps.get(STATUS, json={"requiresAccessToken": True, "output": [{"type": "../../evil", "url": f"{BASE}/files/x"}]})
    rsps.delete(STATUS, status=202)
    with pytest.raises(FatalServerError, match="invalid resource type"):
        bulk_export_to_dir(make_client([]), None, None, tmp_path / "out", poll_sleep=lambda s: None)
    assert not (tmp_path / "evil.ndjson").exists()


def test_poll_errors_in_a_row_are_bounded_by_the_retry_policy_budget(rsps: responses.RequestsMock) -> None:
    """Status polling shares the client's RetryPolicy: a streak of 503s stops once its sleeping
    would pass max_total_seconds, long before max_wait_seconds."""
    rsps.get(f"{BASE}/$export", status=202, headers={"Content-Location": STATUS})
    rsps.get(STATUS, status=503, headers={"Retry-After": "50"})
    rsps.delete(STATUS, status=202)
    client = FhirClient(BASE, retry=RetryPolicy(jitter=0, max_total_seconds=60, wall_clock=lambda: NOW))
    polls: list[float] = []
    with pytest.raises(TemporaryServerError):
        list(bulk_export(client, None, None, poll_sleep=polls.append, max_wait_seconds=3600))
    assert polls == [50]
