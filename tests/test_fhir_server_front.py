"""Tests of the test FHIR server itself (tests/fhir_server): every switch of the HTTP front."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
import requests
from fhirserver import FhirServerError, TestFhirServer, generate_smart_key, make_client_assertion

pytestmark = pytest.mark.e2e  # every test here starts the test FHIR server

FHIR_JSON = "application/fhir+json"
TIMEOUT = 30


def call(method: str, url: str, body: Any = None, **kw: Any) -> requests.Response:
    headers = {"Accept": FHIR_JSON, **kw.pop("headers", {})}
    if body is not None:
        headers.setdefault("Content-Type", FHIR_JSON)
        kw["data"] = json.dumps(body)
    return requests.request(method, url, headers=headers, timeout=TIMEOUT, **kw)


def patient(value: str, system: str = "http://ruxo.test/mrn", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": system, "value": value}], **extra}


def observation(subject: str, code: str = "hb") -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": {"text": code}, "subject": {"reference": subject}}


def create(server: TestFhirServer, resource: dict[str, Any]) -> dict[str, Any]:
    r = call("POST", f"{server.base_url}/{resource['resourceType']}", resource)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def batch(server: TestFhirServer, entries: list[dict[str, Any]], kind: str = "batch") -> requests.Response:
    return call("POST", server.base_url, {"resourceType": "Bundle", "type": kind, "entry": entries})


def post_entry(resource: dict[str, Any], **request: Any) -> dict[str, Any]:
    return {"resource": resource, "request": {"method": "POST", "url": resource["resourceType"], **request}}


def ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def issue_text(issue: dict[str, Any]) -> str:
    """The human text of an issue: Medplum fills `details.text`, the front's own outcomes also
    `diagnostics` (the front passes the engine's outcomes on unchanged)."""
    return str(issue.get("diagnostics") or issue.get("details", {}).get("text") or "")


def assert_outcome(r: requests.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    oo: dict[str, Any] = r.json()
    assert oo["resourceType"] == "OperationOutcome"
    for issue in oo["issue"]:
        assert issue["severity"] and issue["code"] and issue_text(issue)
    if code is not None:
        assert oo["issue"][0]["code"] == code, oo
    return oo


# ------------------------------------------------------------------------------------------------
# metadata and capabilities
# ------------------------------------------------------------------------------------------------


def test_metadata(fhir_server: TestFhirServer) -> None:
    r = call("GET", f"{fhir_server.base_url}/metadata")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith(FHIR_JSON)
    cs = r.json()
    assert cs["resourceType"] == "CapabilityStatement"
    assert cs["fhirVersion"] == "4.0.1"
    rest = cs["rest"][0]
    by_type = {res["type"]: res for res in rest["resource"]}
    assert set(by_type) == {"Patient", "Condition", "MedicationStatement", "Observation", "AdverseEvent"}
    for type_, res in by_type.items():
        codes = {i["code"] for i in res["interaction"]}
        assert {"read", "vread", "update", "create", "search-type", "history-instance"} <= codes
        assert res["conditionalCreate"] is True and res["conditionalUpdate"] is True
        names = {p["name"] for p in res["searchParam"]}
        assert {"_id", "_lastUpdated", "identifier"} <= names, type_
        if type_ != "Patient":
            assert "subject" in names
    assert "patient" in {p["name"] for p in by_type["Observation"]["searchParam"]}
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch"}
    assert rest["operation"][0]["name"] == "export"


def test_capabilities_omit_refuse_and_ignore(fhir_server: TestFhirServer) -> None:
    base = fhir_server.base_url
    omit = ["transaction", "conditionalCreate", "conditionalUpdate", "_lastUpdated", "export"]
    fhir_server.configure(fhir_version="4.0.0", capabilities_omit=omit)
    cs = call("GET", f"{base}/metadata").json()
    assert cs["fhirVersion"] == "4.0.0"
    rest = cs["rest"][0]
    assert {i["code"] for i in rest["interaction"]} == {"batch"}
    assert "operation" not in rest
    for res in rest["resource"]:
        assert res["conditionalCreate"] is False and res["conditionalUpdate"] is False
        assert "_lastUpdated" not in {p["name"] for p in res["searchParam"]}

    # refused (default omitted_behavior="refuse")
    assert_outcome(batch(fhir_server, [post_entry(patient("1"))], "transaction"), 400, "not-supported")
    hdr = {"If-None-Exist": "identifier=http://ruxo.test/mrn|1"}
    assert_outcome(call("POST", f"{base}/Patient", patient("1"), headers=hdr), 400, "not-supported")
    assert_outcome(call("PUT", f"{base}/Patient?identifier=x|1", patient("1")), 400, "not-supported")
    assert_outcome(call("GET", f"{base}/Patient?_lastUpdated=gt2020-01-01"), 400, "not-supported")
    export_headers = {"Prefer": "respond-async"}
    assert_outcome(call("GET", f"{base}/$export", headers=export_headers), 400, "not-supported")
    b = batch(fhir_server, [post_entry(patient("1"), ifNoneExist="identifier=x|1"), post_entry(patient("2"))])
    assert [e["response"]["status"] for e in b.json()["entry"]] == ["400", "201"]

    # ignored: like a server that does not know them
    fhir_server.configure(omitted_behavior="ignore")
    for _ in range(2):
        assert call("POST", f"{base}/Patient", patient("1"), headers=hdr).status_code == 201
    r = call("GET", f"{base}/Patient?_lastUpdated=gt2999-01-01")
    assert r.status_code == 200 and r.json()["total"] == 3


# ------------------------------------------------------------------------------------------------
# CRUD
# ------------------------------------------------------------------------------------------------


def test_crud_headers_versions_history(fhir_server: TestFhirServer) -> None:
    base = fhir_server.base_url
    r = call("POST", f"{base}/Patient", patient("crud", id="client-chosen", birthDate="1970-01-01"))
    assert r.status_code == 201
    p = r.json()
    pid, v1 = p["id"], p["meta"]["versionId"]
    assert pid != "client-chosen"  # a create ignores the client id
    assert p["meta"]["lastUpdated"]
    assert r.headers["ETag"] == f'W/"{v1}"'
    # as Medplum's server (packages/server/src/fhir/response.ts): Location without `_history`
    assert r.headers["Location"] == f"{base}/Patient/{pid}"
    assert r.headers["Last-Modified"].endswith("GMT")

    r = call("GET", f"{base}/Patient/{pid}")
    assert r.status_code == 200 and r.headers["ETag"] == f'W/"{v1}"' and r.json()["birthDate"] == "1970-01-01"

    p["birthDate"] = "1971-02-02"
    r = call("PUT", f"{base}/Patient/{pid}", p)
    assert r.status_code == 200
    v2 = r.json()["meta"]["versionId"]
    assert v2 != v1 and r.headers["ETag"] == f'W/"{v2}"'
    assert "Location" not in r.headers  # only a `created` outcome carries one

    # unchanged content (meta ignored) keeps the version (keep_noop_updates, default true)
    same = {**r.json(), "meta": {"versionId": "whatever"}}
    r = call("PUT", f"{base}/Patient/{pid}", same)
    assert r.status_code == 200 and r.json()["meta"]["versionId"] == v2

    assert call("GET", f"{base}/Patient/{pid}/_history/{v1}").json()["birthDate"] == "1970-01-01"
    for _ in range(2):  # stable order (Medplum's in-memory history flips on every read)
        hist = call("GET", f"{base}/Patient/{pid}/_history").json()
        assert [e["resource"]["meta"]["versionId"] for e in hist["entry"]] == [v2, v1]

    # If-Match
    r = call("PUT", f"{base}/Patient/{pid}", {**p, "gender": "male"}, headers={"If-Match": f'W/"{v1}"'})
    assert r.status_code == 412

    # update-as-create with a client id: Medplum's router answers 200 (FHIR says 201), and the
    # front passes that on
    r = call("PUT", f"{base}/Patient/my-id-1", patient("x", id="my-id-1"))
    assert r.status_code == 200 and r.json()["id"] == "my-id-1"
    assert r.headers["ETag"] == f'W/"{r.json()["meta"]["versionId"]}"' and "Location" not in r.headers

    r = call("DELETE", f"{base}/Patient/{pid}")
    assert r.status_code == 200
    assert_outcome(call("GET", f"{base}/Patient/{pid}"), 410)
    assert_outcome(call("GET", f"{base}/Patient/nope"), 404)
    assert fhir_server.counts() == {"Patient": 1}


def test_serial_versions_and_noop_switch(fhir_server: TestFhirServer) -> None:
    base = fhir_server.base_url
    fhir_server.configure(version_ids="serial", keep_noop_updates=False)
    p = create(fhir_server, patient("s"))
    assert p["meta"]["versionId"] == "1"
    r = call("PUT", f"{base}/Patient/{p['id']}", p)
    assert r.json()["meta"]["versionId"] == "2" and r.headers["ETag"] == 'W/"2"'
    assert call("GET", f"{base}/Patient/{p['id']}/_history/1").status_code == 200


def test_validation_error(fhir_server: TestFhirServer) -> None:
    bad = {"resourceType": "Patient", "birthDate": "01/02/1990", "unknownField": 1}
    oo = assert_outcome(call("POST", f"{fhir_server.base_url}/Patient", bad), 400)
    expressions = {x for issue in oo["issue"] for x in issue["expression"]}
    assert {"Patient.birthDate", "Patient.unknownField"} <= expressions
    oo = assert_outcome(call("POST", f"{fhir_server.base_url}/Observation", {"resourceType": "Observation"}), 400)
    assert {"Observation.status", "Observation.code"} <= {x for i in oo["issue"] for x in i["expression"]}
    assert_outcome(call("POST", f"{fhir_server.base_url}/Patient", {"resourceType": "Observation"}), 400)
    r = call("POST", f"{fhir_server.base_url}/Patient", data="{not json", headers={"Content-Type": FHIR_JSON})
    assert_outcome(r, 400)
    assert fhir_server.counts() == {}
    fhir_server.configure(validate=False)
    assert call("POST", f"{fhir_server.base_url}/Patient", bad).status_code == 201


def test_referential_integrity_switch(fhir_server: TestFhirServer) -> None:
    base = fhir_server.base_url
    assert call("POST", f"{base}/Observation", observation("Patient/ghost")).status_code == 201  # default off
    fhir_server.configure(referential_integrity=True)
    oo = assert_outcome(call("POST", f"{base}/Observation", observation("Patient/ghost")), 400, "not-found")
    assert oo["issue"][0]["expression"] == ["Observation.subject"]
    assert "Patient/ghost" in oo["issue"][0]["diagnostics"]

    # in a transaction the check runs at the end: entry order does not matter
    urn = f"urn:uuid:{uuid.uuid4()}"
    entries = [post_entry(observation(urn)), {"fullUrl": urn, **post_entry(patient("ri"))}]
    r = batch(fhir_server, entries, "transaction")
    assert r.status_code == 200, r.text
    pid = r.json()["entry"][1]["resource"]["id"]
    oid = r.json()["entry"][0]["resource"]["id"]
    before = fhir_server.counts()
    assert_outcome(batch(fhir_server, [post_entry(patient("x")), post_entry(observation("Patient/ghost"))], "transaction"), 400)
    assert fhir_server.counts() == before

    # a referenced resource cannot be deleted, unless its referrers go in the same transaction
    assert_outcome(call("DELETE", f"{base}/Patient/{pid}"), 409, "conflict")
    deletes = [{"request": {"method": "DELETE", "url": f"Patient/{pid}"}}, {"request": {"method": "DELETE", "url": f"Observation/{oid}"}}]
    assert batch(fhir_server, deletes, "transaction").status_code == 200
    assert fhir_server.counts() == {"Observation": 1}


# ------------------------------------------------------------------------------------------------
# search
# ------------------------------------------------------------------------------------------------


def test_paging_next_links(fhir_server: TestFhirServer) -> None:
    fhir_server.configure(page_size=25)
    r = batch(fhir_server, [post_entry(patient(f"p{i}")) for i in range(120)])
    assert r.status_code == 200
    created = {e["resource"]["id"] for e in r.json()["entry"]}
    assert len(created) == 120

    seen: list[str] = []
    url: str | None = f"{fhir_server.base_url}/Patient?_count=1000"
    pages = 0
    while url:
        page = call("GET", url).json()
        pages += 1
        assert page["type"] == "searchset" and page["total"] == 120
        assert len(page["entry"]) <= 25
        seen += ids(page)
        links = {link["relation"]: link["url"] for link in page["link"]}
        assert links["self"].startswith(fhir_server.base_url + "/Patient?")
        url = links.get("next")
    assert pages == 5 and len(seen) == 120 and set(seen) == created

    page = call("GET", f"{fhir_server.base_url}/Patient?_count=10").json()
    assert len(page["entry"]) == 10
    assert page["entry"][0]["fullUrl"] == f"{fhir_server.base_url}/Patient/{page['entry'][0]['resource']['id']}"
    last = call("GET", f"{fhir_server.base_url}/Patient?_count=10&_offset=110").json()
    assert len(last["entry"]) == 10 and "next" not in {link["relation"] for link in last["link"]}
    count_only = call("GET", f"{fhir_server.base_url}/Patient?_summary=count").json()
    assert count_only["total"] == 120 and "entry" not in count_only


def _walk(url: str | None) -> tuple[list[str], list[str]]:
    """(ids in page order, every next link) following `next` to the end."""
    seen: list[str] = []
    nexts: list[str] = []
    while url:
        page = call("GET", url).json()
        seen += ids(page)
        url = {link["relation"]: link["url"] for link in page["link"]}.get("next")
        if url:
            nexts.append(url)
    return seen, nexts


def test_paging_cached_opaque_links_and_overlap(fhir_server: TestFhirServer) -> None:
    fhir_server.configure(page_size=10, paging="cached")
    r = batch(fhir_server, [post_entry(patient(f"c{i}")) for i in range(35)])
    created = {e["resource"]["id"] for e in r.json()["entry"]}
    seen, nexts = _walk(f"{fhir_server.base_url}/Patient")
    assert len(seen) == 35 and set(seen) == created and len(nexts) == 3
    assert all(u.startswith(f"{fhir_server.base_url}?_getpages=") and "_getpagesoffset=" in u for u in nexts)
    # the set was taken at the first page: a resource created meanwhile is not in it
    first = call("GET", f"{fhir_server.base_url}/Patient").json()
    create(fhir_server, patient("late"))
    later, _ = _walk({link["relation"]: link["url"] for link in first["link"]}["next"])
    assert len(ids(first)) + len(later) == 35
    assert_outcome(call("GET", f"{fhir_server.base_url}?_getpages=nope&_getpagesoffset=10&_count=10"), 410)

    fhir_server.configure(page_overlap=3)
    seen, _ = _walk(f"{fhir_server.base_url}/Patient")
    assert len(seen) > 36 and set(seen) == created | {seen[-1]} and len(set(seen)) == 36
    fhir_server.configure(paging="offset")
    seen, nexts = _walk(f"{fhir_server.base_url}/Patient")
    assert len(seen) > 36 and len(set(seen)) == 36 and all("_offset=" in u for u in nexts)


def test_search_identifier_id_subject_elements(fhir_server: TestFhirServer) -> None:
    base = fhir_server.base_url
    a = create(fhir_server, patient("A1", birthDate="1980-01-01"))
    b = create(fhir_server, patient("B2"))
    c = create(fhir_server, patient("C3", system="http://other.test/id"))
    o = create(fhir_server, observation(f"Patient/{a['id']}"))
    create(fhir_server, observation(f"Patient/{b['id']}"))

    def found(query: str) -> set[str]:
        r = call("GET", f"{base}/{query}")
        assert r.status_code == 200, r.text
        return set(ids(r.json()))

    assert found("Patient?identifier=http://ruxo.test/mrn|A1") == {a["id"]}
    assert found("Patient?identifier=http://ruxo.test/mrn|") == {a["id"], b["id"]}
    assert found("Patient?identifier=C3") == {c["id"]}
    assert found(f"Patient?_id={a['id']},{c['id']},missing") == {a["id"], c["id"]}
    assert found(f"Observation?subject=Patient/{a['id']}") == {o["id"]}
    assert found(f"Observation?patient={a['id']}") == {o["id"]}

    r = call(
        "POST",
        f"{base}/Patient/_search",
        data={"identifier": "http://ruxo.test/mrn|B2"},
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200 and ids(r.json()) == [b["id"]]

    page = call("GET", f"{base}/Patient?_id={a['id']}&_elements=identifier").json()
    res = page["entry"][0]["resource"]
    assert "identifier" in res and "birthDate" not in res
    assert any(t["code"] == "SUBSETTED" for t in res["meta"]["tag"])

    assert_outcome(call("GET", f"{base}/Patient?nosuchparam=1"), 400)
    fhir_server.configure(strict_search=False)
    assert len(found("Patient?nosuchparam=1")) == 3


def test_last_updated_filter(fhir_server: TestFhirServer) -> None:
    first = create(fhir_server, patient("early"))
    time.sleep(0.01)
    second = create(fhir_server, patient("late"))
    cut = first["meta"]["lastUpdated"]
    r = call("GET", f"{fhir_server.base_url}/Patient", params={"_lastUpdated": f"gt{cut}"})
    assert ids(r.json()) == [second["id"]]
    r = call("GET", f"{fhir_server.base_url}/Patient", params={"_lastUpdated": f"ge{cut}"})
    assert set(ids(r.json())) == {first["id"], second["id"]}
    offset_form = cut.replace("Z", "+00:00")
    r = call("GET", f"{fhir_server.base_url}/Patient", params={"_lastUpdated": f"gt{offset_form}"})
    assert ids(r.json()) == [second["id"]]


def test_adverse_event_identifier(fhir_server: TestFhirServer) -> None:
    p = create(fhir_server, patient("ae"))
    ae = {
        "resourceType": "AdverseEvent",
        "identifier": {"system": "http://ruxo.test/ae", "value": "AE-1"},
        "actuality": "actual",
        "subject": {"reference": f"Patient/{p['id']}"},
    }
    created = create(fhir_server, ae)
    r = call("GET", f"{fhir_server.base_url}/AdverseEvent?identifier=http://ruxo.test/ae|AE-1")
    assert ids(r.json()) == [created["id"]]
    fhir_server.configure(adverse_event_identifier=False)  # plain R4: no such search parameter
    assert_outcome(call("GET", f"{fhir_server.base_url}/AdverseEvent?identifier=x|y"), 400)


# ------------------------------------------------------------------------------------------------
# transaction / batch
# ------------------------------------------------------------------------------------------------


def test_transaction_urn_conditional_and_idempotence(fhir_server: TestFhirServer) -> None:
    urn = f"urn:uuid:{uuid.uuid4()}"
    entries = [
        {
            "fullUrl": urn,
            "resource": patient("tx"),
            "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=http://ruxo.test/mrn|tx"},
        },
        {
            "resource": {**observation(urn), "identifier": [{"system": "http://ruxo.test/obs", "value": "o1"}]},
            "request": {"method": "PUT", "url": "Observation?identifier=http://ruxo.test/obs|o1"},
        },
    ]
    r = batch(fhir_server, entries, "transaction")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses == ["201", "201"]
    pid = body["entry"][0]["resource"]["id"]
    assert body["entry"][1]["resource"]["subject"]["reference"] == f"Patient/{pid}"
    # the router's entry response: `location` without `_history`, no `etag`/`lastModified`; the
    # new version is only in entry.resource.meta
    rsp = body["entry"][0]["response"]
    assert rsp["location"] == f"Patient/{pid}" and "etag" not in rsp and "lastModified" not in rsp
    assert body["entry"][0]["resource"]["meta"]["versionId"]
    assert "fullUrl" not in body["entry"][0]

    r = batch(fhir_server, json.loads(json.dumps(entries)), "transaction")
    assert [e["response"]["status"] for e in r.json()["entry"]] == ["200", "200"]
    assert fhir_server.counts() == {"Observation": 1, "Patient": 1}


def test_transaction_rolls_back(fhir_server: TestFhirServer) -> None:
    existing = create(fhir_server, patient("keep", birthDate="1990-01-01"))
    before = fhir_server.counts()

    # invalid entry: refused before anything is written, with the entry's path
    changed = {**existing, "birthDate": "2000-01-01"}
    entries = [
        post_entry(patient("new1")),
        {"resource": changed, "request": {"method": "PUT", "url": f"Patient/{existing['id']}"}},
        post_entry({"resourceType": "Patient", "birthDate": "not-a-date"}),
    ]
    oo = assert_outcome(batch(fhir_server, entries, "transaction"), 400)
    assert "Bundle.entry[2].resource.birthDate" in oo["issue"][0]["expression"]
    assert fhir_server.counts() == before

    # failure while processing (after the create was applied): If-Match mismatch -> rolled back
    entries = [
        post_entry(patient("new2")),
        {
            "resource": changed,
            "request": {"method": "PUT", "url": f"Patient/{existing['id']}", "ifMatch": 'W/"wrong"'},
        },
    ]
    r = batch(fhir_server, entries, "transaction")
    assert_outcome(r, 412)
    assert fhir_server.counts() == before
    now = call("GET", f"{fhir_server.base_url}/Patient/{existing['id']}").json()
    assert now["birthDate"] == "1990-01-01" and now["meta"] == existing["meta"]
    r = call("GET", f"{fhir_server.base_url}/Patient?identifier=http://ruxo.test/mrn|new2")
    assert r.json()["total"] == 0
    assert fhir_server.stats()["entries_written"] == 1


def test_batch_partial_failure(fhir_server: TestFhirServer) -> None:
    entries = [
        post_entry(patient("ok")),
        post_entry({"resourceType": "Patient", "gender": 5}),
        {"request": {"method": "GET", "url": "Patient/does-not-exist"}},
        {"request": {"method": "DELETE", "url": "Patient/does-not-exist"}},
    ]
    r = batch(fhir_server, entries)
    assert r.status_code == 200
    out = r.json()["entry"]
    assert out[0]["response"]["status"] == "201"
    assert out[1]["response"]["status"] == "400"
    issue = out[1]["response"]["outcome"]["issue"][0]
    assert issue["severity"] == "error" and issue["expression"] and issue_text(issue)
    assert out[2]["response"]["status"] == "404"
    assert out[3]["response"]["status"] == "404"
    assert fhir_server.counts() == {"Patient": 1}


def test_conditional_create_if_none_exist(fhir_server: TestFhirServer) -> None:
    hdr = {"If-None-Exist": "identifier=http://ruxo.test/mrn|cc"}
    first = call("POST", f"{fhir_server.base_url}/Patient", patient("cc"), headers=hdr)
    second = call("POST", f"{fhir_server.base_url}/Patient", patient("cc"), headers=hdr)
    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    assert fhir_server.counts() == {"Patient": 1}
    # conditional update: create, then update the same resource
    url = f"{fhir_server.base_url}/Patient?identifier=http://ruxo.test/mrn|cu"
    assert call("PUT", url, patient("cu")).status_code == 201
    r = call("PUT", url, patient("cu", gender="female"))
    assert r.status_code == 200 and r.json()["gender"] == "female"
    assert fhir_server.counts() == {"Patient": 2}


def test_bundle_caps_and_batch_only(fhir_server: TestFhirServer) -> None:
    fhir_server.configure(max_bundle_entries=3)
    oo = assert_outcome(batch(fhir_server, [post_entry(patient(str(i))) for i in range(4)]), 413, "too-costly")
    assert "3" in issue_text(oo["issue"][0])
    assert batch(fhir_server, [post_entry(patient(str(i))) for i in range(3)]).status_code == 200

    fhir_server.configure(batch_only=True)
    oo = assert_outcome(batch(fhir_server, [post_entry(patient("t"))], "transaction"), 400, "not-supported")
    assert "batch" in issue_text(oo["issue"][0])
    rest = call("GET", f"{fhir_server.base_url}/metadata").json()["rest"][0]
    assert [i["code"] for i in rest["interaction"]] == ["batch"]


def test_medplum_transaction_limits_switch(fhir_server: TestFhirServer) -> None:
    entries = [
        post_entry(patient(f"m{i}"), ifNoneExist=f"identifier=http://ruxo.test/mrn|m{i}") for i in range(10)
    ]
    assert batch(fhir_server, entries, "transaction").status_code == 200
    fhir_server.configure(medplum_transaction_limits=True)
    assert_outcome(batch(fhir_server, json.loads(json.dumps(entries)), "transaction"), 400)


# ------------------------------------------------------------------------------------------------
# faults
# ------------------------------------------------------------------------------------------------


def test_fault_429_with_retry_after(fhir_server: TestFhirServer) -> None:
    fhir_server.configure(faults={"429": 2}, retry_after=0)
    statuses = []
    for i in range(4):
        r = call("POST", f"{fhir_server.base_url}/Patient", patient(f"f{i}"))
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert r.headers["Retry-After"] == "0"
            assert_outcome(r, 429, "throttled")
    assert statuses == [201, 429, 201, 429]
    assert call("GET", f"{fhir_server.base_url}/Patient").status_code == 200  # reads unaffected
    fhir_server.configure(retry_after=7, faults={"429": 1})
    assert call("PUT", f"{fhir_server.base_url}/Patient/x", patient("x", id="x")).headers["Retry-After"] == "7"
    stats = fhir_server.stats()
    assert stats["faults_injected"]["429"] == 3 and stats["writes"] == 5
    assert fhir_server.counts() == {"Patient": 2}


def test_fault_order_and_503(fhir_server: TestFhirServer) -> None:
    fhir_server.configure(faults={"429": 2, "503": 3})
    statuses = [call("POST", f"{fhir_server.base_url}/Patient", patient(str(i))).status_code for i in range(6)]
    assert statuses == [201, 429, 503, 429, 201, 429]  # 6th: both match, 429 checked first
    fhir_server.configure(faults={"429": 0, "503": 1})
    r = call("DELETE", f"{fhir_server.base_url}/Patient/any")
    assert_outcome(r, 503, "transient")
    assert fhir_server.stats()["faults_injected"] == {"429": 3, "503": 2, "drop_before": 0, "drop_after": 0}


def test_fault_drop_before_does_not_apply(fhir_server: TestFhirServer) -> None:
    fhir_server.configure(faults={"drop_before": 1})
    with pytest.raises(requests.ConnectionError):
        call("POST", f"{fhir_server.base_url}/Patient", patient("lost"))
    with pytest.raises(requests.ConnectionError):
        batch(fhir_server, [post_entry(patient("lost2"))], "transaction")
    fhir_server.configure(faults={"drop_before": 0})
    assert fhir_server.counts() == {}
    assert fhir_server.stats()["faults_injected"]["drop_before"] == 2


def test_fault_drop_after_applies(fhir_server: TestFhirServer) -> None:
    fhir_server.configure(faults={"drop_after": 1})
    with pytest.raises(requests.ConnectionError):
        call("POST", f"{fhir_server.base_url}/Patient", patient("applied"))
    with pytest.raises(requests.ConnectionError):
        batch(fhir_server, [post_entry(patient("applied2")), post_entry(patient("applied3"))], "transaction")
    fhir_server.configure(faults=None)  # back to defaults (all off)
    assert fhir_server.counts() == {"Patient": 3}


def test_read_faults_and_latency(fhir_server: TestFhirServer) -> None:
    create(fhir_server, patient("r"))
    fhir_server.configure(faults_reads={"503": 2, "drop_after": 3})
    assert call("GET", f"{fhir_server.base_url}/Patient").status_code == 200
    assert call("GET", f"{fhir_server.base_url}/Patient").status_code == 503
    with pytest.raises(requests.ConnectionError):
        call("GET", f"{fhir_server.base_url}/Patient")
    assert call("GET", f"{fhir_server.base_url}/metadata").status_code == 200  # never faulted
    assert call("POST", f"{fhir_server.base_url}/Patient", patient("w")).status_code == 201
    assert fhir_server.stats()["faults_injected_reads"]["503"] == 1
    fhir_server.configure(faults_reads=None, latency_ms=300)
    t0 = time.monotonic()
    call("GET", f"{fhir_server.base_url}/Patient")
    assert time.monotonic() - t0 >= 0.3


# ------------------------------------------------------------------------------------------------
# auth
# ------------------------------------------------------------------------------------------------


def test_require_token_and_basic_auth(fhir_server: TestFhirServer) -> None:
    base = fhir_server.base_url
    fhir_server.configure(require_token="s3cret")
    r = call("GET", f"{base}/Patient")
    assert_outcome(r, 401, "login")
    assert "Bearer" in r.headers["WWW-Authenticate"]
    assert call("GET", f"{base}/metadata").status_code == 200
    assert call("GET", f"{base}/.well-known/smart-configuration").status_code == 200
    assert call("GET", f"{base}/Patient", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert call("GET", f"{base}/Patient", headers={"Authorization": "Bearer wrong"}).status_code == 401

    fhir_server.configure(require_token=None, basic_auth={"user": "u", "password": "p w"})
    assert call("POST", f"{base}/Patient", patient("b")).status_code == 401
    assert requests.get(f"{base}/Patient", auth=("u", "p w"), timeout=TIMEOUT).status_code == 200
    assert requests.get(f"{base}/Patient", auth=("u", "bad"), timeout=TIMEOUT).status_code == 401


def _token_request(server: TestFhirServer, assertion: str, **form: str) -> requests.Response:
    data = {
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
        "scope": "system/*.read",
        **form,
    }
    return requests.post(server.token_url, data=data, timeout=TIMEOUT)


def test_smart_backend_services(fhir_server: TestFhirServer) -> None:
    conf = call("GET", f"{fhir_server.base_url}/.well-known/smart-configuration").json()
    assert conf["token_endpoint"] == fhir_server.token_url
    assert conf["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert conf["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert conf["grant_types_supported"] == ["client_credentials"]
    assert conf["scopes_supported"]

    pem, jwk = generate_smart_key("k1", "RS384")
    ec_pem, ec_jwk = generate_smart_key("k2", "ES384")
    fhir_server.configure(
        require_auth=True,
        token_lifetime=1,
        smart_clients=[{"client_id": "ruxo", "jwks": {"keys": [jwk, ec_jwk]}}],
    )

    def assertion(**kw: Any) -> str:
        kw.setdefault("kid", "k1")
        return make_client_assertion(pem, client_id="ruxo", token_url=fhir_server.token_url, **kw)

    jti = uuid.uuid4().hex
    r = _token_request(fhir_server, assertion(jti=jti))
    assert r.status_code == 200, r.text
    tok = r.json()
    assert tok["token_type"] == "bearer" and tok["expires_in"] == 1 and tok["scope"] == "system/*.read"
    auth = {"Authorization": f"Bearer {tok['access_token']}"}
    assert call("GET", f"{fhir_server.base_url}/Patient", headers=auth).status_code == 200

    def rejected(resp: requests.Response, error: str = "invalid_client") -> None:
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"] == error and resp.json()["error_description"]

    rejected(_token_request(fhir_server, assertion(jti=jti)))  # replayed jti
    rejected(_token_request(fhir_server, assertion(kid="unknown-kid")))
    rejected(_token_request(fhir_server, assertion(kid=None)))
    rejected(_token_request(fhir_server, assertion(aud=fhir_server.base_url)))
    rejected(_token_request(fhir_server, assertion(lifetime=600)))  # exp > 5 min ahead
    rejected(_token_request(fhir_server, assertion(lifetime=-10)))  # expired
    rejected(_token_request(fhir_server, assertion(sub="someone-else")))
    rejected(_token_request(fhir_server, assertion(exp=None)))
    rejected(_token_request(fhir_server, assertion(jti="")))
    other_pem, _ = generate_smart_key("k1", "RS384")  # right kid, wrong key
    rejected(_token_request(fhir_server, make_client_assertion(other_pem, client_id="ruxo", token_url=fhir_server.token_url, kid="k1")))
    hs = make_client_assertion(b"x" * 32, client_id="ruxo", token_url=fhir_server.token_url, kid="k1", alg="HS256")
    rejected(_token_request(fhir_server, hs))
    rejected(_token_request(fhir_server, assertion(), grant_type="password"), "unsupported_grant_type")
    rejected(_token_request(fhir_server, assertion(), client_assertion_type="bogus"))
    rejected(_token_request(fhir_server, assertion(), scope="patient/*.read"), "invalid_scope")

    ec = make_client_assertion(ec_pem, client_id="ruxo", token_url=fhir_server.token_url, kid="k2", alg="ES384")
    assert _token_request(fhir_server, ec).status_code == 200

    time.sleep(1.2)  # token_lifetime=1
    r = call("GET", f"{fhir_server.base_url}/Patient", headers=auth)
    assert_outcome(r, 401)
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    assert fhir_server.stats()["tokens_issued"] == 2


# ------------------------------------------------------------------------------------------------
# Bulk Data $export
# ------------------------------------------------------------------------------------------------


def _poll(url: str, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.get(url, headers=headers or {}, timeout=TIMEOUT)


def test_bulk_export(fhir_server: TestFhirServer) -> None:
    base = fhir_server.base_url
    pats = [create(fhir_server, patient(f"e{i}")) for i in range(3)]
    create(fhir_server, observation(f"Patient/{pats[0]['id']}"))
    create(fhir_server, {"resourceType": "Condition", "subject": {"reference": f"Patient/{pats[0]['id']}"}})
    kick_headers = {"Accept": FHIR_JSON, "Prefer": "respond-async"}

    assert_outcome(requests.get(f"{base}/$export", headers={"Accept": FHIR_JSON}, timeout=TIMEOUT), 400)
    assert_outcome(requests.get(f"{base}/$export?_type=Nope", headers=kick_headers, timeout=TIMEOUT), 400)
    assert_outcome(requests.get(f"{base}/$export?_typeFilter=x", headers=kick_headers, timeout=TIMEOUT), 400)

    r = requests.get(f"{base}/$export?_type=Patient,Observation", headers=kick_headers, timeout=TIMEOUT)
    assert r.status_code == 202
    status_url = r.headers["Content-Location"]
    assert status_url.startswith(fhir_server.root_url + "/bulkstatus/")
    for _ in range(2):  # bulk_polls default 2
        p = _poll(status_url)
        assert p.status_code == 202 and p.headers["Retry-After"] == "1" and p.headers["X-Progress"]
    p = _poll(status_url)
    assert p.status_code == 200
    manifest = p.json()
    assert manifest["transactionTime"] and manifest["request"].endswith("$export?_type=Patient,Observation")
    assert manifest["requiresAccessToken"] is False and manifest["error"] == []
    by_type = {o["type"]: o for o in manifest["output"]}
    assert set(by_type) == {"Patient", "Observation"}
    assert by_type["Patient"]["count"] == 3
    f = requests.get(by_type["Patient"]["url"], timeout=TIMEOUT)
    assert f.status_code == 200 and f.headers["Content-Type"].startswith("application/fhir+ndjson")
    lines = [json.loads(x) for x in f.text.splitlines() if x]
    assert {x["id"] for x in lines} == {x["id"] for x in pats}

    # _since, file splitting, no polls, cancel
    later = create(fhir_server, patient("late"))
    fhir_server.configure(bulk_polls=0, bulk_max_lines=1)
    since = pats[-1]["meta"]["lastUpdated"]
    r = requests.get(f"{base}/$export", params={"_since": since}, headers=kick_headers, timeout=TIMEOUT)
    manifest = _poll(r.headers["Content-Location"]).json()
    assert sorted(o["type"] for o in manifest["output"]) == ["Condition", "Observation", "Patient", "Patient"]
    assert all(o["count"] == 1 for o in manifest["output"])
    exported = {
        json.loads(line)["id"] for o in manifest["output"] for line in requests.get(o["url"], timeout=TIMEOUT).text.splitlines()
    }
    assert later["id"] in exported and pats[-1]["id"] in exported and pats[0]["id"] not in exported
    assert requests.delete(r.headers["Content-Location"], timeout=TIMEOUT).status_code == 202
    assert _poll(r.headers["Content-Location"]).status_code == 404


def test_bulk_export_requires_token(fhir_server: TestFhirServer) -> None:
    create(fhir_server, patient("t"))
    fhir_server.configure(require_token="tok", bulk_polls=0)
    auth = {"Authorization": "Bearer tok"}
    kick_headers = {"Accept": FHIR_JSON, "Prefer": "respond-async"}
    assert requests.get(f"{fhir_server.base_url}/$export", headers=kick_headers, timeout=TIMEOUT).status_code == 401
    r = requests.get(f"{fhir_server.base_url}/$export", headers={**kick_headers, **auth}, timeout=TIMEOUT)
    assert r.status_code == 202
    assert _poll(r.headers["Content-Location"]).status_code == 401
    manifest = _poll(r.headers["Content-Location"], auth).json()
    assert manifest["requiresAccessToken"] is True
    url = manifest["output"][0]["url"]
    assert requests.get(url, timeout=TIMEOUT).status_code == 401
    assert requests.get(url, headers=auth, timeout=TIMEOUT).status_code == 200


# ------------------------------------------------------------------------------------------------
# admin
# ------------------------------------------------------------------------------------------------


def test_reset_stats_and_config(fhir_server: TestFhirServer) -> None:
    assert fhir_server.stats()["requests"] == 0
    create(fhir_server, patient("s1"))
    batch(fhir_server, [post_entry(patient("s2")), post_entry(patient("s3"))], "transaction")
    call("GET", f"{fhir_server.base_url}/Patient")
    call("GET", f"{fhir_server.base_url}/metadata")
    stats = fhir_server.stats()
    assert stats["requests"] == 4
    assert stats["by_method"] == {"POST": 2, "GET": 2}
    assert stats["writes"] == 2 and stats["entries_written"] == 3
    assert stats["faults_injected"] == {"429": 0, "503": 0, "drop_before": 0, "drop_after": 0}
    assert fhir_server.counts() == {"Patient": 3}

    cfg = fhir_server.configure(page_size=7, faults={"503": 4})
    assert cfg["page_size"] == 7 and cfg["faults"]["503"] == 4 and cfg["faults"]["429"] == 0
    with pytest.raises(FhirServerError, match="unknown config switch"):
        fhir_server.configure(no_such_switch=1)
    with pytest.raises(FhirServerError, match="page_size"):
        fhir_server.configure(page_size=0)

    fhir_server.reset()
    assert fhir_server.counts() == {}
    assert fhir_server.stats()["requests"] == 0 and fhir_server.stats()["entries_written"] == 0
    assert fhir_server.config()["page_size"] == 50 and fhir_server.config()["faults"]["503"] == 0


def test_unknown_type_and_routes(fhir_server: TestFhirServer) -> None:
    assert_outcome(call("GET", f"{fhir_server.base_url}/NotAType"), 404)
    assert_outcome(call("GET", f"{fhir_server.root_url}/elsewhere"), 404)
    assert_outcome(call("POST", fhir_server.base_url, {"resourceType": "Patient"}), 400)


def test_startup_config_survives_reset() -> None:
    with TestFhirServer(config={"page_size": 3}) as server:
        for i in range(4):
            create(server, patient(str(i)))
        page = call("GET", f"{server.base_url}/Patient").json()
        assert len(page["entry"]) == 3
        server.reset()
        assert server.config()["page_size"] == 3
    assert not server.running

