"""Identity on a server: which server resource is "this" resource, whatever id the server chose.

The adapter means a resource by its identifier (system from the mapping, value from the
case), never by a server id. This module finds the server's copies of a set of identities
(batched searches by identifier, or reads by id where ids are client-assigned), and rewrites a
local resource's references to the ids the server holds.
"""
from __future__ import annotations

import copy
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

from ruxo_fhir.mapping.reverse import identifier_value, identifiers, reference_key
from ruxo_fhir.mapping.spec import MappingSpec
from ruxo_fhir.sync.client import Client as Client  # the one client seam (was defined here)
from ruxo_fhir.sync.ledger import content_hash
from ruxo_fhir.sync.searches import Search, Searcher, chunks

Resource = dict[str, Any]
SEARCH_CHUNK = 40  # identifier values per search URL (a few KB at most)
REFERENCED_TYPES = frozenset({"Patient", "Condition", "MedicationStatement"})


class Identity(NamedTuple):
    kind: str
    system: str
    value: str

    @property
    def key(self) -> str:
        """The ledger key: type, identifier system and value (never a server id)."""
        return f"{self.kind}|{self.system}|{self.value}"

    @property
    def token(self) -> str:
        return f"{self.system}|{self.value}"

    @property
    def search(self) -> str:
        """The conditional URL query (`ifNoneExist`, conditional update)."""
        return f"identifier={self.token}"

    def urn(self, server: str) -> str:
        """A stable `urn:uuid` for this identity's create entry: a resent bundle is the same bundle."""
        return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, server.rstrip('/') + '#' + self.key)}"


def identity_of(resource: Resource, mapping: MappingSpec) -> Identity | None:
    """The identifier that names a resource: the patient system for a Patient (the MRN system
    in link modes), the case system for a case statement, the per-resource system otherwise."""
    kind = str(resource.get("resourceType"))
    sys = mapping.identifier_systems
    systems = (mapping.patient_system,) if kind == "Patient" else (sys.case, sys.resource)
    for system in systems:
        value = identifier_value(resource, system)
        if value:
            return Identity(kind, system, value)
    return None


@dataclass(frozen=True)
class ServerCopy:
    id: str
    version: str | None
    last_updated: str | None
    body: Resource

    @classmethod
    def of(cls, resource: Resource) -> ServerCopy:
        meta = resource.get("meta") or {}
        version = meta.get("versionId")
        return cls(str(resource.get("id")), str(version) if version is not None else None,
                   meta.get("lastUpdated"), resource)


class CopyQuery:
    """The searches that find server copies of a set of identities, and how each answer is read:
    built by `by_identifier`/`by_subject`/`by_id`, then run together (one batch read where the
    server takes one, sync/searches.py)."""

    def __init__(self) -> None:
        self.searches: list[Search] = []
        self._readers: list[Callable[[list[Resource]], None]] = []
        self.found: dict[Identity, list[ServerCopy]] = defaultdict(list)
        self.ids: dict[str, list[str]] = {}  # wanted by id, per type
        self.wanted: dict[str, Identity] = {}  # `Type/id` -> identity

    def by_identifier(self, idents: Iterable[Identity]) -> CopyQuery:
        """Batched `identifier=s|v1,s|v2` searches (OR)."""
        wanted: dict[tuple[str, str], set[str]] = defaultdict(set)
        for ident in idents:
            wanted[(ident.kind, ident.system)].add(ident.value)
        for (kind, system), values in wanted.items():
            for part in chunks(sorted(values), SEARCH_CHUNK):
                params = {"identifier": ",".join(f"{system}|{v}" for v in part), "_count": str(2 * len(part) + 1)}
                self._add(kind, params, partial(self._by_systems, kind, {system: set(part)}))
        return self

    def by_subject(self, kind: str, subjects: Iterable[str], idents: Iterable[Identity]) -> CopyQuery:
        """For a type the server cannot search by identifier (AdverseEvent in R4): the subjects'
        resources of that type, matched on the identifier here."""
        by_system: dict[str, set[str]] = defaultdict(set)
        for ident in idents:
            by_system[ident.system].add(ident.value)
        for part in chunks(sorted(set(subjects)), SEARCH_CHUNK):
            self._add(kind, {"subject": ",".join(part)}, partial(self._by_systems, kind, by_system))
        return self

    def by_id(self, wanted: dict[str, Identity]) -> CopyQuery:
        """Client-assigned ids: read by id (reads in a batch, else batched `_id` searches);
        `wanted` maps `Type/id` to identity."""
        for key, ident in wanted.items():
            kind, rid = key.split("/", 1)
            self.ids.setdefault(kind, []).append(rid)
            self.wanted[key] = ident
        return self

    def _by_systems(self, kind: str, by_system: dict[str, set[str]], found: list[Resource]) -> None:
        for res in found:
            for system, values in by_system.items():
                _collect(self.found, res, kind, system, values)

    def _add(self, kind: str, params: dict[str, str], reader: Callable[[list[Resource]], None]) -> None:
        self.searches.append((kind, params))
        self._readers.append(reader)

    def run(self, searcher: Searcher) -> dict[Identity, list[ServerCopy]]:
        answers, by_id = searcher.find(self.searches, self.ids)
        for reader, found in zip(self._readers, answers):
            reader(found)
        for res in by_id:
            ident = self.wanted.get(f"{res.get('resourceType')}/{res.get('id')}")
            if ident is not None and all(c.id != res.get("id") for c in self.found[ident]):
                self.found[ident].append(ServerCopy.of(res))
        return self.found


