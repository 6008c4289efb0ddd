"""Push: send resources to a FHIR server in reference-safe chunks, idempotently.

Every resource is named by its identifier (sync/identity.py). Before writing, push reads the
server's copies (batched searches) and decides per resource: create, update (with If-Match on
the version it just read), unchanged, or conflict (someone else changed it: never
overwritten unless asked). Two id strategies over that one identity:

- client ids (`PUT Type/id` at an id derived from the identifier), where the server allows
  update-as-create;
- server ids (`POST` with `ifNoneExist: identifier=...`, conditional `PUT Type?identifier=...`,
  `urn:uuid` references inside a transaction), where it does not, as most EHRs.

Why PUT with stable ids (not conditional create): the ids are derived from identifiers, so
a PUT is idempotent by construction — a lost reply, a retry or a rerun writes the same
resource at the same id and can never create a duplicate, in transaction and batch mode
alike, and references stay literal `Type/id` so no chunk depends on another chunk's
`urn:uuid`. Conditional create needs the server to search before every write and breaks
under concurrent retries (two creates racing past `If-None-Exist`).
"""
from __future__ import annotations

import csv
import io
import logging
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ruxo_fhir.bundle import make_bundle, put_entry
from ruxo_fhir.errors import (
    CapabilityError,
    FatalServerError,
    OutcomeIssue,
    ServerError,
    TemporaryServerError,
)
from ruxo_fhir.fhir_version import FhirVersion
from ruxo_fhir.mapping.reverse import (
    conditional_identifier,
    identifier_value,
    identifiers,
)
from ruxo_fhir.mapping.spec import MappingSpec
from ruxo_fhir.resource import Resource
from ruxo_fhir.sync.capabilities import (
    WRITTEN_TYPES,
    Capabilities,
    DataVersionGuard,
    preflight_types,
)
from ruxo_fhir.sync.capabilities import (
    check_version as check_version,  # re-exported (was defined here)
)
from ruxo_fhir.sync.capabilities import server_interactions as server_interactions
from ruxo_fhir.sync.client import Client as Client  # the one client seam (was defined here)
from ruxo_fhir.sync.identity import (
    REFERENCED_TYPES,
    CopyQuery,
    Identity,
    ServerCopy,
    as_written,
    find_by_id,
    find_by_identifier,
    identity_of,
    local_key,
    references,
    rewrite_references,
    same_content,
    what_differs,
)
from ruxo_fhir.sync.ledger import Ledger, Written, content_hash
from ruxo_fhir.sync.pull import PART_TYPES
from ruxo_fhir.sync.replies import entry_reply, same_instant, status_code
from ruxo_fhir.sync.searches import Searcher
from ruxo_fhir.transport.outcome import TEMPORARY_STATUSES
from ruxo_fhir.transport.rest import RetryPolicy

if TYPE_CHECKING:
    from ruxo_fhir.validate import Validator

log = logging.getLogger("ruxo_fhir.sync")
LEDGER_WINDOW = 1000  # entries whose server versions are checked together on a re-push
T = TypeVar("T")

# Decisions on a refused bundle read the HTTP status and the OperationOutcome issue codes, never
# the server's wording. A size refusal is 413, or `too-costly` (any place), or `too-long` about
# the Bundle itself or its entry list -- a `too-long` deeper in a resource is a validation error
# ("value exceeds maximum length") and must not shrink chunks.
_SIZE_STATUSES = frozenset({400, 413, 422})
_BUNDLE_LEVEL = frozenset({"", "Bundle", "Bundle.entry", "Bundle.type"})


def refused_as_too_big(exc: ServerError) -> bool:
    """The server refused the bundle for its size (so smaller bundles may pass)."""
    if exc.status == 413:
        return True
    if exc.status not in _SIZE_STATUSES:
        return False
    return any(i.code == "too-costly" or (i.code == "too-long" and _at_bundle_level(i.expression))
               for i in exc.issues)


def refused_transactions(exc: ServerError) -> bool:
    """The server refused the bundle TYPE: a `not-supported` issue about ``Bundle.type`` (or about no
    element at all), not an entry inside the transaction."""
    return any(i.code == "not-supported" and _at_bundle_level(i.expression) for i in exc.issues)


def _at_bundle_level(expression: tuple[str, ...]) -> bool:
    return not expression or all(e in _BUNDLE_LEVEL for e in expression)


@dataclass
class PushOptions:
    batch_size: int = 200
    mode: str = "transaction"  # "transaction" | "batch"
    mode_explicit: bool = False  # False: a batch-only server switches the mode by itself
    version: FhirVersion = "R4"
    use_ledger: bool = True
    # Batch entries answered with a temporary status (TEMPORARY_STATUSES) are re-sent under
    # `retry` (None: the client's own RetryPolicy, else the default one) -- the same policy
    # requests use -- and at most `batch_entry_retries` times. Worst case per reference level:
    # min(retry.max_attempts, batch_entry_retries + 1) sends, sleeping at most
    # retry.max_total_seconds in total (defaults: 6 sends, 1+2+4+8+16 = 31 s of sleeping).
    batch_entry_retries: int = 5
    sleep: Callable[[float], None] = time.sleep  # does the sleeping; the policy says how long
    retry: RetryPolicy | None = None
    ids: str = "auto"  # client | server | auto (server when the server refuses client ids)
    on_conflict: str = "skip"  # skip | overwrite: a server copy someone else changed
    dry_run: bool = False  # read and decide, write nothing
    prune: bool = False  # retract cohort resources the source no longer produces
    prune_max: float = 20.0  # percent of the cohort a prune may retract
    check_retractions: bool = True  # count them even without prune (a full cohort read)
    source_rejected_rows: int = 0  # rows of the source that were rejected: prune refuses then
    # Bundles in flight at once. A bundle waits until every bundle holding a resource it
    # references has landed, so servers with referential integrity see what they see with 1.
    concurrency: int = 1


@dataclass
class PushResult:
    """Entry counts (created + updated + unchanged + conflict + rejected == total) and what was said."""

    total: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    conflict: int = 0
    rejected: int = 0
    mode: str = "transaction"
    ids: str = "client"
    batch_size: int = 0
    bundles_sent: int = 0
    version_reads: int = 0  # batched reads after writes whose replies named no version
    notices: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    rejects: list[PushReject] = field(default_factory=list)
    retractable: list[str] = field(default_factory=list)  # lines: what the source no longer produces
    retracted: int = 0
    cohort_on_server: int = 0
    prune_refused: str | None = None
    by_type: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    # counts change from the sending threads of `--concurrency` and the deciding thread at once
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, resource_type: str, outcome: str, n: int = 1) -> None:
        with self._guard:
            setattr(self, outcome, getattr(self, outcome) + n)
            self.by_type[resource_type][outcome] += n

    def add(self, name: str, n: int = 1) -> None:
        """Add to a plain counter (total, bundles_sent, version_reads)."""
        with self._guard:
            setattr(self, name, getattr(self, name) + n)

    _COUNTED = ("total", "created", "updated", "unchanged", "conflict", "rejected")

    def snapshot(self) -> dict[str, Any]:
        with self._guard:
            return {**{k: getattr(self, k) for k in self._COUNTED},
                    "errors": list(self.errors), "conflicts": list(self.conflicts), "rejects": list(self.rejects),
                    "by_type": {k: Counter(v) for k, v in self.by_type.items()}}

    def restore(self, saved: dict[str, Any]) -> None:
        with self._guard:
            for k in self._COUNTED:
                setattr(self, k, saved[k])
            self.errors, self.conflicts, self.rejects = saved["errors"], saved["conflicts"], saved["rejects"]
            self.by_type = defaultdict(Counter, saved["by_type"])

    @property
    def summary_line(self) -> str:
        return (f"created {self.created}, updated {self.updated}, unchanged {self.unchanged}, "
                f"conflict {self.conflict}, rejected {self.rejected}, total {self.total}")


# --- grouping and chunking --------------------------------------------------------------

def case_of(resource: Resource, mapping: MappingSpec) -> str | None:
    sys = mapping.identifier_systems
    case = identifier_value(resource, sys.case)
    if case:
        return case
    part = identifier_value(resource, sys.resource)
    return part.rsplit(":", 1)[0] if part and ":" in part else None


