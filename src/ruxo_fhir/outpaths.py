"""One guard for output paths: no output may be an input, or another output of the same run.

Checked before anything is written, so ``--rejects cases.csv`` can never destroy the input.
Paths are compared after resolving symlinks, and as files (same device and inode) when both
exist, so an alias or a hard link is caught too.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ruxo_fhir.errors import UsageError


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def guard_outputs(inputs: Mapping[str, str | Path | None], outputs: Mapping[str, str | Path | None]) -> None:
    """UsageError (exit 2) when an output equals an input or another output.

    Keys name the option (``"-o"``, ``"--rejects"``, ``"CASES"``) for the one-line message.
    """
    ins = [(name, Path(p)) for name, p in inputs.items() if p is not None]
    outs = [(name, Path(p)) for name, p in outputs.items() if p is not None]
    for i, (out_name, out) in enumerate(outs):
        for in_name, src in ins:
            if _same(out, src):
                raise UsageError(f"{out_name} {out} is the input {in_name} ({src}); refusing to overwrite an "
                                 "input (nothing was written)")
        for other_name, other in outs[:i]:
            if _same(out, other):
                raise UsageError(f"{out_name} and {other_name} are the same file ({out}); refusing to write "
                                 "two outputs to one path (nothing was written)")
