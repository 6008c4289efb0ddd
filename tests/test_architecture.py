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
    proc = _run([exe, "pyproject.toml"])
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


def test_cli_holds_no_orchestration() -> None:
    """cli.py parses options, calls one `ruxo_fhir.api` function and renders: short functions,
    no reach into the stages, transport or sync internals."""
    import ast

    path = ROOT / "src" / "ruxo_fhir" / "cli.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            assert length <= 40, f"cli.py: {node.name} is {length} lines (at most 40: move logic to api.py)"
        if isinstance(node, ast.ImportFrom) and node.module:
            allowed = node.module in ("ruxo_fhir", "ruxo_fhir.errors", "ruxo_fhir.logs", "ruxo_fhir.redact",
                                      "ruxo_fhir.report") or \
                not node.module.startswith("ruxo_fhir")
            assert allowed, f"cli.py imports {node.module} (go through ruxo_fhir.api)"
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert not alias.name.startswith("ruxo_fhir."), f"cli.py imports {alias.name}"


def test_ruff_is_clean() -> None:
    """The pinned rule set in pyproject.toml ([tool.ruff]) holds for src, tests and benchmarks."""
    exe = shutil.which("ruff")
    assert exe, "ruff is part of the test extra: pip install -e '.[test]'"
    proc = _run([exe, "check", "src", "tests", "benchmarks", "scripts"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_tests_that_start_the_fhir_server_are_marked_e2e() -> None:
    """`pytest -m "not e2e"` must not start a server: the modules built around one say so."""
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        text = path.read_text(encoding="utf-8")
        if "ThreadingHTTPServer(" in text or "TestFhirServer(" in text:
            assert "mark.e2e" in text, f"{path.name} starts a server but marks no test e2e"
