"""Push's reads before writing (sync/searches.py): many searches as one FHIR `batch` of GET
entries where the server declares batch, plain GETs otherwise; a refused batch read falls back
to plain searches, a full page in a batch entry is followed by its next link."""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import responses

from ruxo_fhir.errors import AuthError, FatalServerError
from ruxo_fhir.sync.searches import Searcher
from ruxo_fhir.transport.rest import FhirClient, RetryPolicy

BASE = "https://fhir.example.org/r4"


def searchset(ids: list[str], kind: str = "Patient", next_url: str | None = None,
              total: int | None = None) -> dict[str, Any]:
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset",
                              "entry": [{"resource": {"resourceType": kind, "id": i}} for i in ids]}
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    if total is not None:
        bundle["total"] = total
    return bundle


def batch_response(*entries: tuple[str, dict[str, Any] | None]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "batch-response", "entry": [
        {"response": {"status": status}, **({"resource": body} if body is not None else {})}
        for status, body in entries]}


NOT_SUPPORTED = {"resourceType": "OperationOutcome", "issue": [
    {"severity": "error", "code": "not-supported", "diagnostics": "GET is not allowed in a batch"}]}


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def client() -> Iterator[FhirClient]:
    with FhirClient(BASE, retry=RetryPolicy(max_attempts=1)) as c:
        yield c


def ids(found: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in found]


def methods(rsps: responses.RequestsMock) -> list[str]:
    return [str(c.request.method) for c in rsps.calls]


SEARCHES = [("Patient", {"_id": "a,b"}), ("Condition", {"_id": "c"})]


def test_searches_go_as_one_batch_request_of_get_entries(rsps: responses.RequestsMock, client: FhirClient) -> None:
    rsps.post(BASE, json=batch_response(("200 OK", searchset(["a", "b"])),
                                        ("200 OK", searchset(["c"], "Condition"))))
    found = Searcher(client, batch=True, workers=4).resources(SEARCHES)
    assert [ids(f) for f in found] == [["a", "b"], ["c"]]
    assert methods(rsps) == ["POST"]
    sent = json.loads(rsps.calls[0].request.body)
    assert sent["type"] == "batch"
    for entry, (kind, params) in zip(sent["entry"], SEARCHES):
        url = urlsplit(entry["request"]["url"])
        assert entry["request"]["method"] == "GET" and url.path == kind
        assert {k: v[0] for k, v in parse_qs(url.query).items()} == params


def test_refused_batch_read_falls_back_to_plain_searches_once_and_quietly(
        rsps: responses.RequestsMock, client: FhirClient, caplog: pytest.LogCaptureFixture) -> None:
    rsps.post(BASE, status=400, json=NOT_SUPPORTED)
    rsps.get(f"{BASE}/Patient", json=searchset(["a", "b"]))
    rsps.get(f"{BASE}/Condition", json=searchset(["c"], "Condition"))
    searcher = Searcher(client, batch=True)
    with caplog.at_level(logging.INFO, logger="ruxo_fhir.sync"):
        assert [ids(f) for f in searcher.resources(SEARCHES)] == [["a", "b"], ["c"]]
        assert [ids(f) for f in searcher.resources(SEARCHES)] == [["a", "b"], ["c"]]
    assert methods(rsps) == ["POST", "GET", "GET", "GET", "GET"]  # the batch is not tried again
    said = [r for r in caplog.records if r.name == "ruxo_fhir.sync"]
    assert len(said) == 1 and said[0].levelno == logging.INFO  # -v only, and once


@pytest.mark.parametrize("reply", [
    batch_response(("200 OK", searchset(["a", "b"]))),  # one entry for two searches
    {"resourceType": "OperationOutcome", "issue": []},  # not a Bundle
    batch_response(("200 OK", None), ("200 OK", None)),  # entries without their searchset
])
def test_a_batch_reply_that_does_not_answer_each_search_falls_back(
        rsps: responses.RequestsMock, client: FhirClient, reply: dict[str, Any]) -> None:
    rsps.post(BASE, json=reply)
    rsps.get(f"{BASE}/Patient", json=searchset(["a", "b"]))
    rsps.get(f"{BASE}/Condition", json=searchset(["c"], "Condition"))
    searcher = Searcher(client, batch=True)
    assert [ids(f) for f in searcher.resources(SEARCHES)] == [["a", "b"], ["c"]]
    assert searcher.batch is False


