"""ruxo-fhir: case-record sheets <-> FHIR R4 resources, server sync and treatment outcomes.

The library is `ruxo_fhir.api` (one typed function per job, re-exported here lazily so that
importing any part of the package stays fast):

    from ruxo_fhir import api
    api.import_file("cases.csv", "bundle.json")

`api.validate` and `api.outcomes` are reached through `api` only: their names here belong to
the `ruxo_fhir.validate` and `ruxo_fhir.outcomes` modules.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from ruxo_fhir.errors import (  # noqa: E402
    AuthError,
    CapabilityError,
    FatalServerError,
    InputError,
    MappingError,
    RuxoError,
    ServerError,
    TemporaryServerError,
    UsageError,
    ValidationError,
)

if TYPE_CHECKING:
    from ruxo_fhir import api
    from ruxo_fhir.api import (
        CheckOptions,
        CheckSummary,
        ExportOptions,
        ImportOptions,
        OutcomesOptions,
        OutcomesSummary,
        PullOptions,
        PullSummary,
        PushOptions,
        PushSummary,
        ServerSettings,
        ValidateOptions,
        ValidateResult,
        check,
        export_file,
        import_file,
        pull,
        push,
        server_settings,
    )

_API_NAMES = frozenset({
    "CheckOptions", "CheckSummary", "ExportOptions", "ImportOptions", "OutcomesOptions", "OutcomesSummary",
    "PullOptions", "PullSummary", "PushOptions", "PushSummary", "ServerSettings", "ValidateOptions",
    "ValidateResult", "check", "export_file", "import_file", "pull", "push", "server_settings",
})


def __getattr__(name: str) -> Any:
    """The application layer on first use (PEP 562), so `import ruxo_fhir.x` stays light."""
    if name == "api" or name in _API_NAMES:
        import importlib

        module = importlib.import_module("ruxo_fhir.api")
        return module if name == "api" else getattr(module, name)
    raise AttributeError(f"module 'ruxo_fhir' has no attribute {name!r}")


__all__ = [
    "AuthError", "CapabilityError", "FatalServerError", "InputError", "MappingError", "RuxoError",
    "ServerError", "TemporaryServerError", "UsageError", "ValidationError", "__version__", "api",
    *sorted(_API_NAMES),
]
