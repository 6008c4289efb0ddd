"""Many searches at once: one FHIR `batch` (or `transaction`) of GET entries, or plain GETs side by side.

Push reads the server's copies of a window of resources before it writes (sync/identity.py)
and counts the cohort after (sync/prune.py): dozens of small searches. Issued one after another
they cost a round trip each, which against a remote server is most of a push. A server that
declares the `batch` system interaction takes them as ONE request (FHIR http.html#transaction:
a batch entry may be a GET search; its response.resource is the searchset Bundle). Otherwise,
and for the next pages a full answer points to, the searches go as plain GETs, up to `workers`
at a time. Retries and Retry-After are the client's (one policy for every request).

A server that declares `transaction` but not `batch` (HAPI JPA's CapabilityStatement) takes
the searches as one transaction of GET entries instead: a transaction may hold GETs (FHIR
http.html#trules: processed after the writes, of which there are none here), each answered by
its searchset; a search has no "not found" that would fail the whole transaction.

Resources wanted by id go in a batch as reads, `GET Type/id` entries (a missing one answers 404,
a deleted one 410): a read is an index lookup on any server, where an `_id` search may scan the
type (Medplum's in-memory engine does, so its cost grew with what the server holds). Without a
batch they go as `_id` searches of PAGE ids: one GET per PAGE, not one per id.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote, urlencode

from ruxo_fhir.errors import FatalServerError
from ruxo_fhir.sync.client import Client
from ruxo_fhir.sync.replies import status_code
from ruxo_fhir.transport.outcome import TEMPORARY_STATUSES, summarize_outcome

log = logging.getLogger("ruxo_fhir.sync")
Resource = dict[str, Any]
Search = tuple[str, dict[str, str]]  # resource type, search parameters
Entry = tuple[str, str, bool]  # resource type, relative URL, whether it is a read (else a search)
PAGE = 50  # ids per search and `_count`: within the page size servers grant, so no next page
BATCH_ENTRIES = 500  # GET entries per batch request (Azure FHIR caps a bundle at 500 entries)


class Searcher:
    """Runs a list of searches and gives back, per search, every page of its answer."""

    def __init__(self, client: Client, *, batch: bool = False, workers: int = 1,
                 readable: Callable[[str], bool] | None = None, transaction: bool = False) -> None:
        self.client = client
        # the Bundle type that carries the searches: `batch` where declared, else `transaction`
        # where declared (searches only: a read's 404 would fail a transaction), else none
        self.kind = "batch" if batch else "transaction" if transaction else None
        self.batch = self.kind is not None  # False after the server refused a bundle of reads
        self.workers = max(1, workers)
        self.readable = readable or (lambda kind: True)  # the statement allows `read` of a type
        self._lock = threading.Lock()

    def find(self, searches: list[Search], ids: dict[str, list[str]]) -> tuple[list[list[Resource]], list[Resource]]:
        """What each search found (as `resources`), and those of the wanted ids (by type) the
        server holds: as reads in the searches' batch where there is one, else `_id` searches."""
        reads = [(kind, rid) for kind, rids in ids.items() if self.readable(kind) for rid in rids]
        if not (self.batch and reads and self.kind == "batch"):
            return self._searched(searches, ids)
        out, found, missed = self._batched(searches, False, reads)
        answers = [list(_resources(kind, pages)) for (kind, _), pages in zip(searches, out)]
        rest = {kind: rids for kind, rids in ids.items() if not self.readable(kind)}
        for kind, rid in missed:  # refused or temporarily failed entries: by `_id` search
            rest.setdefault(kind, []).append(rid)
        return answers, found + self._searched([], rest)[1]

    def _searched(self, searches: list[Search], ids: dict[str, list[str]]
                  ) -> tuple[list[list[Resource]], list[Resource]]:
        by_id = [(kind, {"_id": ",".join(part), "_count": str(len(part))})
                 for kind, rids in ids.items() for part in chunks(rids, PAGE)]
        answers = self.resources(searches + by_id)
        return answers[:len(searches)], [r for found in answers[len(searches):] for r in found]

    def pages(self, searches: list[Search], *, first_only: bool = False) -> list[list[Resource]]:
        """The searchset Bundles of each search, in the order asked: every page (next links
        followed), or only the first (`first_only`: a `_summary=count`)."""
        if not searches:
            return []
        if self.batch and len(searches) > 1:
            return self._batched(searches, first_only)[0]
        return self._each(lambda s: self._plain(s, first_only), searches)

    def _plain(self, search: Search, first_only: bool) -> list[Resource]:
        found = self.client.search_bundles(search[0], search[1], max_pages=1 if first_only else None)
        return [page for page in [next(iter(found), None)] if page is not None] if first_only else list(found)

    def resources(self, searches: list[Search]) -> list[list[Resource]]:
        """The resources each search found, across its pages, each once (pages may overlap);
        the server's warnings (`search.mode = outcome`) are logged, not returned."""
        return [list(_resources(kind, pages)) for (kind, _), pages in zip(searches, self.pages(searches))]

    def _each(self, fn: Any, items: list[Any]) -> list[Any]:
        """fn over items, up to `workers` at a time, results in order; the first error is raised."""
        if self.workers == 1 or len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(items)), thread_name_prefix="ruxo-read") as pool:
            return list(pool.map(fn, items))

    def _batched(self, searches: list[Search], first_only: bool, reads: Sequence[tuple[str, str]] = ()
                 ) -> tuple[list[list[Resource]], list[Resource], list[tuple[str, str]]]:
        """The searches' pages, the resources read, and the reads that still need asking."""
        items: list[Entry] = [(kind, f"{kind}?{urlencode(params)}", False) for kind, params in searches]
        items += [(kind, f"{kind}/{quote(rid, safe='')}", True) for kind, rid in reads]
        parts = [items[i:i + BATCH_ENTRIES] for i in range(0, len(items), BATCH_ENTRIES)]
        answers = [a for answer in self._each(self._post, parts) for a in answer]
        found = [r for a in answers[len(searches):] if a is not None for r in a]
        missed = [read for read, a in zip(reads, answers[len(searches):]) if a is None]
        out: list[list[Resource]] = []
        again: list[int] = []
        for i, pages in enumerate(answers[:len(searches)]):
            out.append(pages or [])
            if pages is None:
                again.append(i)
        if again:  # refused entries, or a refused batch: plain searches for those
            for i, pages in zip(again, self._each(lambda i: self._plain(searches[i], first_only), again)):
                out[i] = pages
        if not first_only:  # a full page: the rest by its next links, as plain GETs
            follow = [i for i in range(len(out)) if i not in again and out[i] and _has_next(out[i][-1])]
            more = self._each(lambda i: list(self.client.next_pages(searches[i][0], out[i][-1])), follow)
            for i, pages in zip(follow, more):
                out[i] = out[i] + pages
        return out, found, missed

    def _post(self, part: list[Entry]) -> list[list[Resource] | None]:
        """One batch of GET entries: each search's searchset (its first page), each read's
        resource ([] when the server has none: 404, or 410 deleted), or None for an entry to ask
        plainly. A refusal turns batch reads off for the rest of the run."""
        if not self.batch:
            return [None] * len(part)
        bundle = {"resourceType": "Bundle", "type": self.kind, "entry": [
            {"request": {"method": "GET", "url": url}} for _, url, _ in part]}
        try:
            reply = self.client.post_bundle(bundle, idempotent=True)
        except FatalServerError as exc:
            self._refused(f"HTTP {exc.status}")  # 401/403 raise AuthError, never refuse
            return [None] * len(part)
        entries = reply.get("entry") if isinstance(reply, dict) else None
        if not isinstance(entries, list) or len(entries) != len(part) or reply.get("type") != f"{self.kind}-response":
            self._refused(f"its reply is not a {self.kind}-response with one entry per request")
            return [None] * len(part)
        out: list[list[Resource] | None] = []
        for (kind, _, read), entry in zip(part, entries):
            response = entry.get("response") if isinstance(entry, dict) else None
            status = status_code((response or {}).get("status")) if isinstance(response, dict) else 0
            found = entry.get("resource") if isinstance(entry, dict) else None
            if 200 <= status < 300 and isinstance(found, dict) and found.get("resourceType") == (kind if read else "Bundle"):
                out.append([found])
                continue
            if read and status in (404, 410):  # not there, or deleted: nothing to compare with
                out.append([])
                continue
            out.append(None)
            if status not in TEMPORARY_STATUSES:  # a temporary one is asked again plainly
                self._refused(f"an entry answered {status or 'without its resource'}")
        return out

    def _refused(self, why: str) -> None:
        with self._lock:
            if self.batch:
                self.batch = False
                log.info("push: the server did not answer searches in a %s (%s); plain searches from now on",
                         self.kind, why)


def _has_next(page: Resource) -> bool:
    return any(isinstance(link, dict) and link.get("relation") == "next" for link in page.get("link") or [])


def _resources(kind: str, pages: Iterable[Resource]) -> Iterator[Resource]:
    seen: set[str] = set()
    for page in pages:
        for entry in page.get("entry") or []:
            if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
                continue
            resource: Resource = entry["resource"]
            if (entry.get("search") or {}).get("mode") == "outcome":
                for line in summarize_outcome(resource):
                    log.warning("search %s: server says %s", kind, line)
                continue
            if isinstance(resource.get("id"), str):
                key = f"{resource.get('resourceType')}/{resource['id']}"
                if key in seen:
                    continue
                seen.add(key)
            yield resource


def chunks(values: list[str], size: int = PAGE) -> Iterator[list[str]]:
    for i in range(0, len(values), size):
        yield values[i:i + size]
