"""The test front's `no_client_ids` switch (an EHR that refuses client-assigned ids, as HAPI's
NOT_ALLOWED strategy and Epic do) and pull leaving entered-in-error resources out (issue 12)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests
from fhirserver import TestFhirServer
from helpers import EXAMPLE_CSV

from ruxo_fhir.importer import import_cases
from ruxo_fhir.mapping.spec import load_mapping

pytestmark = pytest.mark.e2e
FHIR_JSON = "application/fhir+json"


def call(method: str, url: str, body: Any = None) -> requests.Response:
    headers = {"Accept": FHIR_JSON}
    data = None
    if body is not None:
        headers["Content-Type"] = FHIR_JSON
        data = json.dumps(body)
    return requests.request(method, url, headers=headers, data=data, timeout=30)


def patient(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": "http://ruxo.test/mrn", "value": "1"}], **extra}


def assert_refusal(status: int, outcome: dict[str, Any], rid: str) -> None:
    """HAPI's NOT_ALLOWED answer (HAPI-0959): 404, issue code processing, the id named."""
    assert status == 404
    issue = outcome["issue"][0]
    assert outcome["resourceType"] == "OperationOutcome" and issue["severity"] == "error"
    assert issue["code"] == "processing"
    assert f"ID[{rid}]" in issue["diagnostics"] and "client-assigned IDs are not enabled" in issue["diagnostics"]


def test_no_client_ids_refuses_put_create_only(fhir_server: TestFhirServer) -> None:
    base = fhir_server.base_url
    caps = call("GET", f"{base}/metadata").json()
    assert all(r["updateCreate"] is True for r in caps["rest"][0]["resource"])
    fhir_server.configure(no_client_ids=True)
    caps = call("GET", f"{base}/metadata").json()
    assert all(r["updateCreate"] is False for r in caps["rest"][0]["resource"])

    r = call("PUT", f"{base}/Patient/abc", patient(id="abc"))
    assert_refusal(r.status_code, r.json(), "abc")
    assert fhir_server.counts() == {}

    created = call("POST", f"{base}/Patient", patient(id="ignored"))
    assert created.status_code == 201
    sid = created.json()["id"]
    assert sid != "ignored"
    updated = call("PUT", f"{base}/Patient/{sid}", patient(id=sid, gender="female"))
    assert updated.status_code == 200 and updated.json()["gender"] == "female"
    cond = call("PUT", f"{base}/Patient?identifier=http://ruxo.test/mrn|2",
                {"resourceType": "Patient", "identifier": [{"system": "http://ruxo.test/mrn", "value": "2"}]})
    assert cond.status_code == 201  # conditional update with no match creates, the server assigns the id
    assert fhir_server.counts() == {"Patient": 2}


def test_no_client_ids_in_bundles(fhir_server: TestFhirServer) -> None:
    fhir_server.configure(no_client_ids=True)
    base = fhir_server.base_url
    entries = [
        {"fullUrl": "urn:uuid:6a1c9f7e-0000-4000-8000-000000000001", "resource": patient(),
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=http://ruxo.test/mrn|1"}},
        {"resource": patient(id="xyz"), "request": {"method": "PUT", "url": "Patient/xyz"}},
    ]
    tx = call("POST", base, {"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert_refusal(tx.status_code, tx.json(), "xyz")
    assert fhir_server.counts() == {}  # all or nothing
    batch = call("POST", base, {"resourceType": "Bundle", "type": "batch", "entry": entries})
    assert batch.status_code == 200
    first, second = (e["response"] for e in batch.json()["entry"])
    assert first["status"].startswith("201")
    assert_refusal(int(second["status"].split()[0]), second["outcome"], "xyz")
    assert fhir_server.counts() == {"Patient": 1}


def test_pull_leaves_entered_in_error_out(fhir_server: TestFhirServer, tmp_path: Path) -> None:
    from ruxo_fhir.sync.pull import PullResult, pull_cohort
    from ruxo_fhir.transport import FhirClient

    mapping = load_mapping(None)
    out = tmp_path / "b.json"
    import_cases(EXAMPLE_CSV, out, mapping=mapping)
    resources = [e["resource"] for e in json.loads(out.read_text())["entry"]]
    withdrawn = 0
    for r in resources:
        if "C12" in json.dumps(r.get("identifier")):
            if r["resourceType"] == "Condition":
                r["verificationStatus"]["coding"][0]["code"] = "entered-in-error"
                r.pop("clinicalStatus")  # con-5
            else:
                r["status"] = "entered-in-error"
            withdrawn += 1
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                        for r in resources]}
    answer = call("POST", fhir_server.base_url, bundle)
    assert answer.status_code == 200, answer.text
    result = PullResult()
    client = FhirClient(fhir_server.base_url)
    pulled = list(pull_cohort(client, mapping, result=result))
    assert len(pulled) == len(resources) - withdrawn
    assert result.retracted == withdrawn
    assert not [r for r in pulled if "C12" in json.dumps(r.get("identifier"))]
    assert any(f"left out {withdrawn} entered-in-error" in w for w in result.warnings)
