"""Start-up: a command loads only what it uses (issue 16: a small job starts fast).

Each check runs in a fresh interpreter and reads `sys.modules` after the work: which modules
were imported is exact, so these tests time nothing and cannot flake on a loaded machine.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import EXAMPLE_CSV

# Third-party packages and our own layers, by what needs them.
MODELS = ("pydantic", "pydantic_core", "fhir", "fhir_core", "fhirpathpy", "yaml")  # mapping, validation
SERVER = ("requests", "urllib3", "jwt", "platformdirs", "tomllib", "ruxo_fhir.sync", "ruxo_fhir.transport")
PLOT = ("matplotlib", "numpy", "scipy")


def loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    script = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(proc.stdout.split())


def under(modules: set[str], *roots: str) -> list[str]:
    return sorted(m for m in modules if any(m == r or m.startswith(f"{r}.") for r in roots))


def test_help_and_usage_errors_load_no_model_mapping_or_server_code() -> None:
    """`--help`, a command's `--help` and a usage error only parse options (click and our CLI)."""
    for args in (["--help"], ["import", "--help"], ["push", "--help"], ["import"]):
        loaded = loaded_after("import click\nfrom ruxo_fhir.cli import cli\ntry:\n"
                              f"    cli.main({args!r}, prog_name='ruxo-fhir', standalone_mode=False)\n"
                              "except click.UsageError:\n    pass")  # `import` without CASES
        assert "ruxo_fhir.cli" in loaded
        heavy = under(loaded, *MODELS, *SERVER, *PLOT, "ruxo_fhir.api", "ruxo_fhir.mapping", "ruxo_fhir.importer")
        assert not heavy, f"{args}: {heavy}"


def test_import_loads_no_server_or_plot_code_and_no_fhirpath_engine(tmp_path: Path) -> None:
    """An import maps and validates: the models and rules, not the HTTP stack, the config
    file reader or the plot; the cohort's invariants are all simple enough to be decided in
    Python (conformance._quick), so fhirpathpy and its parser (~0.2 s) are not loaded either."""
    out = tmp_path / "out"
    loaded = loaded_after("from ruxo_fhir import api\n"
                          f"api.import_file({str(EXAMPLE_CSV)!r}, {str(out)!r}, api.ImportOptions(fmt='ndjson'))")
    assert {"ruxo_fhir.importer", "ruxo_fhir.conformance", "fhir.resources"} <= loaded  # it did validate
    assert sorted(out.glob("*.ndjson"))
    assert not under(loaded, *SERVER, *PLOT, "fhirpathpy", "antlr4")


def test_an_invariant_that_needs_fhirpath_loads_one_version_model() -> None:
    """obs-7 with a component reads %resource inside where(): fhirpathpy evaluates it, with its
    model of the one FHIR version in use (its `fhirpathpy.models` module reads all four)."""
    obs = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "a"},
           "valueString": "x", "component": [{"code": {"text": "b"}, "valueString": "y"}]}
    loaded = loaded_after("from ruxo_fhir.validate import Validator\n"
                          f"assert Validator('R4', fast=False).check({obs!r}) == []")
    assert "fhirpathpy" in loaded
    assert not under(loaded, "fhirpathpy.models")


def test_outcomes_of_a_file_loads_no_server_code() -> None:
    loaded = loaded_after(f"from ruxo_fhir import api\napi.outcomes({str(EXAMPLE_CSV)!r})")
    assert "ruxo_fhir.outcomes" in loaded
    assert not under(loaded, *SERVER, *PLOT)
