"""Build hook: ship mappings/default.yaml inside the package (one file in the repo, one copy in the wheel).

Everything else about the build is in pyproject.toml; this only exists because setuptools cannot
map a single file from outside the package directory into it declaratively.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PACKAGED = {"mappings/default.yaml": "ruxo_fhir/data/default.yaml"}


class BuildPyWithData(build_py):  # type: ignore[misc]
    """Copies the shipped mapping into build/lib/ruxo_fhir/data/ next to the code."""

    def run(self) -> None:
        super().run()
        for src, dst in PACKAGED.items():
            source = HERE / src
            if not source.is_file():
                raise SystemExit(f"{source}: missing; the wheel cannot ship without the default mapping")
            target = Path(self.build_lib) / dst
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), *(str(Path(self.build_lib) / d) for d in PACKAGED.values())]


setup(cmdclass={"build_py": BuildPyWithData})