def test_an_entry_refused_is_searched_plainly_and_batch_reads_stop(
        rsps: responses.RequestsMock, client: FhirClient) -> None:
    rsps.post(BASE, json={"resourceType": "Bundle", "type": "batch-response", "entry": [
        {"response": {"status": "200 OK"}, "resource": searchset(["a", "b"])},
        {"response": {"status": "400 Bad Request", "outcome": NOT_SUPPORTED}}]})
    rsps.get(f"{BASE}/Condition", json=searchset(["c"], "Condition"))
    searcher = Searcher(client, batch=True)
    assert [ids(f) for f in searcher.resources(SEARCHES)] == [["a", "b"], ["c"]]
    assert methods(rsps) == ["POST", "GET"] and searcher.batch is False


def test_a_temporary_entry_status_is_retried_as_a_plain_get_and_batch_reads_go_on(
        rsps: responses.RequestsMock, client: FhirClient) -> None:
    rsps.post(BASE, json=batch_response(("200 OK", searchset(["a", "b"])), ("503", None)))
    rsps.get(f"{BASE}/Condition", json=searchset(["c"], "Condition"))
    searcher = Searcher(client, batch=True)
    assert [ids(f) for f in searcher.resources(SEARCHES)] == [["a", "b"], ["c"]]
    assert methods(rsps) == ["POST", "GET"] and searcher.batch is True


def test_a_full_page_in_a_batch_entry_is_followed_by_its_next_link(
        rsps: responses.RequestsMock, client: FhirClient) -> None:
    rsps.post(BASE, json=batch_response(
        ("200 OK", searchset(["a", "b"], next_url=f"{BASE}?_getpages=x&_getpagesoffset=2")),
        ("200 OK", searchset(["c"], "Condition"))))
    rsps.get(BASE, json=searchset(["b", "z"]),  # overlapping pages: each resource once
             match=[responses.matchers.query_param_matcher({"_getpages": "x", "_getpagesoffset": "2"})])
    found = Searcher(client, batch=True).resources(SEARCHES)
    assert [ids(f) for f in found] == [["a", "b", "z"], ["c"]]
    assert methods(rsps) == ["POST", "GET"]


def test_a_next_link_off_the_server_origin_is_refused(rsps: responses.RequestsMock, client: FhirClient) -> None:
    rsps.post(BASE, json=batch_response(("200 OK", searchset(["a"], next_url="https://elsewhere.example/p2")),
                                        ("200 OK", searchset(["c"], "Condition"))))
    with pytest.raises(FatalServerError, match=r"elsewhere\.example"):
        Searcher(client, batch=True).resources(SEARCHES)
    assert methods(rsps) == ["POST"]


def test_a_batch_read_refused_for_credentials_is_an_auth_error_not_a_fallback(
        rsps: responses.RequestsMock, client: FhirClient) -> None:
    rsps.post(BASE, status=403, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "forbidden", "diagnostics": "no"}]})
    with pytest.raises(AuthError):
        Searcher(client, batch=True).resources(SEARCHES)
    assert methods(rsps) == ["POST"]


def test_without_batch_the_searches_go_side_by_side_in_order(rsps: responses.RequestsMock) -> None:
    """Up to `workers` plain GETs at once (each waits until four are in the server), answers
    in the order asked."""
    arrived = threading.Barrier(4, timeout=10)

    def answer(request: Any) -> tuple[int, dict[str, str], str]:
        arrived.wait()
        rid = parse_qs(urlsplit(request.url).query)["_id"][0]
        return 200, {"Content-Type": "application/fhir+json"}, json.dumps(searchset([rid]))

    rsps.add_callback(responses.GET, f"{BASE}/Patient", callback=answer)
    searches = [("Patient", {"_id": f"p{i}"}) for i in range(8)]
    with FhirClient(BASE, retry=RetryPolicy(max_attempts=1)) as client:
        found = Searcher(client, workers=4).resources(searches)
    assert [ids(f) for f in found] == [[f"p{i}"] for i in range(8)]


def test_cohort_counts_in_one_batch_request(rsps: responses.RequestsMock, client: FhirClient) -> None:
    from ruxo_fhir.mapping.spec import load_mapping
    from ruxo_fhir.sync.prune import cohort_counts

    rsps.post(BASE, json=batch_response(("200 OK", searchset([], "Condition", total=3)),
                                        ("200 OK", searchset([], "AdverseEvent", total=1))))
    counts = cohort_counts(client, load_mapping(), ["Condition", "AdverseEvent"], Searcher(client, batch=True))
    assert counts == {"Condition": 3, "AdverseEvent": 1} and methods(rsps) == ["POST"]


def test_cohort_counts_without_a_total_in_a_batch_entry_is_no_count(
        rsps: responses.RequestsMock, client: FhirClient) -> None:
    from ruxo_fhir.mapping.spec import load_mapping
    from ruxo_fhir.sync.prune import cohort_counts

    rsps.post(BASE, json=batch_response(("200 OK", searchset([], "Condition")),
                                        ("200 OK", searchset([], "AdverseEvent", total=1))))
    assert cohort_counts(client, load_mapping(), ["Condition", "AdverseEvent"], Searcher(client, batch=True)) is None


