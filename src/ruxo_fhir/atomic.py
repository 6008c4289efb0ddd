"""The one atomic-writer policy: a private temp file beside the target, renamed into place.

Every output that may hold patient data (bundles, CSVs, rejects, reports, ledgers' exports) is
written through here, so a failed or interrupted run never leaves a half-written file and the
file is readable by its owner only (0600, from ``tempfile.mkstemp``) from its first byte.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def open_private(path: Path) -> IO[bytes]:
    """A new file for writing, readable by the owner only (0600): outputs hold patient data."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")


class AtomicFile:
    """A 0600 temp file beside ``path`` (same file system, so the rename is atomic).

    Write to ``file``; ``commit()`` closes it and renames it over ``path``; ``abort()`` closes
    and removes it. Text mode takes ``encoding``/``errors``/``newline`` like ``open``.
    """

    def __init__(self, path: Path, mode: str = "wb", **open_kwargs: Any) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        self.tmp = Path(tmp)
        try:
            self.file: IO[Any] = os.fdopen(fd, mode, **open_kwargs)
        except BaseException:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise

    def commit(self) -> None:
        try:
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass  # the buffered tail could not be written (disk full): the file goes anyway
        self.tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: Path, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """``with atomic_open(p) as fh:`` -- ``p`` appears complete when the block ends, never otherwise."""
    target = AtomicFile(path, mode, **open_kwargs)
    try:
        yield target.file
    except BaseException:
        target.abort()
        raise
    target.commit()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``data`` into ``path`` atomically (0600)."""
    with atomic_open(path) as fh:
        fh.write(data)