def find_by_identifier(client: Client, idents: Iterable[Identity], searcher: Searcher | None = None
                       ) -> dict[Identity, list[ServerCopy]]:
    """Server copies per identity, by batched `identifier=s|v1,s|v2` searches (OR)."""
    return CopyQuery().by_identifier(idents).run(searcher or Searcher(client))


def find_by_subject(client: Client, kind: str, subjects: Iterable[str], idents: Iterable[Identity],
                    searcher: Searcher | None = None) -> dict[Identity, list[ServerCopy]]:
    """Server copies of a type the server cannot search by identifier, found by subject."""
    return CopyQuery().by_subject(kind, subjects, idents).run(searcher or Searcher(client))


def find_by_id(client: Client, wanted: dict[str, Identity], searcher: Searcher | None = None
               ) -> dict[Identity, list[ServerCopy]]:
    """Client-assigned ids: copies read by id; `wanted` maps `Type/id` to identity."""
    return CopyQuery().by_id(wanted).run(searcher or Searcher(client))


def _collect(found: dict[Identity, list[ServerCopy]], res: Resource, kind: str, system: str,
             values: set[str]) -> None:
    if res.get("resourceType") != kind:
        return
    for ident in identifiers(res):
        value = ident.get("value")
        if ident.get("system") == system and value in values:
            copies = found[Identity(kind, system, str(value))]
            if all(c.id != res.get("id") for c in copies):  # paging may repeat an entry
                copies.append(ServerCopy.of(res))


def rewrite_references(resource: Resource, resolve: Callable[[str], str | None]) -> Resource:
    """A copy whose `reference` strings are replaced where `resolve` knows a target."""
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k == "reference" and isinstance(v, str):
                    out[k] = resolve(v) or v
                else:
                    out[k] = walk(v)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    result: Resource = walk(resource)
    return result


def references(resource: Resource) -> Iterator[str]:
    """Every `reference` string in a resource."""
    stack: list[Any] = [resource]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "reference" and isinstance(v, str):
                    yield v
                else:
                    stack.append(v)
        elif isinstance(node, list):
            stack.extend(node)


def as_written(resource: Resource, server_id: str | None, resolve: Callable[[str], str | None]) -> Resource:
    """The resource as it would stand on the server: its server id (or none), references
    rewritten to server ids."""
    out = rewrite_references(resource, resolve)
    out.pop("meta", None)
    if server_id is None:
        out.pop("id", None)
    else:
        out["id"] = server_id
    return out


def same_content(ours: Resource, theirs: Resource) -> bool:
    return content_hash(_comparable(ours)) == content_hash(_comparable(theirs))


def _comparable(resource: Resource) -> Resource:
    out = {k: v for k, v in resource.items() if k not in ("meta", "text")}
    return out


def what_differs(ours: Resource, theirs: Resource) -> str:
    """The top-level elements that differ, in a word or two (names only, never values)."""
    a, b = _comparable(ours), _comparable(theirs)
    keys = sorted(k for k in set(a) | set(b) if k != "id"
                  and content_hash({"v": a.get(k)}) != content_hash({"v": b.get(k)}))
    return ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "") if keys else "content"


def local_key(reference: str) -> str | None:
    """`Type/id` of a relative literal reference (None for conditional, urn or contained)."""
    if reference.startswith(("urn:", "#")) or "?" in reference:
        return None
    return reference_key(reference)


def copy_resource(resource: Resource) -> Resource:
    return copy.deepcopy(resource)
