"""The server's CapabilityStatement, read once: what push, plan and check may rely on.

One reader for every command, so `check` says exactly what `push` will refuse. A statement
is the server's own word; where it is silent (no resource list, a type without
interactions) nothing is refused on a guess and the first real answer decides.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ruxo_fhir.errors import CapabilityError
from ruxo_fhir.fhir_version import FhirVersion, data_version, server_compatibility, version_of_server
from ruxo_fhir.resource import Resource

# Every resource type push writes (the mapping's output); `check` lists each of them.
WRITTEN_TYPES: tuple[str, ...] = ("Patient", "Condition", "MedicationStatement", "Observation", "AdverseEvent")
# Per-type interactions each id strategy needs: client ids write with `PUT Type/id` (update,
# update-as-create); server ids create with POST and update by identifier.
STRATEGY_INTERACTIONS: dict[str, tuple[str, ...]] = {"client": ("update",), "server": ("create", "update")}


@dataclass(frozen=True)
class ResourceCapability:
    """One `rest.resource` entry."""

    type: str
    interactions: frozenset[str]
    search_params: frozenset[str]
    operations: frozenset[str]
    update_create: bool | None  # None: not stated
    conditional_create: bool
    conditional_update: bool


@dataclass(frozen=True)
class Capabilities:
    """What a CapabilityStatement declares (server mode only)."""

    fhir_version: str
    system_interactions: frozenset[str]
    operations: frozenset[str]  # system- and type-level operation names, without `$`
    resources: dict[str, ResourceCapability] = field(default_factory=dict)

    @classmethod
    def read(cls, statement: Mapping[str, Any]) -> Capabilities:
        system: set[str] = set()
        ops: set[str] = set()
        resources: dict[str, ResourceCapability] = {}
        for rest in _list(statement.get("rest")):
            if rest.get("mode", "server") != "server":
                continue
            system |= _codes(rest.get("interaction"))
            ops |= _op_names(rest.get("operation"))
            for res in _list(rest.get("resource")):
                kind = res.get("type")
                if not isinstance(kind, str):
                    continue
                res_ops = _op_names(res.get("operation"))
                ops |= res_ops
                update_create = res.get("updateCreate")
                resources[kind] = ResourceCapability(
                    type=kind,
                    interactions=frozenset(_codes(res.get("interaction"))),
                    search_params=frozenset(str(p.get("name")) for p in _list(res.get("searchParam"))
                                            if p.get("name")),
                    operations=frozenset(res_ops),
                    update_create=update_create if isinstance(update_create, bool) else None,
                    conditional_create=bool(res.get("conditionalCreate")),
                    conditional_update=bool(res.get("conditionalUpdate")),
                )
        return cls(str(statement.get("fhirVersion") or ""), frozenset(system), frozenset(ops), resources)

    @property
    def declares_resources(self) -> bool:
        return bool(self.resources)

    def missing_interactions(self, resource_type: str, needed: Iterable[str]) -> list[str] | None:
        """The needed interactions the statement does not declare for a type; None when the type
        is not declared at all. [] when all are there, or the statement does not say (no resource
        list, or no interactions listed for the type)."""
        if not self.declares_resources:
            return []
        res = self.resources.get(resource_type)
        if res is None:
            return None
        if not res.interactions:
            return []
        return [code for code in needed if code not in res.interactions]


def _list(value: Any) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _codes(value: Any) -> set[str]:
    return {str(i["code"]) for i in _list(value) if isinstance(i.get("code"), str)}


def _op_names(value: Any) -> set[str]:
    return {str(o.get("name", "")).lstrip("$") for o in _list(value) if o.get("name")}


def server_interactions(capabilities: Mapping[str, Any]) -> set[str]:
    """System-level interaction codes declared by a CapabilityStatement (e.g. transaction)."""
    return set(Capabilities.read(capabilities).system_interactions)


def server_operations(capabilities: Mapping[str, Any]) -> set[str]:
    return set(Capabilities.read(capabilities).operations)


# --- versions ---------------------------------------------------------------------------

def check_version(capabilities: Mapping[str, Any], version: FhirVersion) -> str | None:
    """Refuse a server whose fhirVersion does not match; return a warning for R4B."""
    server_version = str(capabilities.get("fhirVersion", ""))
    if not server_version:
        return "server CapabilityStatement declares no fhirVersion; assuming it matches"
    verdict = server_compatibility(version, server_version)
    if verdict == "refuse":
        raise CapabilityError(
            f"server speaks FHIR {server_version} but the output version is {version}; "
            f"use --fhir-version {'R5' if version == 'R4' else 'R4'} or another server"
        )
    if verdict == "warn":
        return f"server speaks FHIR {server_version} (R4B); pushing R4 resources, unchanged in R4B"
    return None


class DataVersionGuard:
    """Checks what will be pushed, resource by resource, against the server's FHIR version.

    The data decides, not a flag: an R5-shaped resource (R5-only elements such as
    MedicationStatement.medication) never goes to a 4.0.x server, nor R4 shapes to a 5.0.x
    one. R4 data to an R4B (4.3.x) server passes (check_version warns about R4B once). A
    server that declares no fhirVersion is not checked.
    """

    def __init__(self, server_fhir_version: str) -> None:
        self.server_version = server_fhir_version

    def check(self, resource: Resource) -> None:
        if not self.server_version:
            return
        found = data_version(resource)
        if found is None:
            return
        version, evidence = found
        verdict = server_compatibility(version, self.server_version)
        if verdict == "refuse":
            other = "R4" if version == "R5" else "R5"
            raise CapabilityError(
                f"the data is FHIR {version} ({resource.get('resourceType')}/{resource.get('id', '?')} has "
                f"{evidence}) but the server speaks FHIR {version_of_server(self.server_version)}: import the cases "
                f"again with --fhir-version {other}, or push to a FHIR {version} server"
            )


# --- push pre-flight --------------------------------------------------------------------

def preflight_types(caps: Capabilities, types: Iterable[str], ids: str = "client") -> None:
    """Refuse (CapabilityError, exit 5) before any write when a type push is about to write is
    not declared, or lacks an interaction the id strategy needs."""
    needed = STRATEGY_INTERACTIONS.get(ids, STRATEGY_INTERACTIONS["client"])
    for kind in sorted(set(types)):
        missing = caps.missing_interactions(kind, needed)
        if missing is None:
            raise CapabilityError(f"the server's CapabilityStatement does not list {kind}, which push "
                                  f"writes (see `ruxo-fhir check`)")
        if missing:
            raise CapabilityError(f"the server does not declare the {', '.join(missing)} interaction for "
                                  f"{kind} that push needs ({_strategy_words(ids)}) "
                                  f"(see `ruxo-fhir check`)")


def _strategy_words(ids: str) -> str:
    return "PUT Type/id with client ids" if ids == "client" else "create and update with server ids"
