"""Push decides on a refused write from the HTTP status and OperationOutcome issue codes only."""
from __future__ import annotations

import pytest

from ruxo_fhir.errors import FatalServerError, OutcomeIssue
from ruxo_fhir.sync.push import refused_as_too_big, refused_transactions, refuses_client_ids


def refusal(status: int, *issues: OutcomeIssue, prose: str = "") -> FatalServerError:
    """A refusal with these issues; `prose` is said twice: as the reason and as a code-less issue."""
    said = (OutcomeIssue(diagnostics=prose),) if prose else ()
    return FatalServerError(prose or "Bad Request", status=status, issues=(*issues, *said))


@pytest.mark.parametrize("exc,expected", [
    (refusal(413), True),
    (refusal(400, OutcomeIssue("error", "too-costly", "at most 15 entries", ("Bundle.entry",))), True),
    (refusal(422, OutcomeIssue("error", "too-costly")), True),
    (refusal(400, OutcomeIssue("error", "too-long", "bundle too long", ("Bundle",))), True),
    # a string too long inside a resource is a validation error: smaller bundles cannot help
    (refusal(400, OutcomeIssue("error", "too-long", "value exceeds maximum length",
                               ("Bundle.entry[0].resource.name[0].family",))), False),
    # the wording alone decides nothing
    (refusal(400, OutcomeIssue("error", "invalid"), prose="Bundle too large: maximum 10 entries"), False),
    (refusal(409, OutcomeIssue("error", "too-costly")), False),
])
def test_size_refusal_is_status_or_issue_code(exc: FatalServerError, expected: bool) -> None:
    assert refused_as_too_big(exc) is expected


@pytest.mark.parametrize("exc,expected", [
    (refusal(400, OutcomeIssue("error", "not-supported", "only batch is supported", ("Bundle.type",))), True),
    (refusal(400, OutcomeIssue("error", "not-supported", "transactions are off")), True),
    # one entry's interaction is not supported: not a refusal of transactions as such
    (refusal(400, OutcomeIssue("error", "not-supported", "entry 0: conditional update is not supported",
                               ("Bundle.entry[0].request.url",))), False),
    (refusal(400, OutcomeIssue("error", "invalid"), prose="transaction not supported"), False),
])
def test_transaction_refusal_is_not_supported_at_bundle_type(exc: FatalServerError, expected: bool) -> None:
    assert refused_transactions(exc) is expected


# --- a server refusing client-assigned ids ----------------------------------------------------
# HAPI FHIR 8.8.0 JPA with client ids off (tests/hapiserver.py --no-client-ids, i.e. admin config
# `client_ids: false`; ClientIdStrategy NOT_ALLOWED), bodies exactly as it sent them (15:09 UTC run):
# PUT Patient/abc, then a transaction and a batch holding one PUT Patient/xyz.
HAPI_PUT_404 = (b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"processing",'
                b'"diagnostics":"HAPI-0959: No resource exists on this server resource with ID[abc], and '
                b'client-assigned IDs are not enabled."}]}')
HAPI_TRANSACTION_404 = HAPI_PUT_404.replace(b"ID[abc]", b"ID[xyz]")
HAPI_BATCH_ENTRY_RESPONSE = {  # entry[0].response of the batch-response
    "status": "404 Not Found", "outcome": {"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": "exception",
        "diagnostics": "HAPI-0959: No resource exists on this server resource with ID[xyz], and "
                       "client-assigned IDs are not enabled."}]}}
HAPI_HEADERS = {"X-Powered-By": "HAPI FHIR 8.8.0 REST Server (FHIR Server; FHIR 4.0.1/R4)"}
HAPI_TYPE = "application/fhir+json;charset=utf-8"
BASE = "http://hapi.test/fhir"