def test_cohort_counts_of_whole_types_name_no_identifier(rsps: responses.RequestsMock, client: FhirClient) -> None:
    from ruxo_fhir.mapping.spec import load_mapping
    from ruxo_fhir.sync.prune import cohort_counts

    rsps.post(BASE, json=batch_response(("200 OK", searchset([], "Condition", total=5)),
                                        ("200 OK", searchset([], "Observation", total=7))))
    counts = cohort_counts(client, load_mapping(), ["Condition", "Observation"], Searcher(client, batch=True),
                           whole=True)
    assert counts == {"Condition": 5, "Observation": 7}
    sent = json.loads(rsps.calls[0].request.body)
    assert [e["request"]["url"] for e in sent["entry"]] == ["Condition?_summary=count", "Observation?_summary=count"]


# -- resources wanted by id: reads in the batch (FHIR http.html#read: 404 unknown, 410 deleted) --

def resource(kind: str, rid: str) -> dict[str, Any]:
    return {"resourceType": kind, "id": rid, "meta": {"versionId": "1", "lastUpdated": "2026-01-01T00:00:00Z"}}


GONE = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "deleted"}]}
UNKNOWN = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]}


def test_ids_go_as_read_entries_in_the_searches_batch(rsps: responses.RequestsMock, client: FhirClient) -> None:
    """One request: the search entries first, then one `GET Type/id` per id; an entry answering
    404 (unknown) or 410 (deleted) means the server holds no copy, which is an answer, not a
    refusal: batch reads go on."""
    rsps.post(BASE, json=batch_response(("200 OK", searchset(["x"])),
                                        ("200 OK", resource("Patient", "a")),
                                        ("404 Not Found", UNKNOWN),
                                        ("410 Gone", GONE)))
    searcher = Searcher(client, batch=True)
    answers, found = searcher.find([("Patient", {"identifier": "s|1"})], {"Patient": ["a", "b"], "Condition": ["c"]})
    assert [ids(a) for a in answers] == [["x"]] and ids(found) == ["a"]
    assert methods(rsps) == ["POST"] and searcher.batch is True
    sent = json.loads(rsps.calls[0].request.body)
    assert [e["request"] for e in sent["entry"][1:]] == [
        {"method": "GET", "url": "Patient/a"}, {"method": "GET", "url": "Patient/b"},
        {"method": "GET", "url": "Condition/c"}]


def test_without_batch_ids_go_as_id_searches_not_one_read_each(rsps: responses.RequestsMock,
                                                               client: FhirClient) -> None:
    rsps.get(f"{BASE}/Patient", json=searchset(["a"]))
    answers, found = Searcher(client).find([], {"Patient": [f"p{i}" for i in range(60)]})
    assert answers == [] and ids(found) == ["a", "a"]  # two `_id` searches (50 + 10), each answering a
    queries = [parse_qs(urlsplit(c.request.url).query) for c in rsps.calls]
    assert [len(q["_id"][0].split(",")) for q in queries] == [50, 10]


def test_a_refused_read_entry_is_asked_by_id_search_and_batch_reads_stop(
        rsps: responses.RequestsMock, client: FhirClient, caplog: pytest.LogCaptureFixture) -> None:
    rsps.post(BASE, json=batch_response(("200 OK", resource("Patient", "a")), ("400 Bad Request", NOT_SUPPORTED)))
    rsps.get(f"{BASE}/Patient", json=searchset(["b"]))
    searcher = Searcher(client, batch=True)
    with caplog.at_level(logging.INFO, logger="ruxo_fhir.sync"):
        _, found = searcher.find([], {"Patient": ["a", "b"]})
    assert sorted(ids(found)) == ["a", "b"] and methods(rsps) == ["POST", "GET"] and searcher.batch is False
    assert parse_qs(urlsplit(rsps.calls[1].request.url).query)["_id"] == ["b"]
    assert "plain searches from now on" in caplog.text


@pytest.mark.parametrize("entry", [("503", None), ("200 OK", resource("Condition", "a"))],
                         ids=["temporary", "another-type"])
def test_a_read_entry_without_its_resource_is_asked_again_by_id_search(
        rsps: responses.RequestsMock, client: FhirClient, entry: tuple[str, Any]) -> None:
    """A temporary status is asked again plainly with batch reads kept; a 200 carrying some other
    resource is not the answer to the read (and stops batch reads)."""
    rsps.post(BASE, json=batch_response(entry))
    rsps.get(f"{BASE}/Patient", json=searchset(["a"]))
    searcher = Searcher(client, batch=True)
    _, found = searcher.find([], {"Patient": ["a"]})
    assert ids(found) == ["a"] and methods(rsps) == ["POST", "GET"]
    assert searcher.batch is (entry[0] == "503")