@dataclass
class Group:
    """Resources that travel together: one case and the Patient(s) it brings first."""

    case_id: str | None
    resources: list[Resource]


def group_resources(resources: Iterable[Resource], mapping: MappingSpec) -> Iterator[Group]:
    """Consecutive resources of one case form a group; a Patient joins the case after it."""
    pending: list[Resource] = []
    current: Group | None = None
    for res in resources:
        if res.get("resourceType") == "Patient" and identifiers(res):
            if current is not None:
                yield current
                current = None
            pending.append(res)
            continue
        case = case_of(res, mapping)
        if current is not None and (case is None or case != current.case_id):
            yield current
            current = None
        if current is None:
            current = Group(case, pending)
            pending = []
        current.resources.append(res)
        if case is None:
            yield current
            current = None
    if current is not None:
        yield current
    if pending:
        yield Group(None, pending)


def chunk_groups(groups: Iterable[Group], size: int) -> Iterator[list[Group]]:
    """Chunks of whole groups with at most `size` entries (a larger group goes alone)."""
    chunk: list[Group] = []
    n = 0
    for group in groups:
        k = len(group.resources)
        if chunk and n + k > size:
            yield chunk
            chunk, n = [], 0
        chunk.append(group)
        n += k
    if chunk:
        yield chunk


def windows(groups: Iterable[Group], size: int, window: int, *, together: bool = False) -> Iterator[list[list[Group]]]:
    """Windows of chunks: each window holds chunks of whole groups (at most `size` entries each)
    until it holds `window` distinct resources; a window's server copies are read together.

    `together` (bundles sent concurrently): within a window, groups that reference one another
    (a patient's later cases reference the Patient written with the first) share a chunk where
    they fit, in the order given. Sent at once, the window's bundles then wait only for earlier
    windows', not for each other. Without it the chunks are the groups in the order given, as a
    sequential push sends them."""
    if not together:
        chunks: list[list[Group]] = []
        keys: set[str] = set()
        for chunk in chunk_groups(groups, size):
            chunks.append(chunk)
            keys.update(_key_of(r) for g in chunk for r in g.resources)
            if len(keys) >= window:
                yield chunks
                chunks, keys = [], set()
        if chunks:
            yield chunks
        return
    held: list[Group] = []
    keys = set()
    for group in groups:
        held.append(group)
        keys.update(_key_of(r) for r in group.resources)
        if len(keys) >= window:
            chunks = _pack(held, size)
            # a last chunk not full waits for the next window's groups (as many bundles as in order)
            held = chunks.pop() if len(chunks) > 1 and sum(len(g.resources) for g in chunks[-1]) < size else []
            keys = {_key_of(r) for g in held for r in g.resources}
            yield chunks
    if held:
        yield _pack(held, size)


def _key_of(res: Resource) -> str:
    """`Type/id`: how push, its windows and its flight name a resource."""
    return f"{res['resourceType']}/{res['id']}"