def test_hapi_refusal_of_client_ids_is_found_by_status_and_code() -> None:
    import responses

    from ruxo_fhir.sync.replies import status_code
    from ruxo_fhir.transport.outcome import structured_issues
    from ruxo_fhir.transport.rest import FhirClient, RetryPolicy

    with responses.RequestsMock() as rsps, FhirClient(BASE, retry=RetryPolicy(max_attempts=1)) as client:
        rsps.put(f"{BASE}/Patient/abc", body=HAPI_PUT_404, status=404, content_type=HAPI_TYPE, headers=HAPI_HEADERS)
        rsps.post(BASE, body=HAPI_TRANSACTION_404, status=404, content_type=HAPI_TYPE, headers=HAPI_HEADERS)
        with pytest.raises(FatalServerError) as put:
            client.put("Patient", "abc", {"resourceType": "Patient", "id": "abc"})
        with pytest.raises(FatalServerError) as tx:
            client.post_bundle({"resourceType": "Bundle", "type": "transaction", "entry": []}, idempotent=True)
    for exc in (put.value, tx.value):
        assert exc.status == 404 and [i.code for i in exc.issues] == ["processing"]
        assert refuses_client_ids(exc.status, exc.issues)
        assert "HAPI-0959" in exc.summaries[0]  # rendered for the user, not decided on
    entry = HAPI_BATCH_ENTRY_RESPONSE
    assert refuses_client_ids(status_code(entry["status"]), structured_issues(entry["outcome"]))


# The Medplum test front's `no_client_ids` answer (tests/fhir_server/fhir.mjs clientIdRefused).
FRONT = OutcomeIssue("error", "processing", "No resource exists on this server resource with ID[x], and "
                     "client-assigned IDs are not enabled.")


@pytest.mark.parametrize("status,issues,expected", [
    (404, (FRONT,), True),
    (405, (), True),  # FHIR R4 http.html#update: 405 when the server does not allow client ids
    (404, (OutcomeIssue("error", "not-found", "Patient/x"),), True),
    # HAPI's other refusals of such a write are not this one
    (400, (OutcomeIssue("error", "processing", "HAPI-1094: Resource Patient/nope not found, specified in "
                                               "path: Observation.subject"),), False),
    (409, (OutcomeIssue("error", "processing", "HAPI-0550: HAPI-0989: Trying to update Patient/1/_history/7 "
                                               "but this is not the current version"),), False),
    (404, (OutcomeIssue("error", "not-supported", "Unknown resource type: Foo"),), False),
    (404, (), False),  # a bare 404 (a proxy's page) says nothing about ids
    # the wording alone decides nothing
    (400, (OutcomeIssue("error", "invalid", "client-assigned IDs are not enabled (HAPI-0959)"),), False),
    (422, (OutcomeIssue(diagnostics="update as create is not allowed"),), False),
])
def test_client_ids_refusal_is_status_and_issue_code(status: int, issues: tuple[OutcomeIssue, ...],
                                                     expected: bool) -> None:
    assert refuses_client_ids(status, issues) is expected


# --- the removed-case check by counts ----------------------------------------------------------
def test_cohort_counts_ask_one_count_per_type_and_give_up_on_any_doubt() -> None:
    """`_summary=count` by the mapping's identifier systems (AdverseEvent, which R4 cannot search
    by identifier, counted whole); a reply without `total` or a refused search means "read the
    cohort" (None), never a guessed 0."""
    from urllib.parse import parse_qs, urlsplit

    import responses

    from ruxo_fhir.mapping.spec import load_mapping
    from ruxo_fhir.sync.prune import cohort_counts
    from ruxo_fhir.transport.rest import FhirClient, RetryPolicy

    mapping = load_mapping()
    sys = mapping.identifier_systems
    count = {"resourceType": "Bundle", "type": "searchset", "total": 3}
    with responses.RequestsMock() as rsps, FhirClient(BASE, retry=RetryPolicy(max_attempts=1)) as client:
        rsps.get(f"{BASE}/Condition", json=count)
        rsps.get(f"{BASE}/AdverseEvent", json={**count, "total": 1})
        assert cohort_counts(client, mapping, ["Condition", "AdverseEvent"]) == {"Condition": 3, "AdverseEvent": 1}
        sent = [parse_qs(urlsplit(str(c.request.url)).query) for c in rsps.calls]
        assert sent[0] == {"_summary": ["count"], "identifier": [f"{sys.case}|,{sys.resource}|"]}
        assert sent[1] == {"_summary": ["count"]}
    with responses.RequestsMock() as rsps, FhirClient(BASE, retry=RetryPolicy(max_attempts=1)) as client:
        rsps.get(f"{BASE}/Condition", json={"resourceType": "Bundle", "type": "searchset"})
        assert cohort_counts(client, mapping, ["Condition"]) is None
    with responses.RequestsMock() as rsps, FhirClient(BASE, retry=RetryPolicy(max_attempts=1)) as client:
        rsps.get(f"{BASE}/Condition", status=400, json={"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "not-supported", "diagnostics": "_summary=count is not supported"}]})
        assert cohort_counts(client, mapping, ["Condition"]) is None