def test_types_the_statement_does_not_let_us_read_go_as_id_searches(rsps: responses.RequestsMock,
                                                                    client: FhirClient) -> None:
    rsps.post(BASE, json=batch_response(("200 OK", resource("Patient", "a"))))
    rsps.get(f"{BASE}/Condition", json=searchset(["c"], "Condition"))
    searcher = Searcher(client, batch=True, readable=lambda kind: kind != "Condition")
    _, found = searcher.find([], {"Patient": ["a"], "Condition": ["c"]})
    assert sorted(ids(found)) == ["a", "c"] and methods(rsps) == ["POST", "GET"]
    sent = json.loads(rsps.calls[0].request.body)
    assert [e["request"]["url"] for e in sent["entry"]] == ["Patient/a"]


def test_ids_are_escaped_in_read_urls(rsps: responses.RequestsMock, client: FhirClient) -> None:
    """An id from the data is a path segment: nothing in it may reach another path or query."""
    rsps.post(BASE, json=batch_response(("404", UNKNOWN)))
    Searcher(client, batch=True).find([], {"Patient": ["../Condition?x=1"]})
    sent = json.loads(rsps.calls[0].request.body)
    assert sent["entry"][0]["request"]["url"] == "Patient/..%2FCondition%3Fx%3D1"


def test_many_reads_split_into_batches_of_at_most_500_entries(rsps: responses.RequestsMock,
                                                             client: FhirClient) -> None:
    def answer(request: Any) -> tuple[int, dict[str, str], str]:
        entries = json.loads(request.body)["entry"]
        reply = batch_response(*[("404", UNKNOWN) for _ in entries])
        return 200, {"Content-Type": "application/fhir+json"}, json.dumps(reply)

    rsps.add_callback(responses.POST, BASE, callback=answer)
    _, found = Searcher(client, batch=True, workers=2).find([], {"Observation": [f"o{i}" for i in range(1200)]})
    assert found == []
    assert sorted(len(json.loads(c.request.body)["entry"]) for c in rsps.calls) == [200, 500, 500]


def transaction_response(*entries: tuple[str, dict[str, Any] | None]) -> dict[str, Any]:
    return {**batch_response(*entries), "type": "transaction-response"}


def test_transaction_only_server_takes_the_searches_as_one_transaction_of_gets(
        rsps: responses.RequestsMock, client: FhirClient) -> None:
    """A server declaring `transaction` but not `batch` (HAPI JPA): the ids go as `_id` searches
    (a read's 404 would fail the whole transaction), all of them in one transaction of GETs."""
    rsps.post(BASE, json=transaction_response(("200 OK", searchset(["x"])),
                                              ("200 OK", searchset(["a"])),
                                              ("200 OK", searchset(["c"], "Condition"))))
    searcher = Searcher(client, transaction=True)
    answers, found = searcher.find([("Patient", {"identifier": "s|1"})], {"Patient": ["a", "b"], "Condition": ["c"]})
    assert [ids(a) for a in answers] == [["x"]] and ids(found) == ["a", "c"]
    assert methods(rsps) == ["POST"] and searcher.batch is True
    sent = json.loads(rsps.calls[0].request.body)
    assert sent["type"] == "transaction"
    urls = [urlsplit(e["request"]["url"]) for e in sent["entry"]]
    assert [e["request"]["method"] for e in sent["entry"]] == ["GET"] * 3
    assert [u.path for u in urls] == ["Patient", "Patient", "Condition"]
    assert [parse_qs(u.query).get("_id") for u in urls] == [None, ["a,b"], ["c"]]


@pytest.mark.parametrize("reply", [
    batch_response(("200 OK", searchset(["a", "b"])), ("200 OK", searchset(["c"], "Condition"))),  # wrong type
    {"status": 400, "json": NOT_SUPPORTED},  # the server refuses GETs in a transaction
])
def test_a_refused_transaction_of_searches_falls_back_to_plain_searches(
        rsps: responses.RequestsMock, client: FhirClient, reply: dict[str, Any]) -> None:
    if reply.get("status") == 400:
        rsps.post(BASE, status=400, json=reply["json"])
    else:
        rsps.post(BASE, json=reply)
    rsps.get(f"{BASE}/Patient", json=searchset(["a", "b"]))
    rsps.get(f"{BASE}/Condition", json=searchset(["c"], "Condition"))
    searcher = Searcher(client, transaction=True)
    assert [ids(f) for f in searcher.resources(SEARCHES)] == [["a", "b"], ["c"]]
    assert searcher.resources(SEARCHES) and searcher.batch is False
    assert methods(rsps) == ["POST", "GET", "GET", "GET", "GET"]  # not tried again
