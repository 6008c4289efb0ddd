"""Architecture checks: import boundaries (import-linter) and type hints (mypy --strict)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_import_boundaries_hold() -> None:
    """mapping/ never imports transport, sync or the CLI; requests only under transport/."""
    exe = shutil.which("lint-imports")
    assert exe, "import-linter is part of the test extra: pip install -e '.[test]'"
    proc = _run([exe, "--config", "pyproject.toml"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_click_and_requests_stay_at_their_edges() -> None:
    src = ROOT / "src" / "ruxo_fhir"
    for path in src.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(src).as_posix()
        if rel != "cli.py":
            assert "import click" not in text, f"{rel} imports click (only cli.py may)"
        if not rel.startswith("transport/"):
            assert "import requests" not in text, f"{rel} imports requests (only transport/ may)"


def test_package_type_checks_strict() -> None:
    proc = _run([sys.executable, "-m", "mypy"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
