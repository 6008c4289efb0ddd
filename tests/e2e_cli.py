"""Shared by the end-to-end test files: run the real CLI in a subprocess with a per-test ledger."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

R = TypeVar("R", bound="Run")


@dataclass
class Run:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]

    @property
    def out_lines(self) -> list[str]:
        return [ln for ln in self.stdout.splitlines() if ln.strip()]

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __str__(self) -> str:
        return f"exit {self.exit_code}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


def run_cli(kind: type[R], *args: str | Path, state: Path, env: dict[str, str] | None = None,
            timeout: float = 300) -> R:
    """`python -m ruxo_fhir ARGS` with RUXO_FHIR_STATE_DIR=state and no inherited secrets."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("RUXO_FHIR_DEBUG", "RUXO_FHIR_TOKEN", "RUXO_FHIR_PASSWORD", "RUXO_FHIR_CONFIG")}
    full_env["PYTHONWARNINGS"] = "error"
    full_env["RUXO_FHIR_STATE_DIR"] = str(state)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "ruxo_fhir", *map(str, args)], capture_output=True,
                          text=True, encoding="utf-8", env=full_env, timeout=timeout)
    return kind(proc.returncode, proc.stdout, proc.stderr)
