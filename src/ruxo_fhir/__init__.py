"""ruxo-fhir: case-record sheets <-> FHIR R4 resources, server sync and treatment outcomes."""
from __future__ import annotations

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
    ValidationError,
)

__all__ = [
    "AuthError", "CapabilityError", "FatalServerError", "InputError", "MappingError", "RuxoError",
    "ServerError", "TemporaryServerError", "ValidationError", "__version__",
]
