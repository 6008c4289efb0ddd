"""Derived resource ids: same input, same id, on every run and every machine."""
from __future__ import annotations

import hashlib
from collections.abc import Callable


def derive_id(resource_type: str, system: str, value: str) -> str:
    """A stable FHIR id from (type, identifier system, value).

    The `r` prefix keeps ids non-numeric (HAPI's default id strategy rejects purely numeric
    client-assigned ids); 32 hex digits keep collisions out of reach for any cohort.
    """
    digest = hashlib.sha256(f"{resource_type}|{system}|{value}".encode()).hexdigest()
    return f"r{digest[:32]}"


def id_deriver(resource_type: str, system: str) -> Callable[[str], str]:
    """`derive_id` with the type and system fixed: the same ids, without re-encoding the prefix.

    The forward mapping derives several ids per row; this is its hot path.
    """
    prefix = f"{resource_type}|{system}|".encode()
    sha256 = hashlib.sha256

    def derive(value: str) -> str:
        return "r" + sha256(prefix + value.encode()).hexdigest()[:32]

    return derive


def ref(resource_type: str, resource_id: str) -> dict[str, str]:
    return {"reference": f"{resource_type}/{resource_id}"}
