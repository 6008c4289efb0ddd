"""CLI promises of the README: global options anywhere, JSON status lines, explicit --fhir-version, terminal progress."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import EXAMPLE_CSV, invoke, run_cli


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_and_log_format_are_accepted_after_the_subcommand(tmp_path: Path, where: str) -> None:
    flags = ["-q", "--log-format", "json"]
    args = ["import", str(EXAMPLE_CSV), "-o", str(tmp_path / "b.json")]
    result = run_cli(*(flags + args if where == "before" else args + flags))
    assert result.exit_code == 0, str(result)
    lines = result.stderr_lines
    assert len(lines) == 1  # -q: only the summary
    record = json.loads(lines[0])  # --log-format json: the summary line is JSON too
    assert record["msg"] == "accepted 12, rejected 0, total 12" and record["level"] == "info"


def test_verbose_after_the_subcommand(tmp_path: Path) -> None:
    quiet = run_cli("import", EXAMPLE_CSV, "-o", tmp_path / "a.json")
    verbose = run_cli("import", EXAMPLE_CSV, "-o", tmp_path / "b.json", "-vv", "--log-format=json")
    assert verbose.exit_code == 0
    assert all(json.loads(line) for line in verbose.stderr_lines)  # every stderr line is JSON
    assert len(verbose.stderr_lines) >= len(quiet.stderr_lines)


def test_errors_and_warnings_are_json_lines_too(tmp_path: Path) -> None:
    result = run_cli("import", tmp_path / "missing.csv", "-o", tmp_path / "x.json", "--log-format", "json")
    assert result.exit_code == 3
    record = json.loads(result.stderr_lines[-1])
    assert record["level"] == "error" and record["msg"].startswith("error:")


def test_a_value_that_looks_like_a_flag_is_left_alone(tmp_path: Path) -> None:
    # only the global flags move; everything after `--` stays where it is
    result = invoke("import", "--", str(EXAMPLE_CSV), "-o", str(tmp_path / "b.json"))
    assert result.exit_code in (0, 2)  # click's own reading of `--`; never a crash
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_an_explicit_fhir_version_beats_the_profile(fhir_server: Any, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[servers.t]\nurl = "{fhir_server.base_url}"\nfhir_version = "R5"\n', encoding="utf-8")
    # the profile says R5 and the engine is R4: check says the version does not fit
    profile_only = run_cli("check", "--profile", "t", "--config", config)
    version_line = next(ln for ln in profile_only.stdout.splitlines() if "FHIR version" in ln)
    assert "[FAIL]" in version_line and profile_only.exit_code == 5, str(profile_only)
    # an explicit --fhir-version wins over the profile's
    explicit = run_cli("check", "--profile", "t", "--config", config, "--fhir-version", "R4")
    version_line = next(ln for ln in explicit.stdout.splitlines() if "FHIR version" in ln)
    assert "[  ok]" in version_line and explicit.exit_code == 0, str(explicit)


def _on_a_terminal(*args: str | Path, env: dict[str, str]) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal; (exit code, everything it wrote there)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ruxo_fhir", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    code = proc.wait(120)
    os.close(master)
    return code, out.decode("utf-8", "replace")


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["csv", "bundle", "ndjson"])
def test_progress_on_a_terminal_has_a_total_for_every_input_kind(fhir_server: Any, tmp_path: Path, kind: str) -> None:
    source: Path = EXAMPLE_CSV
    if kind != "csv":
        source = tmp_path / ("b.json" if kind == "bundle" else "nd")
        fmt = ["--format", "ndjson"] if kind == "ndjson" else []
        assert invoke("import", EXAMPLE_CSV, "-o", source, *fmt).exit_code == 0
    env = {**os.environ, "RUXO_FHIR_STATE_DIR": str(tmp_path / "state"), "TERM": "dumb"}
    code, said = _on_a_terminal("push", source, "--server", fhir_server.base_url, env=env)
    assert code == 0, said
    assert re.search(r"pushed 74/74 \(100 %\)", said), said
