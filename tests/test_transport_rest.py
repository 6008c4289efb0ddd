"""HTTP edge cases of the REST transport: status mapping, retries, re-auth, paging, logging."""
from __future__ import annotations

import email.utils
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import requests.auth
import responses
from urllib3.exceptions import ProtocolError

from ruxo_fhir.errors import (
    AuthError,
    CapabilityError,
    FatalServerError,
    NotFound,
    OutcomeIssue,
    RuxoError,
    TemporaryServerError,
)
from ruxo_fhir.transport import (
    BearerAuth,
    FhirClient,
    RetryPolicy,
    parse_retry_after,
    raise_for_response,
    summarize_outcome,
)
from ruxo_fhir.transport.outcome import redact_url

BASE = "https://fhir.example.org/r4"
NOW = 1_700_000_000.0

OPERATION_OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [
        {
            "severity": "error",
            "code": "invalid",
            "diagnostics": "Patient.birthDate: bad date",
            "expression": ["Patient.birthDate"],
        },
        {"severity": "warning", "code": "business-rule", "details": {"text": "Duplicate suspected"}},
    ],
}


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


class Sleeper:
    """Records requested sleeps instead of sleeping."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def make_client(sleeper: Sleeper, auth: requests.auth.AuthBase | None = None, **policy: Any) -> FhirClient:
    retry = RetryPolicy(sleep=sleeper, jitter=0.0, wall_clock=lambda: NOW, **policy)
    return FhirClient(BASE, auth=auth, retry=retry)


# -- OperationOutcome summaries and status mapping -------------------------------------------


def test_summarize_outcome_lines() -> None:
    assert summarize_outcome(OPERATION_OUTCOME) == [
        "error invalid: Patient.birthDate: bad date (at Patient.birthDate)",
        "warning business-rule: Duplicate suspected",
    ]


def test_summarize_outcome_tolerates_missing_fields() -> None:
    oo = {
        "resourceType": "OperationOutcome",
        "issue": [
            {},
            {"severity": "fatal"},
            {"code": "not-found", "location": ["/f:Patient"]},
            {"severity": "error", "details": {"coding": [{"code": "MSG_X"}]}},
            {"severity": "error", "diagnostics": "line one\n   line two"},
            "not an issue",
        ],
    }
    assert summarize_outcome(oo) == [
        "issue",
        "fatal",
        "not-found (at /f:Patient)",
        "error: MSG_X",
        "error: line one line two",
    ]
    assert summarize_outcome({}) == []
    assert summarize_outcome({"issue": "nope"}) == []


TEMPORARY = [408, 429, 500, 502, 503, 504]
AUTH = [401, 403]
FATAL = [400, 405, 409, 412, 422, 501]
NOT_FOUND = [404, 410]  # NotFound, a FatalServerError (issue 10: callers that check 404/410 catch it)


@pytest.mark.parametrize(
    "status,cls",
    [(s, TemporaryServerError) for s in TEMPORARY]
    + [(s, AuthError) for s in AUTH]
    + [(s, FatalServerError) for s in FATAL]
    + [(s, NotFound) for s in NOT_FOUND],
)
def test_raise_for_response_maps_status(status: int, cls: type[Exception]) -> None:
    body = json.dumps(OPERATION_OUTCOME).encode()
    with pytest.raises(cls) as info:
        raise_for_response(status, {"Content-Type": "application/fhir+json"}, body, f"{BASE}/Patient/1", case_id="C7")
    err = info.value
    assert type(err) is cls
    assert err.status == status  # type: ignore[attr-defined]
    assert err.summaries == summarize_outcome(OPERATION_OUTCOME)  # type: ignore[attr-defined]
    assert err.case_id == "C7"  # type: ignore[attr-defined]
    assert "bad date" in str(err) and "(case C7)" in str(err)


def test_server_error_carries_structured_outcome_issues() -> None:
    body = json.dumps(OPERATION_OUTCOME).encode()
    with pytest.raises(FatalServerError) as info:
        raise_for_response(422, {}, body, f"{BASE}/Patient/1")
    first = info.value.issues[0]
    assert first == OutcomeIssue("error", "invalid", "Patient.birthDate: bad date", ("Patient.birthDate",))
    assert str(first) == first.summary == "error invalid: Patient.birthDate: bad date (at Patient.birthDate)"
    assert info.value.outcome == info.value.issues and len(info.value.issues) == 2
    assert issubclass(NotFound, FatalServerError)


@pytest.mark.parametrize("status", [200, 201, 204, 304])
def test_raise_for_response_ignores_success(status: int) -> None:
    raise_for_response(status, {}, b"", BASE)


def test_error_message_never_carries_other_bodies_or_query_values() -> None:
    with pytest.raises(FatalServerError) as info:
        raise_for_response(
            400,
            {"content-type": "text/html"},
            b"<html>secret-patient-name</html>",
            "https://user:pw@fhir.example.org/r4/Patient?name=Jane&birthdate=1970",
        )
    text = str(info.value)
    assert "secret-patient-name" not in text and "Jane" not in text and "pw" not in text
    assert info.value.issues == ()
    assert info.value.url == "https://fhir.example.org/r4/Patient?name&birthdate"


def test_retry_after_is_mentioned_for_temporary_errors() -> None:
    with pytest.raises(TemporaryServerError, match="Retry-After: 30"):
        raise_for_response(429, {"retry-after": "30"}, b"", BASE)


def test_redact_url_keeps_names_only() -> None:
    assert redact_url("http://h:8080/fhir/Patient?identifier=a|b&_count=5") == "http://h:8080/fhir/Patient?identifier&_count"


# -- Retry-After ------------------------------------------------------------------------------


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after("7", NOW) == 7
    assert parse_retry_after(" 2.5 ", NOW) == 2.5
    assert parse_retry_after("-3", NOW) == 0
    assert parse_retry_after(email.utils.formatdate(NOW + 42, usegmt=True), NOW) == 42
    assert parse_retry_after(email.utils.formatdate(NOW - 42, usegmt=True), NOW) == 0
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after(None, NOW) is None
    assert parse_retry_after("", NOW) is None


def test_retry_after_seconds_honoured(rsps: responses.RequestsMock) -> None:
    sleeper = Sleeper()
    rsps.get(f"{BASE}/Patient/1", status=503, headers={"Retry-After": "7"})
    rsps.get(f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
    client = make_client(sleeper)
    assert client.read("Patient", "1")["id"] == "1"
    assert sleeper.calls == [7]
    assert client.request_count == 2


def test_retry_after_http_date_honoured(rsps: responses.RequestsMock) -> None:
    sleeper = Sleeper()
    rsps.get(f"{BASE}/Patient/1", status=429, headers={"Retry-After": email.utils.formatdate(NOW + 30, usegmt=True)})
    rsps.get(f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
    client = make_client(sleeper)
    client.read("Patient", "1")
    assert sleeper.calls == [30]


def test_retries_are_bounded_by_attempts(rsps: responses.RequestsMock) -> None:
    sleeper = Sleeper()
    rsps.get(f"{BASE}/Patient/1", status=503)
    client = make_client(sleeper)
    with pytest.raises(TemporaryServerError) as info:
        client.read("Patient", "1")
    assert info.value.status == 503
    assert len(rsps.calls) == 6 == client.retry.max_attempts
    assert sleeper.calls == [1, 2, 4, 8, 16]
    assert sum(sleeper.calls) <= client.retry.max_total_seconds


def test_retries_are_bounded_by_total_wait(rsps: responses.RequestsMock) -> None:
    sleeper = Sleeper()
    rsps.get(f"{BASE}/Patient/1", status=503, headers={"Retry-After": "50"})
    client = make_client(sleeper, max_total_seconds=120)
    with pytest.raises(TemporaryServerError):
        client.read("Patient", "1")
    assert sleeper.calls == [50, 50]  # a third 50 s wait would pass the 120 s budget
    assert len(rsps.calls) == 3


def test_backoff_is_capped_by_remaining_budget(rsps: responses.RequestsMock) -> None:
    sleeper = Sleeper()
    rsps.get(f"{BASE}/Patient/1", status=502)
    client = make_client(sleeper, max_attempts=10, backoff_base=10, backoff_cap=1000, max_total_seconds=45)
    with pytest.raises(TemporaryServerError):
        client.read("Patient", "1")
    assert sleeper.calls == [10, 20, 15]
    assert sum(sleeper.calls) == 45


def test_retry_after_beyond_budget_gives_up_at_once(rsps: responses.RequestsMock) -> None:
    sleeper = Sleeper()
    rsps.get(f"{BASE}/Patient/1", status=503, headers={"Retry-After": "3600"})
    client = make_client(sleeper)
    with pytest.raises(TemporaryServerError, match="Retry-After: 3600"):
        client.read("Patient", "1")
    assert sleeper.calls == []
    assert len(rsps.calls) == 1


def test_jitter_only_shortens_the_backoff() -> None:
    policy = RetryPolicy(jitter=0.5, rng=lambda: 1.0)
    assert policy.backoff(3) == 2.0
    assert RetryPolicy(jitter=0.5, rng=lambda: 0.0).backoff(3) == 4.0
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


# -- idempotency ------------------------------------------------------------------------------


def test_post_not_retried_unless_idempotent(rsps: responses.RequestsMock) -> None:
    sleeper = Sleeper()
    rsps.post(BASE, status=503)
    client = make_client(sleeper)
    with pytest.raises(TemporaryServerError):
        client.post_bundle({"resourceType": "Bundle", "type": "transaction"}, idempotent=False)
    assert len(rsps.calls) == 1 and sleeper.calls == []


def test_idempotent_post_is_retried(rsps: responses.RequestsMock) -> None:
    sleeper = Sleeper()
    rsps.post(BASE, status=503)
    rsps.post(BASE, json={"resourceType": "Bundle", "type": "transaction-response"})
    client = make_client(sleeper)
    answer = client.post_bundle({"resourceType": "Bundle", "type": "transaction"}, idempotent=True)
    assert answer["type"] == "transaction-response"
    assert len(rsps.calls) == 2 and sleeper.calls == [1]


def test_post_connection_error_raises_temporary_at_once(rsps: responses.RequestsMock) -> None:
    sleeper = Sleeper()
    rsps.post(f"{BASE}/Patient", body=requests.exceptions.ConnectionError("connection reset by peer"))
    client = make_client(sleeper)
    with pytest.raises(TemporaryServerError, match="ConnectionError during POST"):
        client.create("Patient", {"resourceType": "Patient"})
    assert len(rsps.calls) == 1 and sleeper.calls == []


def test_post_is_retried_when_never_connected(rsps: responses.RequestsMock) -> None:
    sleeper = Sleeper()
    rsps.post(f"{BASE}/Patient", body=requests.exceptions.ConnectTimeout("connect timed out"))
    rsps.post(f"{BASE}/Patient", json={"resourceType": "Patient", "id": "p1"}, status=201)
    client = make_client(sleeper)
    assert client.create("Patient", {"resourceType": "Patient"})["id"] == "p1"
    assert len(rsps.calls) == 2


@pytest.mark.parametrize(
    "exc",
    [
        requests.exceptions.ConnectionError("reset"),
        requests.exceptions.ChunkedEncodingError("truncated"),
        requests.exceptions.ReadTimeout("slow"),
    ],
)
def test_get_connection_error_is_retried(rsps: responses.RequestsMock, exc: Exception) -> None:
    sleeper = Sleeper()
    rsps.get(f"{BASE}/Patient/1", body=exc)
    rsps.get(f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
    client = make_client(sleeper)
    assert client.read("Patient", "1")["id"] == "1"
    assert sleeper.calls == [1]


def test_get_connection_errors_exhaust_retries(rsps: responses.RequestsMock) -> None:
    sleeper = Sleeper()
    rsps.get(f"{BASE}/Patient/1", body=requests.exceptions.ConnectionError("reset"))
    client = make_client(sleeper, max_attempts=3)
    with pytest.raises(TemporaryServerError) as info:
        client.read("Patient", "1")
    assert isinstance(info.value.__cause__, requests.exceptions.ConnectionError)
    assert len(rsps.calls) == 3


def test_ssl_error_is_fatal_not_retried(rsps: responses.RequestsMock) -> None:
    sleeper = Sleeper()
    rsps.get(f"{BASE}/metadata", body=requests.exceptions.SSLError("certificate verify failed"))
    client = make_client(sleeper)
    with pytest.raises(FatalServerError, match="TLS"):
        client.capabilities()
    assert len(rsps.calls) == 1


def test_conditional_create_sends_header_and_is_retried(rsps: responses.RequestsMock) -> None:
    sleeper = Sleeper()
    rsps.post(f"{BASE}/Patient", status=500)
    rsps.post(f"{BASE}/Patient", json={"resourceType": "Patient", "id": "p1"}, status=200)
    client = make_client(sleeper)
    client.create("Patient", {"resourceType": "Patient"}, if_none_exist="identifier=urn:x|1")
    assert len(rsps.calls) == 2
    assert rsps.calls[1].request.headers["If-None-Exist"] == "identifier=urn:x|1"


@pytest.mark.parametrize("status,cls", [(404, FatalServerError), (410, FatalServerError), (403, AuthError), (422, FatalServerError)])
def test_client_raises_mapped_errors_without_retry(rsps: responses.RequestsMock, status: int, cls: type[Exception]) -> None:
    sleeper = Sleeper()
    rsps.get(f"{BASE}/Patient/1", status=status, json=OPERATION_OUTCOME)
    client = make_client(sleeper)
    with pytest.raises(cls) as info:
        client.read("Patient", "1")
    assert info.value.summaries[0].startswith("error invalid")  # type: ignore[attr-defined]
    assert len(rsps.calls) == 1


def test_check_false_returns_error_answers(rsps: responses.RequestsMock) -> None:
    rsps.delete(f"{BASE}/Patient/1", status=404)
    resp = make_client(Sleeper()).request("DELETE", "Patient/1", check=False)
    assert resp.status == 404


# -- re-authentication on 401 -----------------------------------------------------------------


class RefreshingAuth(requests.auth.AuthBase):
    def __init__(self) -> None:
        self.token = "old-token"
        self.refreshes = 0

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self.token}"
        return r

    def refresh(self) -> None:
        self.refreshes += 1
        self.token = "new-token"


def test_401_triggers_one_refresh_then_succeeds(rsps: responses.RequestsMock) -> None:
    def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        if request.headers["Authorization"] == "Bearer new-token":
            return 201, {}, json.dumps({"resourceType": "Patient", "id": "p"})
        return 401, {}, ""

    rsps.add_callback(responses.POST, f"{BASE}/Patient", callback=answer)
    auth = RefreshingAuth()
    sleeper = Sleeper()
    client = make_client(sleeper, auth=auth, max_attempts=1)  # re-auth is not a retry
    assert client.create("Patient", {"resourceType": "Patient"})["id"] == "p"
    assert auth.refreshes == 1
    assert client.request_count == 2 and sleeper.calls == []


def test_second_401_is_auth_error(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/Patient/1", status=401)
    auth = RefreshingAuth()
    client = make_client(Sleeper(), auth=auth)
    with pytest.raises(AuthError) as info:
        client.read("Patient", "1")
    assert info.value.status == 401
    assert auth.refreshes == 1 and len(rsps.calls) == 2


def test_401_without_refreshable_auth_is_auth_error(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/Patient/1", status=401)
    client = make_client(Sleeper(), auth=BearerAuth("static-secret"))
    with pytest.raises(AuthError) as info:
        client.read("Patient", "1")
    assert "static-secret" not in str(info.value)
    assert len(rsps.calls) == 1


def test_credentials_never_sent_to_another_origin(rsps: responses.RequestsMock) -> None:
    client = make_client(Sleeper(), auth=BearerAuth("t"))
    with pytest.raises(FatalServerError, match="refusing"):
        client.request("GET", "https://evil.example.com/r4/Patient")
    with pytest.raises(FatalServerError, match="refusing"):
        client.request("GET", "http://fhir.example.org/r4/Patient")  # https → http downgrade
    assert len(rsps.calls) == 0


# -- paging -------------------------------------------------------------------------------------


def page(ids: list[str], next_url: str | None) -> dict[str, Any]:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": {"resourceType": "Patient", "id": i}, "search": {"mode": "match"}} for i in ids],
        "link": [{"relation": "self", "url": "ignored"}],
    }
    if next_url:
        bundle["link"].append({"relation": "next", "url": next_url})
    return bundle


def test_search_follows_next_links_across_three_pages(rsps: responses.RequestsMock) -> None:
    rsps.get(
        f"{BASE}/Patient",
        json=page(["a", "b"], f"{BASE}?_getpages=xyz&_getpagesoffset=2"),
        match=[responses.matchers.query_param_matcher({"name": "Smith", "_count": "2"})],
    )
    rsps.get(
        BASE,
        json=page(["c", "d"], f"{BASE}?_getpages=xyz&_getpagesoffset=4"),
        match=[responses.matchers.query_param_matcher({"_getpages": "xyz", "_getpagesoffset": "2"})],
    )
    rsps.get(
        BASE,
        json=page(["e"], None),
        match=[responses.matchers.query_param_matcher({"_getpages": "xyz", "_getpagesoffset": "4"})],
    )
    client = make_client(Sleeper())
    ids = [r["id"] for r in client.search("Patient", {"name": "Smith", "_count": 2})]
    assert ids == ["a", "b", "c", "d", "e"]
    assert client.request_count == 3


def test_search_bundles_yields_raw_pages(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/Observation", json=page(["a"], f"{BASE}/Observation?page=2"))
    rsps.get(f"{BASE}/Observation", json=page(["b"], None), match=[responses.matchers.query_param_matcher({"page": "2"})])
    pages = list(make_client(Sleeper()).search_bundles("Observation", {"code": "x"}))
    assert [p["resourceType"] for p in pages] == ["Bundle", "Bundle"]


def test_search_refuses_next_link_to_foreign_host(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/Patient", json=page(["a"], "https://evil.example.com/steal?_getpages=1"))
    client = make_client(Sleeper(), auth=BearerAuth("secret"))
    found = []
    with pytest.raises(FatalServerError, match=r"evil\.example\.com"):
        for resource in client.search("Patient", {"name": "x"}):
            found.append(resource["id"])
    assert found == ["a"]
    assert len(rsps.calls) == 1


def test_search_detects_paging_loop(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/Patient", json=page(["a"], f"{BASE}/Patient?p=1"))
    with pytest.raises(FatalServerError, match="loop"):
        list(make_client(Sleeper()).search("Patient", {"p": "1"}))


def test_search_overlapping_pages_yield_each_resource_once(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/Patient", json=page(["a", "b", "c"], f"{BASE}?_getpages=q&_getpagesoffset=2"))
    rsps.get(BASE, json=page(["c", "d", "a"], None),
             match=[responses.matchers.query_param_matcher({"_getpages": "q", "_getpagesoffset": "2"})])
    assert [r["id"] for r in make_client(Sleeper()).search("Patient", {})] == ["a", "b", "c", "d"]


def test_search_page_limit(rsps: responses.RequestsMock) -> None:
    for n in range(5):
        rsps.get(f"{BASE}/Patient", json=page([f"p{n}"], f"{BASE}/Patient?page={n + 1}"),
                 match=[responses.matchers.query_param_matcher({"page": str(n)})])
    client = make_client(Sleeper())
    found = []
    with pytest.raises(FatalServerError, match="after 3 pages") as err:
        for resource in client.search("Patient", {"page": "0"}, max_pages=3):
            found.append(resource["id"])
    assert found == ["p0", "p1", "p2"] and client.request_count == 3
    assert "--max-pages" in str(err.value) and "page=" not in str(err.value)  # no query values


def test_search_skips_outcome_entries(rsps: responses.RequestsMock) -> None:
    bundle = page(["a"], None)
    bundle["entry"].append({"resource": OPERATION_OUTCOME, "search": {"mode": "outcome"}})
    bundle["entry"].append({"resource": {"resourceType": "Organization", "id": "o"}, "search": {"mode": "include"}})
    rsps.get(f"{BASE}/Patient", json=bundle)
    assert [r["id"] for r in make_client(Sleeper()).search("Patient", {})] == ["a", "o"]


# -- helpers, headers, TLS settings, logging -----------------------------------------------------


def test_capabilities_cached_and_version(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1"})
    client = make_client(Sleeper())
    assert client.fhir_version() == "4.0.1"
    assert client.capabilities()["fhirVersion"] == "4.0.1"
    assert client.request_count == 1


def test_capabilities_rejects_non_capability_statement(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/metadata", json={"resourceType": "Conformance"})
    with pytest.raises(CapabilityError):
        make_client(Sleeper()).capabilities()


def test_put_sends_fhir_json_headers(rsps: responses.RequestsMock) -> None:
    rsps.put(f"{BASE}/Patient/p-1", json={"resourceType": "Patient", "id": "p-1", "meta": {"versionId": "2"}})
    client = make_client(Sleeper())
    answer = client.put("Patient", "p-1", {"resourceType": "Patient", "id": "p-1"})
    assert answer["meta"]["versionId"] == "2"
    sent = rsps.calls[0].request
    assert sent.headers["Accept"] == "application/fhir+json"
    assert sent.headers["Content-Type"] == "application/fhir+json"
    assert sent.headers["User-Agent"].startswith("ruxo-fhir")
    assert json.loads(sent.body) == {"resourceType": "Patient", "id": "p-1"}  # type: ignore[arg-type]


def test_empty_body_gives_empty_dict_and_bad_json_is_fatal(rsps: responses.RequestsMock) -> None:
    rsps.put(f"{BASE}/Patient/p-1", status=200, body=b"")
    rsps.get(f"{BASE}/Patient/p-1", status=200, body=b"<html>")
    client = make_client(Sleeper())
    assert client.put("Patient", "p-1", {"resourceType": "Patient"}) == {}
    with pytest.raises(FatalServerError, match="not valid JSON"):
        client.read("Patient", "p-1")
    with pytest.raises(ValueError):  # callers may also catch it as a ValueError
        client.request("GET", "Patient/p-1").json()


def test_headers_are_case_insensitive(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/Patient/1", json={}, headers={"ETag": 'W/"3"'})
    resp = make_client(Sleeper()).request("GET", "Patient/1")
    assert resp.headers["etag"] == 'W/"3"'


def test_tls_verification_settings_are_passed(rsps: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/env-bundle.pem")
    rsps.get(f"{BASE}/Patient/1", json={})
    FhirClient(BASE).request("GET", "Patient/1")
    FhirClient(BASE, verify="/etc/ssl/site-ca.pem").request("GET", "Patient/1")
    FhirClient(BASE, verify=False).request("GET", "Patient/1")
    verify = [call.request.req_kwargs["verify"] for call in rsps.calls]  # type: ignore[attr-defined]
    # verify=True still honours the environment's CA bundle; explicit choices win over it.
    assert verify == ["/etc/ssl/env-bundle.pem", "/etc/ssl/site-ca.pem", False]


def test_bad_base_url_is_a_ruxo_error() -> None:
    with pytest.raises(RuxoError):
        FhirClient("ftp://fhir.example.org")
    with pytest.raises(RuxoError):
        FhirClient("fhir.example.org/r4")


def test_logs_param_names_but_no_values_tokens_or_bodies(
    rsps: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ruxo_fhir.transport")
    rsps.get(f"{BASE}/Patient", status=503)
    rsps.get(f"{BASE}/Patient", json=page(["jane-doe-id"], None))
    client = make_client(Sleeper(), auth=BearerAuth("super-secret-token"))
    list(client.search("Patient", {"name": "JaneDoe", "birthdate": "1970-01-01"}))
    text = caplog.text
    assert "/r4/Patient?name&birthdate" in text and "200" in text and "503" in text
    for secret in ("JaneDoe", "1970-01-01", "super-secret-token", "jane-doe-id", "Bearer"):
        assert secret not in text


# -- streaming ------------------------------------------------------------------------------------


class BreakingReader(io.RawIOBase):
    """A response body that breaks (like a reset connection) after ``limit`` bytes."""

    def __init__(self, data: bytes, limit: int) -> None:
        self.data, self.limit, self.pos = data, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.pos >= self.limit:
            raise ProtocolError("Connection broken: reset")
        chunk = self.data[self.pos : min(self.limit, self.pos + 5)]
        buffer[: len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def test_iter_lines_streams_and_resumes_after_a_break(rsps: responses.RequestsMock) -> None:
    data = b'{"id":"1"}\n{"id":"2"}\r\n\n{"id":"3"}\n{"id":"4"}'
    rsps.get(f"{BASE}/file.ndjson", body=io.BufferedReader(BreakingReader(data, 15)))
    rsps.get(f"{BASE}/file.ndjson", body=data)
    sleeper = Sleeper()
    client = make_client(sleeper)
    lines = list(client.iter_lines("file.ndjson"))
    assert lines == [b'{"id":"1"}', b'{"id":"2"}', b'{"id":"3"}', b'{"id":"4"}']
    assert len(rsps.calls) == 2 and sleeper.calls == [1]
