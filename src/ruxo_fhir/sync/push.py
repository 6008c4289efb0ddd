"""Push: send resources to a FHIR server in reference-safe chunks, idempotently.

Why PUT with stable ids (not conditional create): the ids are derived from identifiers, so
a PUT is idempotent by construction — a lost reply, a retry or a rerun writes the same
resource at the same id and can never create a duplicate, in transaction and batch mode
alike, and references stay literal `Type/id` so no chunk depends on another chunk's
`urn:uuid`. Conditional create needs the server to search before every write and breaks
under concurrent retries (two creates racing past `If-None-Exist`).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ruxo_fhir.bundle import make_bundle, put_entry
from ruxo_fhir.errors import CapabilityError, FatalServerError, ServerError
from ruxo_fhir.fhir_version import FhirVersion
from ruxo_fhir.mapping.reverse import identifier_value, identifiers
from ruxo_fhir.mapping.spec import MappingSpec
from ruxo_fhir.resource import Resource
from ruxo_fhir.sync.capabilities import Capabilities, DataVersionGuard, preflight_types
from ruxo_fhir.sync.capabilities import check_version as check_version  # re-exported (was defined here)
from ruxo_fhir.sync.capabilities import server_interactions as server_interactions
from ruxo_fhir.sync.ledger import Ledger, Pushed, content_hash
from ruxo_fhir.sync.replies import entry_reply, same_instant, status_code

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
               for i in exc.outcome)


def refused_transactions(exc: ServerError) -> bool:
    """The server refused the bundle TYPE: a `not-supported` issue about ``Bundle.type`` (or about no
    element at all), not an entry inside the transaction."""
    return any(i.code == "not-supported" and _at_bundle_level(i.expression) for i in exc.outcome)


def _at_bundle_level(expression: tuple[str, ...]) -> bool:
    return not expression or all(e in _BUNDLE_LEVEL for e in expression)


class Client(Protocol):
    """The part of transport.FhirClient push needs (kept here so sync stays testable)."""

    base_url: str

    def capabilities(self) -> dict[str, Any]: ...

    def post_bundle(self, bundle: dict[str, Any], *, idempotent: bool) -> dict[str, Any]: ...

    def search(self, resource_type: str, params: dict[str, str]) -> Iterator[dict[str, Any]]: ...


@dataclass
class PushOptions:
    batch_size: int = 200
    mode: str = "transaction"  # "transaction" | "batch"
    mode_explicit: bool = False  # False: a batch-only server switches the mode by itself
    version: FhirVersion = "R4"
    use_ledger: bool = True
    batch_entry_retries: int = 5
    sleep: Callable[[float], None] = time.sleep
    # Bundles in flight at once. A bundle waits until every bundle holding a resource it
    # references has landed, so servers with referential integrity see what they see with 1.
    concurrency: int = 1


@dataclass
class PushResult:
    """Entry counts (created + updated + unchanged + rejected == total) and what was said."""

    total: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: int = 0
    mode: str = "transaction"
    batch_size: int = 0
    bundles_sent: int = 0
    version_reads: int = 0  # batched reads after writes whose replies named no version
    notices: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    by_type: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def count(self, resource_type: str, outcome: str, n: int = 1) -> None:
        setattr(self, outcome, getattr(self, outcome) + n)
        self.by_type[resource_type][outcome] += n

    @property
    def summary_line(self) -> str:
        return (f"created {self.created}, updated {self.updated}, unchanged {self.unchanged}, "
                f"rejected {self.rejected}, total {self.total}")


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

def _by_type(keys: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        kind, rid = key.split("/", 1)
        out[kind].append(rid)
    return out


def _outcome_lines(outcome: dict[str, Any] | None) -> list[str]:
    from ruxo_fhir.transport.outcome import summarize_outcome

    return summarize_outcome(outcome) if outcome else []


class _Flight:
    """Up to `limit` bundles in flight on sending threads, in reference order.

    A bundle is submitted only after every in-flight bundle holding a resource it references
    (`Type/id`) has landed, so a server checking referential integrity sees the order a
    sequential push gives it. Only the keys of bundles in flight are kept (memory stays flat).
    The first error stops new submissions; bundles already sent finish (and are recorded), then
    the error is raised, as a sequential push would raise it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="ruxo-push")
        self._holder: dict[str, Future[None]] = {}  # Type/id -> the in-flight bundle holding it
        self._inflight: dict[Future[None], list[str]] = {}

    def __enter__(self) -> _Flight:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:  # never leave threads sending after an error; the first error is the one raised
            self._wait(0)
        except BaseException:
            if exc_type is None:
                raise
        finally:
            self._pool.shutdown(wait=True)

    def submit(self, resources: list[Resource], send: Callable[[], None]) -> None:
        keys = [f"{r['resourceType']}/{r['id']}" for r in resources]
        needed = {self._holder[k] for k in _literal_refs(resources) if k in self._holder}
        if needed:
            self._settle(wait(needed).done)
        while len(self._inflight) >= self.limit:
            self._settle(wait(self._inflight, return_when=FIRST_COMPLETED).done)
        future = self._pool.submit(send)
        self._inflight[future] = keys
        for key in keys:
            self._holder[key] = future

    def finish(self) -> None:
        """Wait for every bundle; raise the first error."""
        self._wait(0)

    def _wait(self, leave: int) -> None:
        error: BaseException | None = None
        while len(self._inflight) > leave:
            try:
                self._settle(wait(self._inflight, return_when=FIRST_COMPLETED).done)
            except BaseException as exc:  # keep draining: every sent bundle gets recorded
                error = error or exc
        if error is not None:
            raise error

    def _settle(self, done: set[Future[None]]) -> None:
        error: BaseException | None = None
        for future in done:
            keys = self._inflight.pop(future, None)
            if keys is None:
                continue
            for key in keys:
                if self._holder.get(key) is future:
                    del self._holder[key]
            exc = future.exception()
            if exc is not None and error is None:
                error = exc
        if error is not None:
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
                 case_rows: dict[str, int] | None = None) -> None:
        self.client = client
        self.mapping = mapping
        self.opt = options
        self.ledger = ledger if options.use_ledger else None
        self.on_progress = on_progress or (lambda n: None)
        self.case_rows = case_rows or {}
        self.result = PushResult(mode=options.mode, batch_size=options.batch_size)
        self._validator: Validator | None = None
        # Bookkeeping (counts, notices, ledger, chunk size, mode) is shared by the sending
        # threads of `concurrency > 1`; it changes only under this lock.
        self._lock = threading.RLock()
        self._flight: _Flight | None = None

    # -- entry point ---------------------------------------------------------------------
    def run(self, resources: Iterable[Resource]) -> PushResult:
        statement = self.client.capabilities()
        warning = check_version(statement, self.opt.version)
        if warning:
            self._notice(warning)
        self.caps = Capabilities.read(statement)
        self.version_guard = DataVersionGuard(self.caps.fhir_version)
        self.checked_types: set[str] = set()
        self.searchable: dict[str, bool] = {}
        interactions = set(self.caps.system_interactions)
        if self.opt.mode == "transaction" and interactions and "transaction" not in interactions:
            if "batch" not in interactions:
                raise CapabilityError("server declares neither transaction nor batch interactions")
            if self.opt.mode_explicit:
                raise CapabilityError("server does not support transactions; use --mode batch")
            self._switch_to_batch("server declares batch but not transaction")
        try:
            if self.opt.concurrency > 1:
                with _Flight(self.opt.concurrency) as self._flight:
                    self._push_all(resources)
                    self._flight.finish()
            else:
                self._push_all(resources)
        except CapabilityError as exc:  # the data or a type this server cannot take: say what landed
            written = self.result.created + self.result.updated + self.result.unchanged
            raise CapabilityError(f"{exc.reason}; " + (f"{written} entries were written or confirmed before this, "
                                  "the rest not" if self.result.bundles_sent else "nothing was written"),
                                  status=exc.status, issues=exc.issues, url=exc.url, outcome=exc.outcome) from None
        return self.result

    def _push_all(self, resources: Iterable[Resource]) -> None:
        # The ledger check reads versions for a window of several chunks at once (fewer,
        # fuller `_id` searches on a re-push); memory stays bounded by the window.
        window: list[list[Group]] = []
        hashes: dict[str, str] = {}
        chunks = chunk_groups(group_resources(resources, self.mapping), self.result.batch_size)
        for chunk, chunk_hashes in prefetch(self._hashed(chunks), depth=2):
            window.append(chunk)
            hashes.update(chunk_hashes)
            if len(hashes) >= LEDGER_WINDOW:
                self._push_window(window, hashes)
                window, hashes = [], {}
        if window:
            self._push_window(window, hashes)

    def _hashed(self, chunks: Iterable[list[Group]]) -> Iterator[tuple[list[Group], dict[str, str]]]:
        """Content hashes are computed in the prefetch thread, off the sending path; so is the
        data's FHIR version check (before the window holding a resource is written)."""
        check = self.version_guard.check
        for chunk in chunks:
            for g in chunk:
                for r in g.resources:
                    check(r)
            yield chunk, {self._key(r): content_hash(r) for g in chunk for r in g.resources}

    def _push_window(self, window: list[list[Group]], hashes: dict[str, str]) -> None:
        new_types = {key.split("/", 1)[0] for key in hashes} - self.checked_types
        if new_types:  # the capability pre-flight, before the first write of each type
            preflight_types(self.caps, new_types)
            self.checked_types |= new_types
        unchanged = self._unchanged(hashes)
        for chunk in window:
            self._push_chunk(chunk, hashes, unchanged)

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

    # -- one chunk -----------------------------------------------------------------------
    def _push_chunk(self, chunk: list[Group], hashes: dict[str, str], unchanged: set[str]) -> None:
        self.result.total += sum(len(g.resources) for g in chunk)
        chunk = [g for g in map(self._valid_group, chunk) if g is not None]
        resources = [r for g in chunk for r in g.resources]
        for res in resources:
            if self._key(res) in unchanged:
                self.result.count(res["resourceType"], "unchanged")
        todo = [Group(g.case_id, [r for r in g.resources if self._key(r) not in unchanged]) for g in chunk]
        todo = [g for g in todo if g.resources]
        skipped = sum(1 for r in resources if self._key(r) in unchanged)
        if skipped:
            with self._lock:
                self.on_progress(skipped)
        if todo:
            if self._flight is not None:
                self._flight.submit([r for g in todo for r in g.resources], lambda: self._send(todo, hashes))
            else:
                self._send(todo, hashes)

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
            return Group(group.case_id, kept) if kept else None
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

    def _key(self, res: Resource) -> str:
        return f"{res['resourceType']}/{res['id']}"

    def _unchanged(self, hashes: dict[str, str]) -> set[str]:
        """Keys whose hash matches the ledger AND whose server copy is still the one this ledger
        wrote: same versionId and same meta.lastUpdated (serial versionIds repeat after a reset)."""
        if self.ledger is None:
            return set()
        known = self.ledger.lookup(self.client.base_url, hashes)
        candidates = {k: p for k, p in known.items() if p.hash == hashes[k] and p.version_id and p.last_updated}
        if not candidates:
            return set()
        same: set[str] = set()
        for key, found in self._read_current(candidates, elements="id,meta"):
            meta = found.get("meta") or {}
            mine = candidates[key]
            if mine.version_id == str(meta.get("versionId")) and same_instant(mine.last_updated,
                                                                                meta.get("lastUpdated")):
                same.add(key)
        return same

    def _read_current(self, keys: Iterable[str], elements: str | None = None) -> Iterator[tuple[str, Resource]]:
        """The server's current copies of `keys`, by `_id` searches of up to 100 ids per type."""
        for kind, ids in _by_type(keys).items():
            if not self._searchable(kind):
                continue
            for i in range(0, len(ids), 100):
                part = ids[i:i + 100]
                params = {"_id": ",".join(part), "_count": str(len(part))}
                if elements:
                    params["_elements"] = elements
                for found in self.client.search(kind, params):
                    if found.get("resourceType") == kind:
                        yield f"{kind}/{found.get('id')}", found

    def _searchable(self, kind: str) -> bool:
        """Whether the statement allows the `_id` search the ledger check needs for a type; when
        it does not, that type is always sent (once said), never skipped on trust."""
        if kind not in self.searchable:
            missing = self.caps.missing_interactions(kind, ("search-type",))
            self.searchable[kind] = not missing
            if missing:
                self._notice(f"the server declares no search for {kind}: its resources are sent on every "
                             "push (the ledger cannot check the server's copy)")
        return self.searchable[kind]

    def _read_versions(self, keys: list[str], hashes: dict[str, str]) -> list[tuple[str, Pushed]]:
        """The versions of just-written resources whose replies named none: ONE batched read.

        A copy is recorded only when its content is what we sent, so a write by someone else
        between our write and this read can never be mistaken for ours.
        """
        with self._lock:
            self.result.version_reads += 1
        rows = []
        for key, found in self._read_current(keys):
            meta = found.get("meta") or {}
            version, last_updated = meta.get("versionId"), meta.get("lastUpdated")
            if version and last_updated and content_hash(found) == hashes.get(key):
                rows.append((key, Pushed(hashes[key], str(version), str(last_updated))))
            else:
                log.debug("push: %s read back without a usable version or with other content", key)
        return rows

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
        with self._lock:
            current = self.result.batch_size
            new_size = max(1, min(current, n) // 2)
            if new_size < current:
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

    def _send_transaction(self, groups: list[Group], hashes: dict[str, str]) -> None:
        resources = [r for g in groups for r in g.resources]
        bundle = make_bundle([put_entry(r) for r in resources], "transaction")
        try:
            with self._lock:
                self.result.bundles_sent += 1
            response = self.client.post_bundle(bundle, idempotent=True)
        except FatalServerError as exc:
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
            self._reject_group(groups[0], exc.issues or [exc.reason], exc.status)
            return
        entries = response.get("entry", [])
        if len(entries) != len(resources):
            raise ServerError(f"transaction-response has {len(entries)} entries for {len(resources)} sent")
        self._record(resources, entries, hashes)
        log.info("push: transaction of %d entries landed", len(resources))

    def _send_batch(self, groups: list[Group], hashes: dict[str, str]) -> None:
        resources = [r for g in groups for r in g.resources]
        case_of_key = {self._key(r): g.case_id for g in groups for r in g.resources}
        for level in reference_levels(resources):
            pending = level
            for attempt in range(self.opt.batch_entry_retries + 1):
                pending = self._batch_round(pending, hashes, case_of_key, last=attempt == self.opt.batch_entry_retries)
                if not pending:
                    break
                self.opt.sleep(min(30.0, 2.0 ** attempt))

    def _batch_round(self, resources: list[Resource], hashes: dict[str, str],
                     case_of_key: dict[str, str | None], *, last: bool) -> list[Resource]:
        """Send one batch; returns the entries to retry (temporary per-entry failures)."""
        size = self.result.batch_size
        retry: list[Resource] = []
        for i in range(0, len(resources), size):
            part = resources[i:i + size]
            bundle = make_bundle([put_entry(r) for r in part], "batch")
            try:
                with self._lock:
                    self.result.bundles_sent += 1
                response = self.client.post_bundle(bundle, idempotent=True)
            except FatalServerError as exc:
                if self._too_big(exc) and len(part) > 1:
                    new_size = max(1, len(part) // 2)
                    with self._lock:
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
                elif (status in (408, 429) or status >= 500) and not last:
                    retry.append(res)
                else:
                    lines = _outcome_lines(resp.get("outcome")) or [f"HTTP {status or '?'}"]
                    self._reject(res, case_of_key.get(self._key(res)), lines, status)
            self._record(ok_res, ok_entries, hashes)
        return retry

    # -- bookkeeping ---------------------------------------------------------------------
    def _record(self, resources: list[Resource], entries: list[dict[str, Any]], hashes: dict[str, str]) -> None:
        """Count each write as the server reported it (201 / outcome, never assumed) and store the
        version it made: from `etag`, a `_history` location or entry.resource.meta, whichever
        the server gives; the rest from one batched read."""
        ledger_rows: list[tuple[str, Pushed]] = []
        unknown: list[str] = []
        with self._lock:
            for res, entry in zip(resources, entries):
                reply = entry_reply(entry if isinstance(entry, dict) else {})
                if not reply.ok:
                    raise ServerError(f"transaction entry for {self._key(res)} answered "
                                      f"{(entry.get('response') or {}).get('status')!r}")
                self.result.count(res["resourceType"], reply.outcome)
                key = self._key(res)
                if reply.versioned:
                    ledger_rows.append((key, Pushed(hashes[key], reply.version_id, reply.last_updated)))
                else:
                    unknown.append(key)
        if self.ledger is not None:
            if unknown:
                ledger_rows += self._read_versions(unknown, hashes)
            if ledger_rows:
                self.ledger.record(self.client.base_url, ledger_rows)
        with self._lock:
            self.on_progress(len(resources))

    def _where(self, case_id: str | None) -> str:
        if not case_id:
            return ""
        row = self.case_rows.get(case_id)
        return f"case {case_id}" + (f", row {row}" if row else "")

    def _reject(self, res: Resource, case_id: str | None, lines: list[str], status: int | None) -> None:
        where = self._where(case_id)
        with self._lock:
            self.result.count(res["resourceType"], "rejected")
            for line in lines:
                self.result.errors.append(f"{self._key(res)}{f' ({where})' if where else ''}: {line}")
            self.on_progress(1)

    def _reject_group(self, group: Group, lines: list[str], status: int | None) -> None:
        where = self._where(group.case_id)
        head = f"{where}: " if where else ""
        with self._lock:
            for res in group.resources:
                self.result.count(res["resourceType"], "rejected")
            for line in lines:
                self.result.errors.append(f"{head}transaction rejected ({len(group.resources)} entries): {line}")
            self.on_progress(len(group.resources))


def push(client: Client, resources: Iterable[Resource], mapping: MappingSpec,
         options: PushOptions | None = None, *, ledger: Ledger | None = None,
         on_progress: Callable[[int], None] | None = None,
         case_rows: dict[str, int] | None = None) -> PushResult:
    """Push resources; temporary failures that outlast the retry budget raise, and a rerun
    completes the work (nothing is lost, nothing doubled: every write is a PUT at a stable id)."""
    return Pusher(client, mapping, options or PushOptions(), ledger, on_progress, case_rows).run(resources)
