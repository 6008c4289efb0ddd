"""The push ledger: what was pushed where, so unchanged data is not written again.

A cache, never the truth: a resource is skipped only when its content hash is unchanged
AND the server still shows the versionId and meta.lastUpdated we recorded (checked in
batched reads), so a server that was reset or edited behind our back gets everything it
lacks. Both, because serial version ids ("1", "2", ... as HAPI counts) repeat after a reset:
a reset server that someone else refilled shows version "1" again, but not our lastUpdated.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import platformdirs

from ruxo_fhir.errors import InputError
from ruxo_fhir.redact import redact

_COLUMNS = {"server", "key", "hash", "version_id"}


def state_dir() -> Path:
    """`RUXO_FHIR_STATE_DIR`, else the user state dir (e.g. ~/.local/state/ruxo-fhir)."""
    env = os.environ.get("RUXO_FHIR_STATE_DIR")
    return Path(env) if env else Path(platformdirs.user_state_dir("ruxo-fhir"))


def _same_numbers(node: Any) -> Any:
    """Integral floats as ints: a server echoes 2.0 as 2, which is the same FHIR decimal value."""
    if isinstance(node, float) and node.is_integer():
        return int(node)
    if isinstance(node, dict):
        return {k: _same_numbers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_same_numbers(v) for v in node]
    return node


def content_hash(resource: dict[str, Any]) -> str:
    """Hash of the resource's content without `meta` (servers rewrite meta on every write),
    numbers compared by value so a server's re-rendering of 2.0 as 2 is not a change."""
    body = _same_numbers({k: v for k, v in resource.items() if k != "meta"})
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def server_key(base_url: str) -> str:
    return base_url.rstrip("/")


class Pushed(NamedTuple):
    """What the ledger knows of one resource on one server."""

    hash: str
    version_id: str | None
    last_updated: str | None  # the server's meta.lastUpdated of that version, as it wrote it


class Written(NamedTuple):
    """What this workstation last wrote for one identity on one server."""

    hash: str
    server_id: str | None
    version_id: str | None
    last_updated: str | None


class Ledger:
    """sqlite (stdlib) table keyed by (server base URL, Type/id)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or state_dir() / "push-ledger.sqlite3"
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._guard():
            if not self.path.exists() and not self.path.is_symlink():
                # created 0600 before sqlite opens it: its -wal/-shm files take the same mode
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            # check_same_thread off: `push --concurrency` records from its sending threads; every
            # call below holds `_lock`, so the connection is never used by two threads at once
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            self._lock = threading.Lock()
            # the schema is checked before anything is written: an unusable ledger stays as it was
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(pushed)")}
            if columns and not columns >= _COLUMNS:
                self._db.close()
                raise sqlite3.DatabaseError(f"table 'pushed' lacks {', '.join(sorted(_COLUMNS - columns))}")
            # WAL + NORMAL: a commit per chunk without an fsync each time; a crash loses at most the
            # last records, which only means those resources are sent again (PUTs are idempotent).
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS pushed (server TEXT NOT NULL, key TEXT NOT NULL, "
                "hash TEXT NOT NULL, version_id TEXT, last_updated TEXT, PRIMARY KEY (server, key))"
            )
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(pushed)")}
            if "last_updated" not in columns:  # a ledger from an older version: its rows never skip
                self._db.execute("ALTER TABLE pushed ADD COLUMN last_updated TEXT")
            # Per server and identity (Type|system|value, never a server id): what was last written,
            # the id the server holds it under and the version (+ lastUpdated) it reported.
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS written (server TEXT NOT NULL, identity TEXT NOT NULL, "
                "hash TEXT NOT NULL, server_id TEXT, version_id TEXT, last_updated TEXT, "
                "PRIMARY KEY (server, identity))"
            )
            self._db.commit()

    def written(self, server: str, identities: Iterable[str]) -> dict[str, Written]:
        """{identity: Written(hash, server id, versionId, lastUpdated)} for the identities known."""
        out: dict[str, Written] = {}
        keys = list(identities)
        with self._lock:
            for i in range(0, len(keys), 500):
                part = keys[i:i + 500]
                marks = ",".join("?" * len(part))
                rows = self._db.execute(
                    f"SELECT identity, hash, server_id, version_id, last_updated FROM written WHERE server = ? "
                    f"AND identity IN ({marks})", [server_key(server), *part])
                for ident, digest, sid, version, last_updated in rows:
                    out[ident] = Written(digest, sid, version, last_updated)
        return out

    def record_written(self, server: str, rows: Iterable[tuple[str, Written]]) -> None:
        """Store (identity, Written) after the server confirmed a write (one commit)."""
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO written (server, identity, hash, server_id, version_id, last_updated) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(server_key(server), i, w.hash, w.server_id, w.version_id, w.last_updated) for i, w in rows])
            self._db.commit()

    def forget_written(self, server: str, identities: Iterable[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM written WHERE server = ? AND identity = ?",
                                 [(server_key(server), i) for i in identities])
            self._db.commit()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Any failure of the ledger database (garbage, truncated, wrong schema, a folder) is one
        line naming the file and what to do: it is a cache, safe to move aside."""
        try:
            yield
        except (sqlite3.DatabaseError, IsADirectoryError, NotADirectoryError) as exc:
            raise InputError(
                f"the push ledger is unusable ({exc}); move it aside or delete it (it is only a cache: the next "
                "push re-checks the server), or run with --no-ledger", file=str(self.path)) from None

    def lookup(self, server: str, keys: Iterable[str]) -> dict[str, Pushed]:
        """{Type/id: Pushed(hash, versionId, lastUpdated)} for the keys the ledger knows."""
        out: dict[str, Pushed] = {}
        key_list = list(keys)
        with self._lock, self._guard():
            self._lookup(server, key_list, out)
        return out

    def _lookup(self, server: str, key_list: list[str], out: dict[str, Pushed]) -> None:
        for i in range(0, len(key_list), 500):
            part = key_list[i:i + 500]
            marks = ",".join("?" * len(part))
            rows = self._db.execute(
                f"SELECT key, hash, version_id, last_updated FROM pushed WHERE server = ? AND key IN ({marks})",
                [server_key(server), *part],
            )
            for key, digest, version, last_updated in rows:
                out[key] = Pushed(digest, version, last_updated)

    def record(self, server: str, items: Iterable[tuple[str, Pushed]]) -> None:
        """Store (Type/id, Pushed) after the server confirmed the write (one commit)."""
        rows = [(server_key(server), k, p.hash, redact(p.version_id) if p.version_id else p.version_id,
                 p.last_updated) for k, p in items]
        with self._lock, self._guard():
            self._db.executemany(
                "INSERT OR REPLACE INTO pushed (server, key, hash, version_id, last_updated) VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            self._db.commit()

    def forget(self, server: str) -> None:
        self._db.execute("DELETE FROM pushed WHERE server = ?", [server_key(server)])
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
