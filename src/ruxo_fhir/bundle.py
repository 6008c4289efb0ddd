"""Bundles and ndjson folders: building transaction bundles, reading and writing files."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from ruxo_fhir.atomic import atomic_write_bytes as atomic_write_bytes  # re-exported (was defined here)
from ruxo_fhir.atomic import open_private as open_private
from ruxo_fhir.errors import InputError
from ruxo_fhir.resource import Resource

_NS = uuid.UUID("6f1f3c1e-1b7a-4a0c-9a53-6b8f0d1e2c11")  # fixed: fullUrls are stable across runs


def full_url(resource: Resource) -> str:
    """A stable `urn:uuid:` fullUrl derived from Type/id."""
    key = f"{resource['resourceType']}/{resource['id']}"
    return f"urn:uuid:{uuid.uuid5(_NS, key)}"


def put_entry(resource: Resource) -> dict[str, Any]:
    """A transaction/batch entry that creates or replaces the resource at its stable id."""
    return {
        "fullUrl": full_url(resource),
        "resource": resource,
        "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"},
    }


def make_bundle(entries: list[dict[str, Any]], bundle_type: str = "transaction") -> Resource:
    return {"resourceType": "Bundle", "type": bundle_type, "entry": entries}


def dumps(obj: Any, *, pretty: bool = False) -> bytes:
    """Deterministic JSON bytes (insertion-ordered keys); orjson for speed."""
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 if pretty else 0)


# --- reading ----------------------------------------------------------------------------

SPREADSHEET_SUFFIXES = (".xlsx", ".xlsm", ".xls", ".xlsb", ".ods", ".numbers")


def refuse_spreadsheet(path: Path) -> None:
    """A workbook handed to a command that reads FHIR: say how to get FHIR from it."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError:
        return  # _load_json says why it cannot be read
    if path.suffix.lower() in SPREADSHEET_SUFFIXES or magic in (b"PK\x03\x04", b"\xd0\xcf\x11\xe0"):
        raise InputError(f"a spreadsheet, not FHIR JSON: import it first "
                         f"(ruxo-fhir import {path.name} -o bundle.json), then use the bundle", file=str(path))


def _load_json(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except OSError as exc:
        raise InputError(f"cannot read file ({exc.strerror})", file=str(path)) from None
    except orjson.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc.msg} at line {exc.lineno})", file=str(path)) from None


def _iter_ndjson_file(path: Path) -> Iterator[Resource]:
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise InputError(f"cannot read file ({exc.strerror})", file=str(path)) from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise InputError(f"not valid JSON ({exc.msg})", file=str(path), row=lineno) from None
            if not isinstance(obj, dict) or "resourceType" not in obj:
                raise InputError("line is not a FHIR resource (no resourceType)", file=str(path), row=lineno)
            yield obj


def ndjson_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix == ".ndjson" and p.is_file())


def iter_resources(path: str | Path) -> Iterator[Resource]:
    """Every resource in a Bundle JSON (any type), an .ndjson file, or a folder of .ndjson files."""
    p = Path(path)
    if p.is_dir():
        files = ndjson_files(p)
        if not files:
            raise InputError("folder holds no .ndjson files", file=str(p))
        for f in files:
            yield from _iter_ndjson_file(f)
        return
    if not p.exists():
        raise InputError("file not found", file=str(p))
    if p.suffix == ".ndjson":
        yield from _iter_ndjson_file(p)
        return
    refuse_spreadsheet(p)
    data = _load_json(p)
    if not isinstance(data, dict) or "resourceType" not in data:
        raise InputError("not a FHIR resource or Bundle (no resourceType)", file=str(p))
    if data["resourceType"] != "Bundle":
        yield data
        return
    for entry in _entries(data, p):
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict):
            continue  # e.g. DELETE entries or transaction-response entries without bodies
        search = entry.get("search")
        if (isinstance(search, dict) and search.get("mode") == "outcome") or res.get("resourceType") == "OperationOutcome":
            continue
        yield res


def _entries(bundle: dict[str, Any], path: Path) -> list[Any]:
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise InputError("Bundle.entry is not a list", file=str(path))
    return entries


# --- writing (atomic: a failed run leaves no half-written output) ------------------------

class BundleWriter:
    """Collects resources and writes one Bundle JSON file atomically on `close()`."""

    def __init__(self, path: Path, bundle_type: str = "transaction") -> None:
        self.path = path
        self.bundle_type = bundle_type
        self._entries: list[dict[str, Any]] = []

    def write(self, resource: Resource) -> None:
        if self.bundle_type in ("transaction", "batch"):
            self._entries.append(put_entry(resource))
        else:
            self._entries.append({"fullUrl": full_url(resource), "resource": resource})

    def close(self) -> None:
        data = dumps(make_bundle(self._entries, self.bundle_type), pretty=True) + b"\n"
        atomic_write_bytes(self.path, data)

    def abort(self) -> None:
        self._entries.clear()


