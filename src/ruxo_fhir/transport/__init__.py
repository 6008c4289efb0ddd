"""Talking to FHIR servers: the only package that imports requests (REST, auth, bulk export)."""
from __future__ import annotations

from ruxo_fhir.transport.auth import (
    BasicAuth,
    BearerAuth,
    SmartBackendAuth,
    auth_from_options,
    default_auth_kind,
    jwk_thumbprint,
)
from ruxo_fhir.transport.bulk import ExportFile, ExportManifest, bulk_export, bulk_export_to_dir
from ruxo_fhir.transport.outcome import raise_for_response, redact_url, summarize_outcome
from ruxo_fhir.transport.rest import FhirClient, InvalidJSONError, Response, RetryPolicy, parse_retry_after

__all__ = [
    "BasicAuth",
    "BearerAuth",
    "ExportFile",
    "ExportManifest",
    "FhirClient",
    "InvalidJSONError",
    "Response",
    "RetryPolicy",
    "SmartBackendAuth",
    "auth_from_options",
    "bulk_export",
    "bulk_export_to_dir",
    "default_auth_kind",
    "jwk_thumbprint",
    "parse_retry_after",
    "raise_for_response",
    "redact_url",
    "summarize_outcome",
]
