"""Push decides on a refused bundle from the HTTP status and OperationOutcome issue codes only."""
from __future__ import annotations

import pytest

from ruxo_fhir.errors import FatalServerError, OutcomeIssue
from ruxo_fhir.sync.push import refused_as_too_big, refused_transactions


def refusal(status: int, *issues: OutcomeIssue, prose: str = "") -> FatalServerError:
    return FatalServerError(prose or "Bad Request", status=status, issues=[prose] if prose else [], outcome=issues)


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