class NdjsonWriter:
    """Writes `<ResourceType>.ndjson` files into a folder (Bulk Data layout), atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        self._files: dict[str, IO[bytes]] = {}
        self._writes: dict[str, Callable[[bytes], int]] = {}  # each file's bound `write`: one lookup a resource

    def _file(self, kind: str) -> IO[bytes]:
        fh = self._files.get(kind)
        if fh is None:
            fh = self._files[kind] = open_private(self._tmp / f"{kind}.ndjson")
            self._writes[kind] = fh.write
        return fh

    def write(self, resource: Resource) -> None:
        kind = resource["resourceType"]
        write = self._writes.get(kind) or self._file(kind).write
        write(orjson.dumps(resource, option=orjson.OPT_APPEND_NEWLINE))

    def close(self) -> None:
        """Move the finished files into place; on any failure (a full disk) nothing is left behind."""
        try:
            for fh in self._files.values():
                fh.close()
            if not self.directory.exists():
                os.replace(self._tmp, self.directory)  # the private (0700) temp folder becomes the output
                return
            for old in ndjson_files(self.directory):
                old.unlink()
            for new in self._tmp.iterdir():
                os.replace(new, self.directory / new.name)
            self._tmp.rmdir()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for fh in self._files.values():
            try:
                fh.close()
            except OSError:
                pass  # the buffered tail could not be written (disk full): the file goes anyway
        shutil.rmtree(self._tmp, ignore_errors=True)


def writer_for(path: Path, fmt: str, bundle_type: str = "transaction") -> BundleWriter | NdjsonWriter:
    if fmt == "ndjson":
        return NdjsonWriter(path)
    if fmt == "bundle":
        return BundleWriter(path, bundle_type)
    raise ValueError(f"unknown output format {fmt!r}")


# --- preparing other tools' bundles for an idempotent push -------------------------------

def _rewrite_refs(node: Any, table: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and value in table:
                out[key] = table[value]
            else:
                out[key] = _rewrite_refs(value, table)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, table) for v in node]
    return node


def stable_ids(entries: list[dict[str, Any]]) -> list[Resource]:
    """Give every resource a stable id and turn `urn:uuid` references into `Type/id`.

    A resource without an id gets one derived from its fullUrl (or, lacking that, its
    content), so pushing the same file twice writes the same ids and creates nothing new.
    """
    import hashlib

    table: dict[str, str] = {}
    prepared: list[tuple[str | None, Resource]] = []
    for entry in entries:
        res = entry.get("resource")
        if not isinstance(res, dict) or "resourceType" not in res:
            continue
        if res.get("resourceType") == "OperationOutcome":
            continue
        url = entry.get("fullUrl")
        if not res.get("id"):
            seed = url or orjson.dumps(res, option=orjson.OPT_SORT_KEYS).decode()
            res = {**res, "id": "u" + hashlib.sha256(seed.encode()).hexdigest()[:32]}
        if url:
            table[url] = f"{res['resourceType']}/{res['id']}"
        prepared.append((url, res))
    if not table or not any(k.startswith("urn:") for k in table):
        return [r for _, r in prepared]
    return [_rewrite_refs(r, table) for _, r in prepared]


# Referenced types first, so a server that checks references on write (HAPI does) never sees
# a reference to something not yet pushed when an ndjson folder is pushed type by type.
PUSH_ORDER: tuple[str, ...] = (
    "Organization", "Practitioner", "Patient", "Encounter", "Medication", "Condition",
    "MedicationStatement", "Observation", "AdverseEvent",
)


def _push_rank(path: Path) -> tuple[int, str]:
    kind = path.stem
    return (PUSH_ORDER.index(kind) if kind in PUSH_ORDER else len(PUSH_ORDER), kind)


def iter_push_resources(path: str | Path) -> Iterator[Resource]:
    """Resources to push from a Bundle (urn:uuid references resolved) or ndjson files
    (a folder is read in reference order: Patients before what points at them)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(ndjson_files(p), key=_push_rank)
        if not files:
            raise InputError("folder holds no .ndjson files", file=str(p))
        for f in files:
            yield from _iter_ndjson_file(f)
        return
    if p.suffix == ".ndjson":
        yield from iter_resources(p)
        return
    if not p.exists():
        raise InputError("file not found", file=str(p))
    data = _load_json(p)
    if isinstance(data, dict) and data.get("resourceType") == "Bundle":
        yield from stable_ids([e for e in _entries(data, p) if isinstance(e, dict)])
    elif isinstance(data, dict) and "resourceType" in data:
        yield from stable_ids([{"resource": data}])
    else:
        raise InputError("not a FHIR resource or Bundle (no resourceType)", file=str(p))
