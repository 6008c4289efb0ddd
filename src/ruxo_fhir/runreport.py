"""Run reports: a small JSON record of each run, enough to reproduce or audit it (no PHI)."""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ruxo_fhir import __version__
from ruxo_fhir.atomic import atomic_write_bytes
from ruxo_fhir.errors import RuxoError
from ruxo_fhir.mapping.spec import MappingSpec
from ruxo_fhir.redact import redact_obj


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_of(path: Path) -> str | None:
    """sha256 of a file, or of a folder's files in name order; None when unreadable."""
    h = hashlib.sha256()
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if path.is_dir():
                h.update(f.relative_to(path).as_posix().encode() + b"\0")
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


@dataclass
class RunReport:
    """Counts, warnings and errors of one command run; ids only, never patient data."""

    command: str
    started: str
    options: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    server: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    mapping: dict[str, str] = field(default_factory=dict)
    ended: str | None = None
    status: str = "ok"

    @classmethod
    def start(cls, command: str, obj_args: dict[str, Any] | None = None) -> RunReport:
        return cls(command=command, started=_now(), options=dict(obj_args or {}))

    def add_input(self, path: Path) -> None:
        self.inputs.append({"path": str(path), "sha256": sha256_of(path)})

    def set_mapping(self, mapping: MappingSpec) -> None:
        self.mapping = {"source": mapping.source, "version": mapping.mapping_version, "sha256": mapping.digest}

    def fail(self, exc: RuxoError) -> None:
        self.status = "failed"
        self.errors.append(str(exc))

    def settled_status(self) -> str:
        """`ok` only when nothing was rejected; `partial` when some went through; else `failed`."""
        if self.status == "failed":
            return "failed"
        refused = sum(self.counts.get(k, 0) for k in ("rejected", "rows_rejected", "problems"))
        if not refused and not self.errors:
            return "ok"
        done = sum(self.counts.get(k, 0) for k in ("accepted", "created", "updated", "unchanged", "create",
                                                    "update"))
        return "partial" if done else "failed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": {"name": "ruxo-fhir", "version": __version__, "python": platform.python_version()},
            "command": self.command,
            "status": self.settled_status(),
            "start": self.started,
            "end": self.ended or _now(),
            "options": self.options,
            "inputs": self.inputs,
            "server": self.server,
            "mapping": self.mapping,
            "counts": self.counts,
            "warnings": self.warnings,
            "errors": self.errors,
        }

    def write(self, path: Path | None) -> None:
        if path is None:
            return
        self.ended = _now()
        atomic_write_bytes(path, json.dumps(redact_obj(self.to_dict()), indent=2, ensure_ascii=False).encode() + b"\n")