def _pack(groups: list[Group], size: int) -> list[list[Group]]:
    """Chunks of at most `size` entries in which groups that reference one another stay together
    (first fit, cluster by cluster, never two holders of one resource in a chunk; a cluster larger
    than a chunk is chunked in order)."""
    parent = list(range(len(groups)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    holder: dict[str, int] = {}
    for i, g in enumerate(groups):
        for r in g.resources:
            holder.setdefault(_key_of(r), i)
    for i, g in enumerate(groups):
        for ref in _literal_refs(g.resources):
            j = holder.get(ref)
            if j is not None:
                parent[root(i)] = root(j)
    clusters: dict[int, list[Group]] = {}
    for i, g in enumerate(groups):  # dicts keep the order of first members
        clusters.setdefault(root(i), []).append(g)
    chunks: list[list[Group]] = []
    room: list[int] = []
    held: list[set[str]] = []
    for members in clusters.values():
        keys = [_key_of(r) for g in members for r in g.resources]
        if len(keys) > size or len(set(keys)) < len(keys):  # in order, as a sequential push
            for chunk in chunk_groups(members, size):
                chunks.append(chunk)
                room.append(size - sum(len(g.resources) for g in chunk))
                held.append({_key_of(r) for g in chunk for r in g.resources})
            continue
        for at, free in enumerate(room):
            if free >= len(keys) and held[at].isdisjoint(keys):
                chunks[at].extend(members)
                room[at] -= len(keys)
                held[at].update(keys)
                break
        else:
            chunks.append(list(members))
            room.append(size - len(keys))
            held.append(set(keys))
    return chunks


def reference_levels(resources: list[Resource]) -> list[list[Resource]]:
    """Split resources into levels so each only references earlier levels (batch mode)."""
    keys = {f"{r['resourceType']}/{r['id']}": r for r in resources}
    level: dict[str, int] = {}

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "reference" and isinstance(v, str):
                    yield "/".join(v.split("/")[-2:])
                else:
                    yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    def depth(key: str, seen: frozenset[str]) -> int:
        if key in level:
            return level[key]
        inside = [r for r in refs(keys[key]) if r in keys and r != key and r not in seen]
        value = 1 + max((depth(r, seen | {key}) for r in inside), default=-1)
        level[key] = value
        return value

    out: list[list[Resource]] = []
    for key, res in keys.items():
        d = depth(key, frozenset())
        while len(out) <= d:
            out.append([])
        out[d].append(res)
    return [lv for lv in out if lv]


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Produce items in a background thread while the caller works on the previous ones.

    Pipelines chunk building (reading, mapping, validating, grouping) with sending: the
    network wait releases the GIL. Order is kept; an error in the producer is re-raised here.
    """
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(("item", item))
            q.put(("end", None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            q.put(("error", exc))

    worker = threading.Thread(target=produce, name="ruxo-push-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)


# --- the pusher -------------------------------------------------------------------------

def _entry_issues(response: dict[str, Any]) -> tuple[OutcomeIssue, ...]:
    """The issues of a batch entry's `response.outcome` (none when it has no OperationOutcome)."""
    from ruxo_fhir.transport.outcome import structured_issues

    outcome = response.get("outcome")
    return structured_issues(outcome) if isinstance(outcome, dict) else ()


def _server_id_of(response: dict[str, Any], kind: str) -> str | None:
    """The id the server holds a written resource under, from `location` (Type/id[/_history/n])."""
    location = str(response.get("location") or "").split("?")[0]
    parts = location.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == kind and parts[-1]:
        return parts[-1]
    return None


# A refusal of a client-assigned id on a PUT that would create, decided on the HTTP status and the
# OperationOutcome issue codes:
# - 405, whatever the body: FHIR R4's own answer (http.html#update: "the resource did not exist
#   prior to the update, and the server does not allow client defined ids");
# - 404 with an issue coded `processing`, `exception` or `not-found` (none `not-supported`): HAPI
#   FHIR 8.8 with client ids off (ClientIdStrategy NOT_ALLOWED) answers a PUT and a transaction
#   404 `processing`, a batch entry 404 `exception` ("HAPI-0959: No resource exists on this server
#   resource with ID[..], and client-assigned IDs are not enabled."; the shapes, captured from a
#   real run, are in tests/test_push_decisions.py); the Medplum test front's `no_client_ids` answers
#   the first shape. Those codes are HAPI's for any failure, so the 404 decides, and it can: push
#   asks only about a write that would create, of a type the CapabilityStatement declares (checked
#   before any write), which leaves out HAPI's other 404 on a PUT (HAPI-0302, unknown type).
# The wording is not read: neither real server needs it (HAPI's message code says no more than its
# 404 on a create does). A server that says this only in prose under another status gets the
# entry rejected with its message, which names --ids server.
_CLIENT_IDS_REFUSED_CODES = frozenset({"processing", "exception", "not-found"})


def refuses_client_ids(status: int | None, issues: Iterable[OutcomeIssue]) -> bool:
    """A write that would create under a client-assigned id was refused for that reason."""
    if status == 405:
        return True
    codes = {i.code for i in issues}
    return status == 404 and bool(codes & _CLIENT_IDS_REFUSED_CODES) and "not-supported" not in codes


class _ClientIdsRefused(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def is_loopback(base_url: str) -> bool:
    """True for a server on this machine (localhost, 127.0.0.0/8, ::1); names are not resolved."""
    import ipaddress
    from urllib.parse import urlsplit

    host = (urlsplit(base_url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def shared_systems_warning(mapping: MappingSpec, base_url: str) -> str | None:
    """A warning when the mapping still uses the shipped `*.example` identifier systems against
    a server that is not on loopback: another site with the same systems and case ids would
    name the same resources (team B's "C01" replacing team A's)."""
    systems = mapping.example_identifier_systems()
    if not systems or is_loopback(base_url):
        return None
    return (f"the mapping still uses the shipped example identifier systems ({', '.join(systems)}); on a "
            "shared server they collide with every other site that kept them: give identifier_systems "
            "your own site's URIs (mappings/README.md)")


def update_create_refused(caps: Capabilities, types: Iterable[str]) -> list[str]:
    """Types whose CapabilityStatement entry says `updateCreate: false` (no client ids)."""
    return sorted(t for t in set(types) if t in caps.resources and caps.resources[t].update_create is False)


def identifier_searchable(caps: Capabilities) -> dict[str, bool]:
    """Per declared type: can it be searched by `identifier`? (R4 AdverseEvent cannot.)
    Types whose entry lists no search parameters at all are assumed searchable."""
    return {t: not r.search_params or "identifier" in r.search_params for t, r in caps.resources.items()}


@dataclass
class Decision:
    """What push does with one resource: create | update | unchanged | conflict | linked."""

    action: str
    ident: Identity
    server_id: str | None = None
    version: str | None = None  # If-Match for an update
    note: str = ""
    last_updated: str | None = None


@dataclass
class PushReject:
    case_id: str | None
    row: int | None
    reason: str


@dataclass(frozen=True)
class _Ahead:
    """Server copies read ahead of a window's decisions, and the id strategy they were read under."""

    ids: str
    found: dict[Identity, list[ServerCopy]]


@dataclass
class _Window:
    """A window's chunks, hashes and the counts before it (a restart under server ids)."""

    chunks: list[list[Group]]
    hashes: dict[str, str]
    saved: dict[str, Any]
    safe: bool  # decided under client ids, every type already accepted a create under one


class _Bundle:
    """A bundle given to `_Flight`: its resources' keys, the earlier bundles it waits for."""

    __slots__ = ("deps", "keys", "landed", "send")

    def __init__(self, keys: list[str], deps: set[_Bundle], send: Callable[[], None]) -> None:
        self.keys = keys
        self.deps = deps
        self.send = send
        self.landed = False


class _Flight:
    """Up to `limit` bundles in flight on sending threads, in reference order.

    A bundle is sent only after every earlier bundle holding a resource it references
    (`Type/id`) has landed, so a server checking referential integrity sees the order a
    sequential push gives it. A bundle that waits for nothing is not held up behind one that
    waits (a patient's later case would otherwise stall the cases after it). Up to `2 * limit`
    bundles wait their turn, then `submit` blocks; only the keys of waiting and in-flight
    bundles are kept (memory stays flat). The first error stops new sends: bundles already sent
    finish (and are recorded), waiting ones are dropped, then the error is raised, as a
    sequential push would raise it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="ruxo-push")
        self._cv = threading.Condition(threading.RLock())
        self._holder: dict[str, _Bundle] = {}  # Type/id -> the waiting or in-flight bundle holding it
        self._waiting: list[_Bundle] = []  # in the order given
        self._running = 0
        self._error: BaseException | None = None

    def __enter__(self) -> _Flight:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:  # an error (or Ctrl-C) in the deciding thread: nothing new is sent
            with self._cv:
                self._drop_waiting()
        try:  # never leave threads sending after an error; the first error is the one raised
            self.finish()
        except BaseException:
            if exc_type is None:
                raise
        finally:
            self._pool.shutdown(wait=True)

    def submit(self, resources: list[Resource], send: Callable[[], None]) -> None:
        keys = [_key_of(r) for r in resources]
        refs = _literal_refs(resources)
        with self._cv:
            self._raise_error()
            # after the bundles holding what it references, and any holding the same resources
            # (a resource given twice is written in the order given)
            bundle = _Bundle(keys, {h for k in (*refs, *keys) for h in [self._holder.get(k)] if h is not None},
                             send)
            for key in keys:
                self._holder[key] = bundle
            self._waiting.append(bundle)
            self._start()
            while len(self._waiting) >= 2 * self.limit and self._error is None:
                self._cv.wait()
            self._raise_error()

    def finish(self) -> None:
        """Wait for every bundle; raise the first error."""
        with self._cv:
            while self._waiting or self._running:
                self._cv.wait()
            self._raise_error()

    def wait_for(self, keys: Iterable[str]) -> None:
        """Wait until no bundle waiting or in flight holds one of these resources; raise the
        first error."""
        wanted = set(keys)
        with self._cv:
            while any(k in self._holder for k in wanted) and self._error is None:
                self._cv.wait()
            self._raise_error()

    def busy(self) -> bool:
        with self._cv:
            return bool(self._waiting or self._running)

    def holds(self, keys: Iterable[str]) -> bool:
        """Whether a bundle waiting or in flight holds one of these resources (`Type/id`)."""
        with self._cv:
            return any(k in self._holder for k in keys)

    def _start(self) -> None:
        """Send waiting bundles whose earlier bundles have landed, in order, up to the limit."""
        if self._error is not None:
            return
        i = 0
        while self._running < self.limit and i < len(self._waiting):
            bundle = self._waiting[i]
            if all(d.landed for d in bundle.deps):
                del self._waiting[i]
                bundle.deps = set()
                self._pool.submit(self._fly, bundle)  # _fly waits for this lock to count it landed
                self._running += 1
            else:
                i += 1

    def _fly(self, bundle: _Bundle) -> None:
        error: BaseException | None = None
        try:
            bundle.send()
        except BaseException as exc:  # handed to the thread that submits or finishes
            error = exc
        with self._cv:
            self._running -= 1
            bundle.landed = True
            for key in bundle.keys:
                if self._holder.get(key) is bundle:
                    del self._holder[key]
            if error is not None and self._error is None:
                self._error = error
            if self._error is not None:  # no new sends; waiting bundles are dropped
                self._drop_waiting()
            else:
                self._start()
            self._cv.notify_all()

    def _drop_waiting(self) -> None:
        for waiting in self._waiting:
            for key in waiting.keys:
                if self._holder.get(key) is waiting:
                    del self._holder[key]
        self._waiting.clear()
        self._cv.notify_all()

    def _raise_error(self) -> None:
        """Raise the error met by a sending thread (once), after the bundles in flight landed."""
        if self._error is None:
            return
        while self._running:
            self._cv.wait()
        error, self._error = self._error, None
        raise error


def _literal_refs(resources: list[Resource]) -> set[str]:
    """`Type/id` of every literal reference in the resources (conditional ones left out)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if type(node) is dict:
            for k, v in node.items():
                if k == "reference" and type(v) is str:
                    if "?" not in v:
                        found.add("/".join(v.split("/")[-2:]))
                elif type(v) in (dict, list):
                    walk(v)
        elif type(node) is list:
            for v in node:
                walk(v)

    for res in resources:
        walk(res)
    return found


class Pusher:
    """Pushes a stream of resources; one instance per run."""

    def __init__(self, client: Client, mapping: MappingSpec, options: PushOptions,
                 ledger: Ledger | None = None, on_progress: Callable[[int], None] | None = None,
                 case_rows: dict[str, int] | None = None,
                 on_decided: Callable[[Resource, str], None] | None = None) -> None:
        self.client = client
        self.mapping = mapping
        self.opt = options
        self.ledger = ledger if options.use_ledger else None
        self.on_progress = on_progress or (lambda n: None)
        self.on_decided = on_decided
        self.case_rows = case_rows if case_rows is not None else {}  # filled as the source streams
        self.result = PushResult(mode=options.mode, batch_size=options.batch_size)
        self.ids = "client" if options.ids == "client" else "server" if options.ids == "server" else "client"
        self.server = client.base_url
        # derived local key (Type/id) -> server reference (Type/server-id), for referenced types
        self.sids: dict[str, str] = {}
        # link mode: conditional reference -> the EHR's Patient (Type/id)
        self.links: dict[str, str] = {}
        self.decisions: dict[str, Decision] = {}
        self.group_rejects: dict[int, str] = {}
        self.searchable: dict[str, bool] = {}  # per type: can it be searched by identifier?
        self.search_declared: dict[str, bool] = {}  # per type: is search-type declared at all?
        self._sent: dict[str, Resource] = {}  # bodies in flight (a read-back compares with them)
        # every identity and case the source produces (what a prune must keep)
        self.produced: set[str] = set()
        self.cases: set[str] = set()
        self._validator: Validator | None = None
        # Bookkeeping (counts, notices, ledger, chunk size, mode) is shared by the sending
        # threads of `concurrency > 1`; it changes only under this lock.
        self._lock = threading.RLock()
        self._flight: _Flight | None = None
        self._unlanded: list[_Window] = []  # windows decided whose bundles may not all have landed
        self._client_ids_ok: set[str] = set()  # types with a create under a client id landed

    # -- entry point ---------------------------------------------------------------------
    def run(self, resources: Iterable[Resource]) -> PushResult:
        statement = self.client.capabilities()
        warning = check_version(statement, self.opt.version)
        if warning:
            self._notice(warning)
        self.caps = Capabilities.read(statement)
        self.version_guard = DataVersionGuard(self.caps.fhir_version)
        self.checked_types: set[str] = set()
        interactions = set(self.caps.system_interactions)
        if self.opt.mode == "transaction" and interactions and "transaction" not in interactions:
            if "batch" not in interactions:
                raise CapabilityError("server declares neither transaction nor batch interactions")
            if self.opt.mode_explicit:
                raise CapabilityError("server does not support transactions; use --mode batch")
            self._switch_to_batch("server declares batch but not transaction")
        self.searchable = identifier_searchable(self.caps)
        # the reads before writing: one batch of searches and reads where the server declares
        # `batch`, else one transaction of searches where it declares `transaction`, else plain
        # GETs, as many at once as bundles may be in flight
        self.searcher = Searcher(self.client, batch="batch" in interactions, workers=self.opt.concurrency,
                                 readable=lambda kind: self.caps.missing_interactions(kind, ("read",)) == [],
                                 transaction="transaction" in interactions)
        shared = shared_systems_warning(self.mapping, self.server)
        if shared:
            self._notice(shared)
        if self.opt.ids == "auto":
            refused = update_create_refused(self.caps, WRITTEN_TYPES)
            if refused:
                self._use_server_ids(f"the CapabilityStatement says updateCreate false ({', '.join(refused)})")
        self.result.ids = self.ids
        try:
            if self.opt.concurrency > 1:
                with _Flight(self.opt.concurrency) as self._flight:
                    self._push_all(resources)
                    self._land()
                self._flight = None
            else:
                self._push_all(resources)
        except CapabilityError as exc:  # the data or a type this server cannot take: say what landed
            written = self.result.created + self.result.updated + self.result.unchanged
            raise CapabilityError(f"{exc.reason}; " + (f"{written} entries were written or confirmed before this, "
                                  "the rest not" if self.result.bundles_sent else "nothing was written"),
                                  status=exc.status, issues=exc.issues, url=exc.url) from None
        if self.opt.prune or self.opt.check_retractions:
            self._retractions()
        return self.result

    def _push_all(self, resources: Iterable[Resource]) -> None:
        # Server copies are read for a window of several chunks at once (fewer, fuller
        # searches); memory stays bounded by the window.
        # Bundles sent concurrently keep a patient's cases together (they would wait for each other).
        groups = group_resources(resources, self.mapping)
        together = self.opt.concurrency > 1 and self.opt.mode == "transaction"
        for window, hashes in prefetch(self._hashed(windows(groups, self.result.batch_size, LEDGER_WINDOW,
                                                            together=together)), depth=2):
            self._push_window(window, hashes)

    def _retractions(self) -> None:
        """Cohort resources on the server the source no longer produces: counted, listed
        (dry run) or retracted (`prune`), behind the guard."""
        from ruxo_fhir.sync.prune import find_retractable, retract

        blind = [k for k in WRITTEN_TYPES if k in self.caps.resources and not self._can_search(k)]
        if blind:  # the cohort cannot be read back: nothing to count, nothing retracted on guesswork
            if self.opt.prune:
                self.result.prune_refused = (f"--prune refused: the server declares no search for "
                                             f"{', '.join(blind)}, so the cohort on it cannot be read")
            return
        if self._cohort_is_ours():
            return
        found = find_retractable(self.client, self.mapping, self.produced, self.cases)
        self.result.cohort_on_server = found.cohort
        self.result.retractable = [r.line() for r in found.found]
        n = len(found.found)
        if not n:
            return
        if not self.opt.prune:
            self._notice(f"{n} cohort resource(s) on the server are no longer produced by the source "
                         "(removed cases); push --prune retracts them (--dry-run --prune lists them)")
            return
        if self.opt.source_rejected_rows:
            self.result.prune_refused = (
                f"--prune refused: the source has {self.opt.source_rejected_rows} rejected row(s), and a "
                "rejected row is not a removed case; fix those rows first")
        elif found.percent > self.opt.prune_max:
            self.result.prune_refused = (
                f"--prune refused: it would retract {n} of {found.cohort} cohort resources "
                f"({found.percent:.1f} % > {self.opt.prune_max:g} %); a wrong or partial source must not "
                "wipe a registry: check the input, or pass --prune-max PERCENT")
        if self.result.prune_refused or self.opt.dry_run:
            return
        retract(self.client, found.found, found, self.ledger)
        self.result.retracted = found.retracted
        self.result.errors.extend(found.errors)

    def _cohort_is_ours(self) -> bool:
        """Whether the server holds exactly what this push produced, told by counts per type
        instead of reading the whole cohort back (which costs as much as the push on a large one).

        Only after a push that landed everything it produced (nothing rejected, no conflict, no
        error, not a dry run): then every produced resource is on the server with our systems, so
        equal counts mean equal sets; anything else on the server (a removed case, an
        entered-in-error copy, an outcome write-back, a duplicate) makes a count larger, and
        any doubt reads the cohort as before."""
        from ruxo_fhir.sync.prune import cohort_counts

        r, sys = self.result, self.mapping.identifier_systems
        if self.opt.dry_run or r.rejected or r.conflict or r.errors or not self.produced:
            return False
        expected: Counter[str] = Counter()
        for key in self.produced:
            kind, system, _ = key.split("|", 2)
            if kind != "Patient" and system in (sys.case, sys.resource):
                expected[kind] += 1
        kinds = [k for k in PART_TYPES if k in self.caps.resources or k in expected]
        if set(expected) - set(kinds):
            return False
        # Whole types first: equal to ours means the same too (all of ours are there), and an
        # engine without a token index (Medplum's in-memory one: ~100x) answers it without
        # reading every resource; a server holding more (a shared EHR) is asked by identifier.
        def equal(counts: dict[str, int] | None) -> bool:
            return counts is not None and all(counts[k] == expected[k] for k in kinds)

        if not equal(cohort_counts(self.client, self.mapping, kinds, self.searcher, whole=True)) \
                and not equal(cohort_counts(self.client, self.mapping, kinds, self.searcher)):
            return False
        r.cohort_on_server = sum(expected.values())
        return True

    def _preflight(self, types: set[str]) -> None:
        """The capability pre-flight, before the first write of each type (for the id strategy
        in use; link mode writes no Patient)."""
        new_types = types - self.checked_types
        if self.mapping.patients.mode == "link":
            new_types.discard("Patient")
        if new_types:
            preflight_types(self.caps, new_types, self.ids)
            self.checked_types |= new_types

    def _use_server_ids(self, why: str) -> None:
        self.ids = "server"
        self.result.ids = "server"
        self._notice(f"using server-assigned ids (--ids server): {why}; resources are written by identifier")

    def _hashed(self, windows: Iterable[list[list[Group]]]) -> Iterator[tuple[list[list[Group]], dict[str, str]]]:
        """Content hashes are computed in the prefetch thread, off the sending path; so is the
        data's FHIR version check (before the window holding a resource is written)."""
        check = self.version_guard.check
        for window in windows:
            for chunk in window:
                for g in chunk:
                    for r in g.resources:
                        check(r)
            yield window, {self._key(r): content_hash(r) for chunk in window for g in chunk for r in g.resources}

    def _push_window(self, window: list[list[Group]], hashes: dict[str, str]) -> None:
        ahead = self._read_ahead(window)  # while the previous window's bundles are in flight
        types = {key.split("/", 1)[0] for key in hashes}
        switch = self.opt.ids == "auto" and self.ids == "client" and self._remembered_server_ids(window)
        # The previous window's bundles keep flying while this one is decided and sent when
        # nothing here depends on them landing: copies read ahead by client id (what those
        # bundles write cannot change them; references name client ids, no server id is
        # learned), no change of id strategy, and no window in play can meet a refusal of
        # client ids (each type has had a create under a client id land in this run). Otherwise
        # every bundle lands first, as with one window at a time.
        overlap = ahead is not None and ahead.ids == self.ids == "client" and not switch \
            and types <= self._client_ids_ok and all(w.safe for w in self._unlanded)
        self._land(keep=1 if overlap else 0)
        if switch and self.ids == "client":
            self._use_server_ids("the server assigned the ids of what this workstation pushed there before "
                                 "(push ledger)")
        self._preflight(types)
        self._unlanded.append(_Window(window, hashes, self.result.snapshot(),
                                      safe=self.ids == "client" and types <= self._client_ids_ok))
        try:
            self._decide([g for chunk in window for g in chunk], ahead)
            for chunk in window:
                self._push_chunk(chunk, hashes)
        except _ClientIdsRefused as exc:
            self._restart(exc)

    def _land(self, keep: int = 0) -> None:
        """Wait until every window but the last `keep` has landed (concurrency > 1), then forget
        their decisions; a refusal of client ids met there restarts the windows not landed under
        server ids, as when it is met while sending."""
        try:
            if self._flight is not None and keep:
                for w in self._unlanded[:-keep]:
                    self._flight.wait_for(self._key(r) for chunk in w.chunks for g in chunk for r in g.resources)
            elif self._flight is not None:
                self._flight.finish()
        except _ClientIdsRefused as exc:
            self._restart(exc)
            if self._flight is not None:
                self._flight.finish()
            keep = 0
        landed = self._unlanded[:len(self._unlanded) - keep]
        del self._unlanded[:len(landed)]
        for w in landed:  # what the sending threads looked up while these flew
            self._forget(w, decisions=True)

    def _forget(self, w: _Window, *, decisions: bool) -> None:
        """Drop a window's group rejects (and decisions): they are looked up by the sending
        threads until its bundles land, and decided anew on a restart."""
        for chunk in w.chunks:
            for g in chunk:
                self.group_rejects.pop(id(g), None)
                if decisions:
                    for r in g.resources:
                        self.decisions.pop(self._key(r), None)

    def _restart(self, exc: _ClientIdsRefused) -> None:
        """The server refuses client-assigned ids: the window again, decided and written under
        server ids, its counts as before it. Its other bundles land first."""
        if self.opt.ids != "auto" or self.ids == "server":
            raise ServerError(f"the server refuses client-assigned ids ({exc.detail}); "
                              "use --ids server (or auto)") from None
        if self._flight is not None:  # raises nothing more: the flight raised its error once
            self._flight.finish()
        if len(self._unlanded) != 1:  # windows overlapped: only after client-id creates had landed
            raise ServerError(f"the server refused a client-assigned id ({exc.detail}) after accepting others "
                              "in this run; what landed is recorded in the ledger: push again with --ids "
                              "server") from None
        w = self._unlanded[0]
        self.result.restore(w.saved)
        self._use_server_ids(f"the server refused a client-assigned id ({exc.detail})")
        self.checked_types.clear()
        self._preflight({key.split("/", 1)[0] for key in w.hashes})
        self._forget(w, decisions=False)
        self._decide([g for chunk in w.chunks for g in chunk])
        for chunk in w.chunks:
            self._push_chunk(chunk, w.hashes)

    def _read_ahead(self, window: list[list[Group]]) -> _Ahead | None:
        """The server copies of a window, read while the previous window's bundles are in flight
        (concurrency > 1), so the reads do not wait for them. Only what those bundles cannot
        change: none of the window's resources is in flight, the copies are found by id or
        identifier (by subject needs the server ids the previous window learns), the search
        capability of each type is known already, link mode (its Patients) is not in play. `_decide`
        uses them only if the id strategy is still the one they were read under."""
        flight = self._flight
        if flight is None or self.mapping.patients.linked or not flight.busy():
            return None
        resources = [r for chunk in window for g in chunk for r in g.resources]
        if any(r["resourceType"] not in self.search_declared for r in resources) \
                or flight.holds(self._key(r) for r in resources):
            return None
        return _Ahead(self.ids, self._copy_query(resources).run(self.searcher))

    def _copy_query(self, resources: list[Resource]) -> CopyQuery:
        """The searches finding the copies of these resources by identifier or id (one batch
        request where the server takes one)."""
        query = CopyQuery()
        searchable = [r for r in resources if self.search_declared.get(r["resourceType"])]
        query.by_identifier([self._identity(r) for r in searchable if self._by_identifier(r)
                             and self.searchable.get(r["resourceType"], True)])
        query.by_id({self._key(r): self._identity(r) for r in searchable if not self._by_identifier(r)})
        return query

    def _remembered_server_ids(self, window: list[list[Group]]) -> bool:
        """`auto` where the statement is silent (HAPI says updateCreate true whatever its id
        strategy): whether ids this workstation's ledger holds that the server chose, not ours, mean the
        resources live under server-assigned ids -- a dry run (which never meets the refusal of a
        PUT-create) plans with them, and a push never writes derived-id duplicates."""
        if self.ledger is None:
            return False
        derived = {ident.key: str(r.get("id")) for chunk in window for g in chunk for r in g.resources
                   for ident in [self._identity(r)] if ident.system}
        return any(w.server_id and w.server_id != derived[k] for k, w in self.ledger.written(self.server, derived).items())

    def _notice(self, text: str) -> None:
        log.warning(text)
        with self._lock:
            self.result.notices.append(text)

    def _switch_to_batch(self, why: str) -> None:
        with self._lock:
            if self.result.mode == "batch":  # another sending thread found out first
                return
            self.result.mode = "batch"
            self._notice(f"switching to batch mode: {why}")

    # -- deciding ------------------------------------------------------------------------
    def _identity(self, res: Resource) -> Identity:
        ident = identity_of(res, self.mapping)
        if ident is None:  # not one of ours: named by its id (client ids only)
            ident = Identity(str(res["resourceType"]), "", str(res.get("id")))
        return ident

    def _can_search(self, kind: str) -> bool:
        """Whether the statement allows the search that finds the server's copies of a type; when
        it does not, that type is always sent (once said), never skipped on trust."""
        if kind not in self.search_declared:
            missing = self.caps.missing_interactions(kind, ("search-type",))
            self.search_declared[kind] = not missing
            if missing:
                self._notice(f"the server declares no search for {kind}: its resources are sent on every "
                             "push (push cannot check the server's copy)")
        return self.search_declared[kind]

    def _by_identifier(self, res: Resource) -> bool:
        """Server copies are found by identifier (server ids, or a Patient in link modes)."""
        return self.ids == "server" or (res["resourceType"] == "Patient" and self.mapping.patients.linked)

    def _decide(self, groups: list[Group], ahead: _Ahead | None = None, *, again: bool = False) -> None:
        """Read the server's copies of every resource of these groups (batched searches; those
        read ahead under the id strategy still in use are not read again) and decide for each:
        create, update (If-Match), unchanged, conflict, or reject its case.

        `again` (a sending thread deciding its own chunk anew) replaces only these groups'
        decisions in place: the other sending threads keep reading theirs meanwhile."""
        resources = [r for g in groups for r in g.resources]
        if again:
            for r in resources:
                self.decisions.pop(self._key(r), None)
            for g in groups:
                self.group_rejects.pop(id(g), None)
        self._resolve_links(groups)
        idents = {self._key(r): self._identity(r) for r in resources}
        if self.opt.prune or self.opt.check_retractions:
            self.produced.update(i.key for i in idents.values())
            self.cases.update(g.case_id for g in groups if g.case_id)
        for r in resources:
            if self.ids == "server" and not idents[self._key(r)].system:
                self._reject_in(groups, r, f"{self._key(r)} carries no identifier of the mapping's systems; "
                                "server-assigned ids need one")
        blind = [r for r in resources if not self._can_search(r["resourceType"])]
        for r in blind:  # sent every time: PUT at its id, or a conditional create the server resolves
            self._decided(r, Decision("update" if self.ids == "client" else "create", idents[self._key(r)]))
        resources = [r for r in resources if self._can_search(r["resourceType"])]
        # One read for every copy found by identifier or id (one batch request where the server
        # takes one); by subject only after the Patients are decided (it needs their server ids).
        found = dict(ahead.found) if ahead is not None and ahead.ids == self.ids \
            else self._copy_query(resources).run(self.searcher)
        written = self.ledger.written(self.server, [i.key for i in idents.values()]) if self.ledger else {}
        patients = [r for r in resources if r["resourceType"] == "Patient"]
        others = [r for r in resources if r["resourceType"] != "Patient"]
        for r in patients:
            self._decide_one(r, idents[self._key(r)], found.get(idents[self._key(r)], []), written, groups)
        by_subject = [r for r in others if self._by_identifier(r) and not self.searchable.get(r["resourceType"], True)]
        if by_subject:
            query = CopyQuery()
            for kind in sorted({r["resourceType"] for r in by_subject}):
                subjects = [s for r in by_subject if r["resourceType"] == kind
                            for s in [self._resolve(r.get("subject", {}).get("reference", ""))] if s]
                query.by_subject(kind, subjects, [idents[self._key(r)] for r in by_subject if r["resourceType"] == kind])
            found.update(query.run(self.searcher))
        for r in others:
            self._decide_one(r, idents[self._key(r)], found.get(idents[self._key(r)], []), written, groups)

    def _decide_one(self, res: Resource, ident: Identity, copies: list[ServerCopy],
                    written: dict[str, Written], groups: list[Group]) -> None:
        key = self._key(res)
        kind = res["resourceType"]
        if len(copies) > 1:
            self._reject_in(groups, res, f"{len(copies)} {kind} resources on the server carry identifier "
                            f"{ident.token}; never a guess: merge or retract the duplicates on the server first")
            return
        copy = copies[0] if copies else None
        if copy is not None and kind in REFERENCED_TYPES:
            self.sids[key] = f"{kind}/{copy.id}"
        if kind == "Patient" and self.mapping.patients.linked:
            # the EHR's Patient: referenced, never changed; link-or-create creates a missing one
            self._decided(res, Decision("linked", ident, copy.id) if copy else Decision("create", ident))
            return
        if copy is None:
            self._decided(res, Decision("create", ident))
            return
        ours = as_written(res, copy.id, self._resolve)
        if same_content(ours, copy.body):
            self._decided(res, Decision("unchanged", ident, copy.id, copy.version, last_updated=copy.last_updated))
            return
        last = written.get(ident.key)
        # our own last write, untouched since: same server id, version AND lastUpdated (serial
        # version ids start again at 1 on a reset server someone else refilled)
        ours_last = last is not None and last.version_id is not None and last.version_id == copy.version \
            and last.server_id in (None, copy.id) \
            and (last.last_updated is None or same_instant(last.last_updated, copy.last_updated))
        if ours_last or self.opt.on_conflict == "overwrite":
            self._decided(res, Decision("update", ident, copy.id, copy.version))
            return
        why = ("changed on the server since this workstation last wrote it" if last is not None
               else "already on the server with other content (another team, workstation or an EHR edit)")
        self._decided(res, Decision("conflict", ident, copy.id, copy.version,
                                    f"{why}; differs in {what_differs(ours, copy.body)}"))

    def _decided(self, res: Resource, decision: Decision) -> None:
        self.decisions[self._key(res)] = decision

    def _reject_in(self, groups: list[Group], res: Resource, reason: str) -> None:
        for g in groups:
            if any(r is res for r in g.resources):
                self.group_rejects.setdefault(id(g), reason)

    def _resolve_links(self, groups: list[Group]) -> None:
        """Link mode: every conditional Patient reference resolved first (batched searches);
        a case whose Patient is missing or found more than once is rejected."""
        wanted: dict[str, Identity] = {}
        for g in groups:
            for r in g.resources:
                for ref in references(r):
                    linked = conditional_identifier(ref)
                    if linked and ref not in self.links:
                        wanted[ref] = Identity(*linked)
        if not wanted:
            return
        found = find_by_identifier(self.client, wanted.values(), self.searcher)
        missing: dict[str, str] = {}
        for ref, ident in wanted.items():
            copies = found.get(ident, [])
            if len(copies) == 1:
                self.links[ref] = f"{ident.kind}/{copies[0].id}"
            else:
                missing[ref] = (f"patient {ident.value} not found on the server ({ref})" if not copies else
                                f"patient {ident.value} found {len(copies)} times on the server ({ref}); "
                                "never a guess")
        for g in groups:
            reason = next((missing[ref] for r in g.resources for ref in references(r) if ref in missing), None)
            if reason:
                self.group_rejects.setdefault(id(g), reason)

    def _resolve(self, reference: str, urns: dict[str, str] | None = None) -> str | None:
        """The reference as the server should read it: link targets, urn:uuid of a create in
        the same transaction, the server id of a known resource; None leaves it as it is."""
        if reference in self.links:
            return self.links[reference]
        key = local_key(reference)
        if key is None:
            return None
        if urns and key in urns:
            return urns[key]
        return self.sids.get(key)

    # -- one chunk -----------------------------------------------------------------------
    def _push_chunk(self, chunk: list[Group], hashes: dict[str, str]) -> None:
        self.result.add("total", sum(len(g.resources) for g in chunk))
        chunk = [g for g in map(self._valid_group, chunk) if g is not None]
        todo = self._to_send(chunk, hashes, first=True)
        if todo:
            if self._flight is not None:
                self._flight.submit([r for g in todo for r in g.resources], lambda: self._send(todo, hashes))
            else:
                self._send(todo, hashes)

    def _to_send(self, groups: list[Group], hashes: dict[str, str], *, first: bool,
                 landed: dict[str, Decision] | None = None) -> list[Group]:
        """Settle what the decisions leave unwritten (a rejected case, unchanged or linked copies,
        conflicts; a dry run counts the rest) and return the groups still to send. `first` is the
        first look at these decisions (told to `on_decided`); a re-decision after a doubtful write
        is not told again. `landed`: the decisions before a lost reply -- a copy now equal to ours
        that was to be created or updated is that write, counted as its reply would have said."""
        todo: list[Group] = []
        for g in groups:
            reason = self.group_rejects.pop(id(g), None)
            if reason:
                self._reject_group(g, [reason], None)
                continue
            send = []
            for res in g.resources:
                d = self.decisions[self._key(res)]
                if first and self.on_decided:
                    self.on_decided(res, d.action)
                if d.action in ("unchanged", "linked"):
                    before = (landed or {}).get(self._key(res))
                    wrote = d.action == "unchanged" and before is not None and before.action in ("create", "update")
                    self.result.count(res["resourceType"], f"{before.action}d" if wrote and before else "unchanged")
                    self._learn(res, d, hashes)
                    self.on_progress(1)
                elif d.action == "conflict":
                    self._conflict(res, g.case_id, d)
                elif self.opt.dry_run:
                    self.result.count(res["resourceType"], "created" if d.action == "create" else "updated")
                else:
                    send.append(res)
            if send:
                todo.append(Group(g.case_id, send))
        return todo

    def _valid_group(self, group: Group) -> Group | None:
        """Local validation before sending (the same rules as import), rejected as the server
        would: in transaction mode the case travels together, so a case with an invalid resource
        is not sent at all; in batch mode only the invalid resource stays behind."""
        if self._validator is None:
            from ruxo_fhir.validate import Validator

            self._validator = Validator(self.opt.version)
        problems = {self._key(r): self._validator.validate(r) for r in group.resources}
        if not any(problems.values()):
            return group
        ver = self.opt.version
        if self.result.mode == "batch":
            for res in group.resources:
                found = problems[self._key(res)]
                if found:
                    self._reject(res, group.case_id, [f"not sent, FHIR {ver} validation error: {p.location}  "
                                                      f"{p.rule}  {p.message}" for p in found], None)
            kept = [r for r in group.resources if not problems[self._key(r)]]
            if not kept:
                return None
            rest = Group(group.case_id, kept)
            reason = self.group_rejects.pop(id(group), None)
            if reason:  # a case rejected by its decisions stays rejected with fewer resources
                self.group_rejects[id(rest)] = reason
            return rest
        where = self._where(group.case_id)
        for res in group.resources:
            self.result.count(res["resourceType"], "rejected")
        for key, found in problems.items():
            for p in found:
                self.result.errors.append(f"{where + ': ' if where else ''}case not sent ({len(group.resources)} "
                                          f"entries), FHIR {ver} validation error: {key}: {p.location}  {p.rule}  "
                                          f"{p.message}")
        self.on_progress(len(group.resources))
        return None


    def _learn(self, res: Resource, d: Decision, hashes: dict[str, str]) -> None:
        """An unchanged resource: the ledger learns the server's id and version."""
        if self.ledger is not None and d.server_id and not self.opt.dry_run and d.action == "unchanged":
            self.ledger.record_written(self.server, [(d.ident.key, Written(hashes[self._key(res)], d.server_id,
                                                                           d.version, d.last_updated))])

    def _conflict(self, res: Resource, case_id: str | None, d: Decision) -> None:
        self.result.count(res["resourceType"], "conflict")
        where = self._where(case_id)
        self.result.conflicts.append(
            f"{where + ', ' if where else ''}{res['resourceType']}/{d.server_id}: {d.note}; not written"
            + ("" if self.opt.dry_run else " (--on-conflict overwrite replaces it)"))
        self.on_progress(1)

    def _key(self, res: Resource) -> str:
        return _key_of(res)

    # -- entries -------------------------------------------------------------------------
    def _entry(self, res: Resource, urns: dict[str, str] | None) -> dict[str, Any]:
        d = self.decisions[self._key(res)]
        kind = res["resourceType"]
        resolve: Callable[[str], str | None] = lambda ref: self._resolve(ref, urns)  # noqa: E731
        if_match = {"ifMatch": f'W/"{d.version}"'} if d.action == "update" and d.version else {}
        if self.ids == "client":
            body = rewrite_references(res, resolve) if self.links else res
            entry = put_entry(body)
            entry["request"].update(if_match)
        elif d.action == "create":
            request: dict[str, Any] = {"method": "POST", "url": kind}
            if self.searchable.get(kind, True):
                request["ifNoneExist"] = d.ident.search
            entry = {"fullUrl": d.ident.urn(self.server), "resource": as_written(res, None, resolve),
                     "request": request}
        else:
            url = f"{kind}?{d.ident.search}" if self.searchable.get(kind, True) else f"{kind}/{d.server_id}"
            entry = {"fullUrl": f"{self.server}/{kind}/{d.server_id}",
                     "resource": as_written(res, d.server_id, resolve),
                     "request": {"method": "PUT", "url": url, **if_match}}
        self._sent[self._key(res)] = entry["resource"]
        return entry

    def _idempotent(self, resources: list[Resource]) -> bool:
        """A bundle is safe to resend unless it holds a create without ifNoneExist."""
        return self.ids == "client" or all(
            self.searchable.get(r["resourceType"], True) or self.decisions[self._key(r)].action != "create"
            for r in resources)

    def _send(self, groups: list[Group], hashes: dict[str, str]) -> None:
        if self.result.mode == "batch":
            self._send_batch(groups, hashes)
        else:
            self._send_transaction(groups, hashes)

    def _shrink(self, groups: list[Group], hashes: dict[str, str], why: str) -> bool:
        """Halve the chunk size after a size refusal; False when it cannot get smaller."""
        n = sum(len(g.resources) for g in groups)
        if n <= 1 and len(groups) <= 1:
            return False
        new_size = max(1, min(self.result.batch_size, n) // 2)
        if new_size < self.result.batch_size:
            self._notice(f"server refused a bundle of {n} entries ({why}); using chunks of {new_size}")
        self.result.batch_size = new_size
        for sub in chunk_groups(self._split_groups(groups, new_size), new_size):
            self._send(sub, hashes)
        return True

    @staticmethod
    def _split_groups(groups: list[Group], size: int) -> Iterator[Group]:
        for g in groups:
            if len(g.resources) <= size:
                yield g
            else:  # keep order: referenced resources come first within a group
                for i in range(0, len(g.resources), size):
                    yield Group(g.case_id, g.resources[i:i + size])

    def _too_big(self, exc: ServerError) -> bool:
        return refused_as_too_big(exc)

    def _send_transaction(self, groups: list[Group], hashes: dict[str, str], redo: int = 0) -> None:
        resources = [r for g in groups for r in g.resources]
        urns = {self._key(r): self.decisions[self._key(r)].ident.urn(self.server) for r in resources
                if self.ids == "server" and self.decisions[self._key(r)].action == "create"}
        bundle = make_bundle([self._entry(r, urns) for r in resources], "transaction")
        idempotent = self._idempotent(resources)
        try:
            self.result.add("bundles_sent")
            response = self.client.post_bundle(bundle, idempotent=idempotent)
        except TemporaryServerError:
            if idempotent or redo >= 3:
                raise
            # a create without ifNoneExist may or may not have landed: look again, then resend
            self._redecide(groups, hashes, redo, lost_reply=True)
            return
        except FatalServerError as exc:
            if self.ids == "client" and refuses_client_ids(exc.status, exc.issues) and any(
                    self.decisions[self._key(r)].action == "create" for r in resources):
                raise _ClientIdsRefused(f"HTTP {exc.status}: {(exc.summaries or [exc.reason])[0]}") from None
            if self._too_big(exc) and self._shrink(groups, hashes, f"HTTP {exc.status}"):
                return
            if self.result.mode == "batch":  # another sending thread switched meanwhile
                self._send_batch(groups, hashes)
                return
            if refused_transactions(exc) and not self.opt.mode_explicit:
                self._switch_to_batch("the server refused a transaction bundle")
                self._send_batch(groups, hashes)
                return
            if len(groups) > 1:  # isolate the failing case(s): the others still land
                mid = len(groups) // 2
                self._send_transaction(groups[:mid], hashes)
                self._send_transaction(groups[mid:], hashes)
                return
            if exc.status == 412 and redo == 0:  # changed between our read and our write
                self._redecide(groups, hashes, redo)
                return
            self._reject_group(groups[0], exc.summaries or [exc.reason], exc.status)
            return
        entries = response.get("entry", [])
        if len(entries) != len(resources):
            raise ServerError(f"transaction-response has {len(entries)} entries for {len(resources)} sent")
        self._record(resources, entries, hashes)
        log.info("push: transaction of %d entries landed", len(resources))

    def _redecide(self, groups: list[Group], hashes: dict[str, str], redo: int, *, lost_reply: bool = False) -> None:
        """Read the server's copies again for these groups and send what is still to do.

        After a lost reply (`lost_reply`), a copy now equal to ours that was to be created or
        updated is this run's write that landed: counted as created/updated, as its reply would
        have said (HAPI's AdverseEvent, which R4 cannot search by identifier, is created by a
        plain POST and comes back this way)."""
        before = self._decisions_of(groups)
        self._decide(groups, again=True)
        todo = self._to_send(groups, hashes, first=False, landed=before if lost_reply else None)
        if todo:
            if self.result.mode == "transaction":
                self._send_transaction(todo, hashes, redo + 1)
            else:
                self._send_batch(todo, hashes)

    def _decisions_of(self, groups: list[Group]) -> dict[str, Decision]:
        keys = (self._key(r) for g in groups for r in g.resources)
        return {k: self.decisions[k] for k in keys if k in self.decisions}

    def _send_batch(self, groups: list[Group], hashes: dict[str, str]) -> None:
        resources = [r for g in groups for r in g.resources]
        case_of_key = {self._key(r): g.case_id for g in groups for r in g.resources}
        policy = self._retry_policy()
        attempts = min(policy.max_attempts, self.opt.batch_entry_retries + 1)
        for level in reference_levels(resources):
            pending, slept, attempt = level, 0.0, 1
            while pending:
                delay = policy.next_delay(attempt, slept, None) if attempt < attempts else None
                pending = self._batch_round(pending, hashes, case_of_key, last=delay is None)
                if not pending or delay is None:
                    break
                self.opt.sleep(delay)
                slept += delay
                attempt += 1

    def _look_again(self, part: list[Resource], hashes: dict[str, str],
                    case_of_key: dict[str, str | None]) -> list[Resource]:
        """A batch whose reply was lost and that cannot be resent blindly: read the server's
        copies of its entries again; what landed is counted as written, the rest goes again."""
        groups = [Group(case_of_key.get(self._key(r)), [r]) for r in part]
        before = self._decisions_of(groups)
        self._decide(groups, again=True)
        todo = self._to_send(groups, hashes, first=False, landed=before)
        return [r for g in todo for r in g.resources]

    def _retry_policy(self) -> RetryPolicy:
        if self.opt.retry is not None:
            return self.opt.retry
        own = getattr(self.client, "retry", None)
        return own if isinstance(own, RetryPolicy) else RetryPolicy()

    def _batch_round(self, resources: list[Resource], hashes: dict[str, str],
                     case_of_key: dict[str, str | None], *, last: bool) -> list[Resource]:
        """Send one batch; returns the entries to retry (temporary per-entry failures)."""
        size = self.result.batch_size
        retry: list[Resource] = []
        for i in range(0, len(resources), size):
            part = resources[i:i + size]
            bundle = make_bundle([self._entry(r, None) for r in part], "batch")
            idempotent = self._idempotent(part)
            try:
                self.result.add("bundles_sent")
                response = self.client.post_bundle(bundle, idempotent=idempotent)
            except TemporaryServerError:
                if idempotent or last:
                    raise
                # a plain POST (no ifNoneExist: HAPI's AdverseEvent) may or may not have landed
                retry.extend(self._look_again(part, hashes, case_of_key))
                continue
            except FatalServerError as exc:
                if self._too_big(exc) and len(part) > 1:
                    new_size = max(1, len(part) // 2)
                    self._notice(f"server refused a batch of {len(part)} entries (HTTP {exc.status}); "
                                 f"using chunks of {new_size}")
                    self.result.batch_size = new_size
                    retry_rest = self._batch_round(part, hashes, case_of_key, last=last)
                    retry.extend(retry_rest)
                    continue
                raise
            entries = response.get("entry", [])
            if len(entries) != len(part):
                raise ServerError(f"batch-response has {len(entries)} entries for {len(part)} sent")
            ok_res, ok_entries = [], []
            for res, entry in zip(part, entries):
                resp = entry.get("response", {})
                status = status_code(resp.get("status"))
                if 200 <= status < 300:
                    ok_res.append(res)
                    ok_entries.append(entry)
                elif status in TEMPORARY_STATUSES and not last:
                    retry.append(res)
                else:
                    issues = _entry_issues(resp)
                    lines = [i.summary for i in issues] or [f"HTTP {status or '?'}"]
                    if self.ids == "client" and refuses_client_ids(status, issues) \
                            and self.decisions[self._key(res)].action == "create":
                        self._record(ok_res, ok_entries, hashes)
                        raise _ClientIdsRefused(f"HTTP {status}: {lines[0]}")
                    if status == 412:
                        d = self.decisions[self._key(res)]
                        self._conflict(res, case_of_key.get(self._key(res)),
                                       Decision("conflict", d.ident, d.server_id, d.version,
                                                "changed on the server while pushing (If-Match failed)"))
                        continue
                    self._reject(res, case_of_key.get(self._key(res)), lines, status)
            self._record(ok_res, ok_entries, hashes)
        return retry

    # -- bookkeeping ---------------------------------------------------------------------
    def _record(self, resources: list[Resource], entries: list[dict[str, Any]], hashes: dict[str, str]) -> None:
        with self._lock:
            self._record_locked(resources, entries, hashes)

    def _record_locked(self, resources: list[Resource], entries: list[dict[str, Any]],
                       hashes: dict[str, str]) -> None:
        """Count each write and store what it made: the server id and version from `location`,
        `etag` or entry.resource.meta, whichever the server gives; the rest from one batched read.

        A create decided on a read that found nothing counts as created even when the server
        answers 200 (Medplum does for a PUT that created; a resent POST finds what its lost
        first reply had created); otherwise the server's word (201 or its outcome) counts."""
        rows: list[tuple[str, Written]] = []
        unknown: dict[str, tuple[Resource, str]] = {}
        for res, entry in zip(resources, entries):
            reply = entry_reply(entry if isinstance(entry, dict) else {})
            if not reply.ok:
                raise ServerError(f"transaction entry for {self._key(res)} answered "
                                  f"{(entry.get('response') or {}).get('status')!r}")
            key = self._key(res)
            d = self.decisions[key]
            kind = res["resourceType"]
            outcome = "created" if d.action == "create" else reply.outcome
            if d.action == "create" and self.ids == "client":
                self._client_ids_ok.add(kind)
            self.result.count(kind, "updated" if outcome == "unchanged" else outcome)
            sid = (reply.server_id if reply.resource_type in (None, kind) else None) \
                or (res["id"] if self.ids == "client" else d.server_id)
            if sid and kind in REFERENCED_TYPES:
                self.sids[key] = f"{kind}/{sid}"
            if reply.versioned:
                rows.append((d.ident.key, Written(hashes[key], sid, reply.version_id, reply.last_updated)))
            elif sid:
                unknown[f"{kind}/{sid}"] = (res, key)
        if self.ledger is not None:
            if unknown:
                rows += self._read_versions(unknown, hashes)
            if rows:
                self.ledger.record_written(self.server, rows)
        for key in (self._key(r) for r in resources):
            self._sent.pop(key, None)
        self.on_progress(len(resources))

    def _read_versions(self, unknown: dict[str, tuple[Resource, str]],
                       hashes: dict[str, str]) -> list[tuple[str, Written]]:
        """The versions of just-written resources whose replies named none: ONE batched read.
        A copy is recorded only when its content is what we sent, so a write by someone else
        between our write and this read is never taken for ours."""
        self.result.add("version_reads")
        rows = []
        wanted = {server_key: self.decisions[key].ident for server_key, (_, key) in unknown.items()
                  if self._can_search(server_key.split("/", 1)[0])}
        for ident, copies in find_by_id(self.client, wanted, self.searcher).items():
            for copy in copies:
                _, key = unknown[f"{ident.kind}/{copy.id}"]
                sent = self._sent.get(key)
                if copy.version and sent is not None and same_content({**sent, "id": copy.id}, copy.body):
                    rows.append((ident.key, Written(hashes[key], copy.id, copy.version, copy.last_updated)))
        return rows

    def _where(self, case_id: str | None) -> str:
        if not case_id:
            return ""
        row = self.case_rows.get(case_id)
        return f"case {case_id}" + (f", row {row}" if row else "")

    def _reject(self, res: Resource, case_id: str | None, lines: list[str], status: int | None) -> None:
        self.result.count(res["resourceType"], "rejected")
        where = self._where(case_id)
        for line in lines:
            self.result.errors.append(f"{self._key(res)}{f' ({where})' if where else ''}: {line}")
        self.result.rejects.append(PushReject(case_id, self.case_rows.get(case_id or ""), "; ".join(lines)))
        self.on_progress(1)

    def _reject_group(self, group: Group, lines: list[str], status: int | None) -> None:
        where = self._where(group.case_id)
        for res in group.resources:
            self.result.count(res["resourceType"], "rejected")
        head = f"{where}: " if where else ""
        what = "transaction rejected" if status else "not pushed"
        for line in lines:
            self.result.errors.append(f"{head}{what} ({len(group.resources)} entries): {line}")
        self.result.rejects.append(PushReject(group.case_id, self.case_rows.get(group.case_id or ""),
                                              "; ".join(lines)))
        self.on_progress(len(group.resources))


def write_push_rejects(path: Path, rejects: list[PushReject]) -> Path:
    """The rejected cases of a push as CSV (case_id, row, error), written atomically."""
    from ruxo_fhir.atomic import atomic_write_bytes

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case_id", "row", "error"])
    for rej in rejects:
        writer.writerow([rej.case_id or "", rej.row or "", rej.reason])
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
    return path


def push(client: Client, resources: Iterable[Resource], mapping: MappingSpec,
         options: PushOptions | None = None, *, ledger: Ledger | None = None,
         on_progress: Callable[[int], None] | None = None,
         case_rows: dict[str, int] | None = None) -> PushResult:
    """Push resources; temporary failures that outlast the retry budget raise, and a rerun
    completes the work (nothing is lost, nothing doubled: every write is a PUT at a stable id,
    or, with server ids, a conditional create/update by identifier)."""
    return Pusher(client, mapping, options or PushOptions(), ledger, on_progress, case_rows).run(resources)
