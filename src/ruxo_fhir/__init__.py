"""ruxo-fhir: case-record sheets <-> FHIR R4 resources, server sync and treatment outcomes.

The library is `ruxo_fhir.api` (one typed function per job, re-exported here lazily so that
importing any part of the package stays fast):

    from ruxo_fhir import api as api
    api.import_file("cases.csv", "bundle.json")

`api.validate` and `api.outcomes` are reached through `api` only: their names here belong to
the `ruxo_fhir.validate` and `ruxo_fhir.outcomes` modules.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from ruxo_fhir.errors import (
    AuthError,
    CapabilityError,
    FatalServerError,
    InputError,
    MappingError,
    NotFound,
    OutcomeIssue,
    RuxoError,
    ServerError,
    TemporaryServerError,
    UsageError,
    ValidationError,
)

if TYPE_CHECKING:
    from ruxo_fhir import api as api
    from ruxo_fhir.api import (
        CheckOptions as CheckOptions,
    )
    from ruxo_fhir.api import (
        CheckSummary as CheckSummary,
    )
    from ruxo_fhir.api import (
        ExportOptions as ExportOptions,
    )
    from ruxo_fhir.api import (
        ImportOptions as ImportOptions,
    )
    from ruxo_fhir.api import (
        OutcomesOptions as OutcomesOptions,
    )
    from ruxo_fhir.api import (
        OutcomesSummary as OutcomesSummary,
    )
    from ruxo_fhir.api import (
        PullOptions as PullOptions,
    )
    from ruxo_fhir.api import (
        PullSummary as PullSummary,
    )
    from ruxo_fhir.api import (
        PushOptions as PushOptions,
    )
    from ruxo_fhir.api import (
        PushSummary as PushSummary,
    )
    from ruxo_fhir.api import (
        ServerSettings as ServerSettings,
    )
    from ruxo_fhir.api import (
        ValidateOptions as ValidateOptions,
    )
    from ruxo_fhir.api import (
        ValidateResult as ValidateResult,
    )
    from ruxo_fhir.api import (
        check as check,
    )
    from ruxo_fhir.api import (
        export_file as export_file,
    )
    from ruxo_fhir.api import (
        import_file as import_file,
    )
    from ruxo_fhir.api import (
        pull as pull,
    )
    from ruxo_fhir.api import (
        push as push,
    )
    from ruxo_fhir.api import (
        server_settings as server_settings,
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
    "AuthError", "CapabilityError", "FatalServerError", "InputError", "MappingError", "NotFound", "OutcomeIssue",
    "RuxoError",
    "ServerError", "TemporaryServerError", "UsageError", "ValidationError", "__version__", "api",
    *sorted(_API_NAMES),
]
