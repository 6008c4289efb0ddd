"""What a server says about a write, read the way each real server writes it (unit level).

The shapes are taken from the FHIR spec (http.html, Bundle.entry.response) and from what HAPI
FHIR and Medplum answer; nothing here is derived from what our push sends.
"""
from __future__ import annotations

from requests.structures import CaseInsensitiveDict

from ruxo_fhir.sync.replies import (
    entry_reply,
    etag_version,
    http_reply,
    location_parts,
    same_instant,
    status_code,
)

# HAPI FHIR JPA 8 transaction-response entry (no resource by default)
HAPI_CREATED = {"response": {
    "status": "201 Created", "location": "Patient/p1/_history/1", "etag": "1",
    "lastModified": "2026-12-02T10:00:00.123+00:00",
    "outcome": {"resourceType": "OperationOutcome", "issue": [{
        "severity": "information", "code": "informational",
        "details": {"coding": [{"system": "https://hapifhir.io/fhir/CodeSystem/hapi-fhir-storage-response-code",
                                "code": "SUCCESSFUL_UPDATE_AS_CREATE"}]},
        "diagnostics": "Successfully created resource \"Patient/p1/_history/1\"."}]}}}
HAPI_NO_CHANGE = {"response": {
    "status": "200 OK", "location": "Patient/p1/_history/1", "etag": "1",
    "lastModified": "2026-12-02T10:00:00.123+00:00",
    "outcome": {"resourceType": "OperationOutcome", "issue": [{
        "severity": "information", "code": "informational",
        "details": {"coding": [{"code": "SUCCESSFUL_UPDATE_NO_CHANGE"}]}}]}}}
# Medplum router: a PUT that created answers "200", location without _history, version in resource
MEDPLUM_PUT = {"response": {"status": "200", "location": "Patient/p1",
                            "outcome": {"resourceType": "OperationOutcome", "id": "ok",
                                        "issue": [{"severity": "information", "code": "informational",
                                                   "details": {"text": "All OK"}}]}},
               "resource": {"resourceType": "Patient", "id": "p1",
                            "meta": {"versionId": "0c9e7b1e-aaaa", "lastUpdated": "2026-12-02T10:00:00.456Z"}}}
MEDPLUM_POST = {"response": {"status": "201", "location": "Patient/p2",
                             "outcome": {"resourceType": "OperationOutcome", "id": "created", "issue": [
                                 {"severity": "information", "code": "informational",
                                  "details": {"text": "Created"}}]}},
                "resource": {"resourceType": "Patient", "id": "p2",
                             "meta": {"versionId": "v9", "lastUpdated": "2026-12-02T10:00:01.000Z"}}}


def test_hapi_entry_version_from_etag_location_and_lastmodified() -> None:
    r = entry_reply(HAPI_CREATED)
    assert (r.status, r.outcome, r.resource_type, r.server_id) == (201, "created", "Patient", "p1")
    assert (r.version_id, r.last_updated) == ("1", "2026-12-02T10:00:00.123+00:00") and r.versioned
    nochange = entry_reply(HAPI_NO_CHANGE)
    assert nochange.outcome == "unchanged" and nochange.ok and nochange.version_id == "1"


def test_medplum_entry_version_only_in_resource_and_200_is_updated() -> None:
    r = entry_reply(MEDPLUM_PUT)
    assert r.status == 200 and r.outcome == "updated"  # the server said 200: not assumed "created"
    assert (r.version_id, r.last_updated) == ("0c9e7b1e-aaaa", "2026-12-02T10:00:00.456Z")
    post = entry_reply(MEDPLUM_POST)
    assert post.outcome == "created" and post.server_id == "p2" and post.version_id == "v9"


def test_entry_without_any_version_is_not_versioned() -> None:
    r = entry_reply({"response": {"status": "200", "location": "Observation/o1"}})
    assert r.ok and r.version_id is None and r.last_updated is None and not r.versioned
    # a version without lastUpdated is not enough for a later skip either
    half = entry_reply({"response": {"status": "200 OK", "etag": 'W/"4"'}})
    assert half.version_id == "4" and not half.versioned
    failed = entry_reply({"response": {"status": "412 Precondition Failed"}})
    assert not failed.ok and failed.status == 412


def test_etag_location_status_forms() -> None:
    assert [etag_version(v) for v in ('W/"3"', '"3"', "3", "", None)] == ["3", "3", "3", None, None]
    assert location_parts("http://x/fhir/Patient/a/_history/7") == ("Patient", "a", "7")
    assert location_parts("Patient/a") == ("Patient", "a", None)
    assert location_parts("Patient/a/_history/7/") == ("Patient", "a", "7")
    assert location_parts(None) == (None, None, None)
    assert [status_code(v) for v in ("201 Created", "200", 204, "", None, "abc")] == [201, 200, 204, 0, 0, 0]


def test_single_write_headers() -> None:
    headers = CaseInsensitiveDict({"ETag": 'W/"2"', "Last-Modified": "Wed, 02 Dec 2026 10:00:00 GMT",
                                   "Location": "http://x/fhir/Patient/a/_history/2"})
    r = http_reply(201, headers, None)  # Prefer: return=minimal
    assert (r.outcome, r.server_id, r.version_id) == ("created", "a", "2")
    assert r.last_updated == "2026-12-02T10:00:00Z" and r.versioned
    body = {"resourceType": "Patient", "id": "a", "meta": {"versionId": "2", "lastUpdated": "2026-12-02T10:00:00.5Z"}}
    r2 = http_reply(200, CaseInsensitiveDict({"ETag": 'W/"2"'}), body)
    assert r2.last_updated == "2026-12-02T10:00:00.5Z" and r2.outcome == "updated"


def test_same_instant() -> None:
    assert same_instant("2026-12-02T10:00:00.123Z", "2026-12-02T10:00:00.123+00:00")
    assert same_instant("2026-12-02T11:00:00.123+01:00", "2026-12-02T10:00:00.123Z")
    assert not same_instant("2026-12-02T10:00:00.123Z", "2026-12-02T10:00:00.124Z")
    assert same_instant("2026-12-02T10:00:00Z", "2026-12-02T10:00:00.999Z")  # an HTTP date: seconds
    assert not same_instant("2026-12-02T10:00:01Z", "2026-12-02T10:00:00.999Z")
    assert not same_instant(None, "2026-12-02T10:00:00Z") and not same_instant("x", "y")
