"""The one atomic writer: complete file or none, owner-only (0600) from the first byte."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest

from ruxo_fhir.atomic import AtomicFile, atomic_open, atomic_write_bytes


def test_atomic_write_bytes_replaces_whole_file_private(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "cases.json"
    atomic_write_bytes(out, b"first")
    atomic_write_bytes(out, b"second")
    assert out.read_bytes() == b"second"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert [p.name for p in out.parent.iterdir()] == ["cases.json"]


def test_failure_inside_block_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    out = tmp_path / "cases.csv"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(out) as fh:
        fh.write(b"half")
        raise RuntimeError("disk full")
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["cases.csv"]


def test_atomic_file_text_mode_commit_and_abort(tmp_path: Path) -> None:
    out = tmp_path / "rejects.csv"
    target = AtomicFile(out, "w", encoding="utf-8", newline="")
    target.file.write("row,error\n")
    assert not out.exists()  # nothing visible until commit
    target.commit()
    assert out.read_text(encoding="utf-8") == "row,error\n"
    other = AtomicFile(tmp_path / "other.csv", "w", encoding="utf-8")
    other.file.write("x")
    other.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rejects.csv"]
