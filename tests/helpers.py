"""Small shared helpers for tests: run the real CLI, read CSVs and bundles, write case files."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CSV = REPO / "examples" / "cases.csv"
DEFAULT_MAPPING = REPO / "mappings" / "default.yaml"
DATA = Path(__file__).resolve().parent / "data"

# The canonical columns in the order of the table in issue 3 (the export order). Written out
# here on purpose, not imported from the code under test.
CANONICAL = (
    "case_id", "patient_id", "sex", "birth_date", "indication", "site", "disease_onset",
    "prior_treatments", "treatment_start", "frequency", "evaluation_date", "improvement_pct",
    "score_name", "baseline_score", "followup_score", "adverse_events", "recurrence_after_stop",
)
REJECT_HEADER = (*CANONICAL, "row", "error")

# Identifier systems of the shipped mapping (mappings/default.yaml), spelled out for the tests.
CASE_SYSTEM = "https://ruxo-fhir.example/sid/case-id"
PATIENT_SYSTEM = "https://ruxo-fhir.example/sid/patient-id"
RESOURCE_SYSTEM = "https://ruxo-fhir.example/sid/case-resource"

SUMMARY_RE = r"accepted (\d+), rejected (\d+), total (\d+)"


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    @property
    def last_stderr_line(self) -> str:
        lines = self.stderr_lines
        return lines[-1] if lines else ""

    def __str__(self) -> str:  # shown in assertion messages
        return f"exit {self.exit_code}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


def run_cli(*args: str | Path, cwd: Path | None = None, timeout: float = 120) -> CliResult:
    """Run `python -m ruxo_fhir ARGS` in a subprocess: real exit codes, real stderr."""
    env = {k: v for k, v in os.environ.items() if k != "RUXO_FHIR_DEBUG"}
    env["PYTHONWARNINGS"] = "error"  # warnings are bugs, in the CLI too
    proc = subprocess.run(
        [sys.executable, "-m", "ruxo_fhir", *map(str, args)],
        capture_output=True, text=True, encoding="utf-8", cwd=cwd, env=env, timeout=timeout, check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def invoke(*args: str | Path) -> CliResult:
    """Run the click CLI in-process (fast): the same commands, exit codes and stderr text.

    An exception escaping the CLI (other than SystemExit) is appended to stderr as a
    traceback, so `"Traceback" not in stderr` checks still catch it.
    """
    import logging
    import traceback

    from click.testing import CliRunner

    from ruxo_fhir.cli import cli

    logger = logging.getLogger("ruxo_fhir")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="ruxo-fhir", catch_exceptions=True)
    finally:  # the CLI points its log handler at the runner's stderr; put things back
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        assert result.exc_info is not None
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return CliResult(result.exit_code, result.stdout, stderr)


def read_csv_rows(path: Path, *, delimiter: str = ",", encoding: str = "utf-8") -> list[dict[str, str]]:
    with path.open(encoding=encoding, newline="") as fh:
        return list(csv.DictReader(fh, delimiter=delimiter))


def unguard(cell: str) -> str:
    """A cell as meant: our exports put one ' before formula-like cells, even after quotes (OWASP)."""
    return cell[1:] if cell[:1] == "'" and cell.lstrip("'")[:1] in ("=", "+", "-", "@", "\t", "\r") and \
        cell.lstrip("'") != "" else cell


def read_exported_rows(path: Path, *, delimiter: str = ",", encoding: str = "utf-8") -> list[dict[str, str]]:
    """read_csv_rows of an export, formula guards taken off."""
    return [{k: unguard(v) for k, v in row.items()} for row in read_csv_rows(path, delimiter=delimiter,
                                                                             encoding=encoding)]


def read_csv_header(path: Path, *, delimiter: str = ",", encoding: str = "utf-8") -> list[str]:
    with path.open(encoding=encoding, newline="") as fh:
        return next(csv.reader(fh, delimiter=delimiter))


def write_cases(path: Path, rows: Iterable[Mapping[str, Any]], *, columns: Iterable[str] = CANONICAL,
                delimiter: str = ",", encoding: str = "utf-8") -> Path:
    """Write a case CSV with the given columns (missing values empty)."""
    columns = list(columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, delimiter=delimiter, lineterminator="\n",
                            extrasaction="raise")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


def case_row(case_id: str, patient_id: str = "P1", **values: str) -> dict[str, str]:
    """A minimal valid row (required columns filled) plus overrides."""
    row = dict.fromkeys(CANONICAL, "")
    row.update(case_id=case_id, patient_id=patient_id, sex="F", indication="morphea",
               treatment_start="2024-05-02", frequency="BID")
    row.update(values)
    return row


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def bundle_resources(path: Path) -> list[dict[str, Any]]:
    """Resources of a Bundle JSON file, in entry order."""
    return [entry["resource"] for entry in load_json(path)["entry"]]


def ndjson_resources(directory: Path) -> dict[str, list[dict[str, Any]]]:
    """`{file name: [resources]}` of every .ndjson file in a folder."""
    out: dict[str, list[dict[str, Any]]] = {}
    for f in sorted(directory.glob("*.ndjson")):
        out[f.name] = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


def of_type(resources: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in resources if r.get("resourceType") == kind]


def identifier_values(resource: dict[str, Any], system: str) -> list[str]:
    ident = resource.get("identifier")
    idents = [ident] if isinstance(ident, dict) else (ident or [])
    return [i["value"] for i in idents if i.get("system") == system]


def by_reference(resources: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`{"Type/id": resource}`."""
    return {f"{r['resourceType']}/{r['id']}": r for r in resources}


def all_codings(obj: Any) -> Iterable[dict[str, Any]]:
    """Every dict with a `system` key anywhere inside a resource (codings, identifiers, quantities)."""
    if isinstance(obj, dict):
        if isinstance(obj.get("system"), str):
            yield obj
        for value in obj.values():
            yield from all_codings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from all_codings(value)


def default_mapping_data() -> dict[str, Any]:
    """The shipped mapping file as plain data, to be modified into a site mapping."""
    import yaml

    data = yaml.safe_load(DEFAULT_MAPPING.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def write_mapping(path: Path, data: Mapping[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(dict(data), allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path
