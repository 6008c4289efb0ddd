"""A fresh install works: the wheel carries the default mapping and runs the main job outside the repo."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import DEFAULT_MAPPING, EXAMPLE_CSV, REPO

# What a wheel is built from: the project files, nothing of the tests or the CI around them.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "src", "mappings")


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel --no-deps` of a copy of the project (the worktree stays untouched)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "project"
    src.mkdir()
    for name in BUILD_INPUTS:
        item = REPO / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "data"))
        else:
            shutil.copy2(item, src / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(src)],
         cwd=root, env=env)
    wheels = list((root / "dist").glob("ruxo_fhir-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_wheel_carries_the_default_mapping_byte_for_byte(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "ruxo_fhir/data/default.yaml" in names, names
        assert zf.read("ruxo_fhir/data/default.yaml") == DEFAULT_MAPPING.read_bytes()
        assert "ruxo_fhir/py.typed" in names
        # every subpackage made it (a package missing from the wheel fails only at import time)
        for pkg in ("mapping", "sync", "transport"):
            assert f"ruxo_fhir/{pkg}/__init__.py" in names


def test_a_wheel_install_in_a_fresh_venv_runs_the_main_job(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    # system site packages only for the dependencies (no downloads); the wheel's ruxo_fhir must win
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    py = bindir / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    work = tmp_path / "elsewhere"  # not the repo: nothing can be found by walking up from the cwd
    work.mkdir()
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=work, env=env)
    where = _run([str(py), "-c", "import ruxo_fhir, ruxo_fhir.mapping.spec as s; "
                  "print(ruxo_fhir.__file__); print(s.default_mapping_path())"], cwd=work, env=env)
    module_file, mapping_path = where.stdout.splitlines()
    assert Path(module_file).resolve().is_relative_to(venv.resolve()), module_file
    assert Path(mapping_path).resolve().is_relative_to(venv.resolve()), mapping_path

    cases = shutil.copy(EXAMPLE_CSV, work / "cases.csv")
    cli = str(bindir / "ruxo-fhir")
    imp = subprocess.run([cli, "import", str(cases), "-o", "bundle.json"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert imp.returncode == 0, imp.stderr
    assert "accepted 12, rejected 0, total 12" in imp.stderr
    out = subprocess.run([cli, "outcomes", "bundle.json", "--format", "json"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)["summary"]
    assert (summary["complete"] + summary["partial"], summary["evaluable"]) == (11, 12), summary

    # the installed tool writes what the checkout writes, byte for byte
    ref = tmp_path / "ref.json"
    env_repo = {**env, "PYTHONPATH": str(REPO / "src")}
    _run([sys.executable, "-m", "ruxo_fhir", "import", str(EXAMPLE_CSV), "-o", str(ref)], cwd=tmp_path, env=env_repo)
    assert (work / "bundle.json").read_bytes() == ref.read_bytes()
