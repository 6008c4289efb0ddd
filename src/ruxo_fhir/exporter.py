"""The export stage: FHIR (Bundle or ndjson) -> canonical case-record CSV."""
from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ruxo_fhir.atomic import atomic_open
from ruxo_fhir.bundle import iter_resources
from ruxo_fhir.csvsafe import SafeDictWriter
from ruxo_fhir.mapping.reverse import CaseAssembler
from ruxo_fhir.mapping.spec import MappingSpec
from ruxo_fhir.outpaths import guard_outputs
from ruxo_fhir.records import CANONICAL_COLUMNS, CaseRecord
from ruxo_fhir.validate import shape_reason


@dataclass
class ExportResult:
    rows: int
    skipped: int
    warnings: list[str] = field(default_factory=list)


def read_cases(source: str | Path, mapping: MappingSpec) -> tuple[list[CaseRecord], CaseAssembler]:
    """All case records of a small source as a list (library convenience; export streams)."""
    with CaseAssembler(mapping) as assembler:
        assembler.explain = shape_reason
        assembler.add_all(iter_resources(source))
        return list(assembler.records()), assembler


NUMBER_COLUMNS = ("improvement_pct", "baseline_score", "followup_score")


def decimal_comma(excel: bool, decimal: str | None) -> bool:
    """`;` files are for spreadsheets whose locale reads `45,5`: decimal comma unless told otherwise."""
    if decimal is None:
        return excel
    if decimal not in ("comma", "point"):
        raise ValueError(f"decimal must be 'comma' or 'point', not {decimal!r}")
    return decimal == "comma"


def render_csv(records: Iterable[CaseRecord], *, excel: bool = False, decimal: str | None = None) -> bytes:
    """Canonical CSV as bytes (for small outputs; `write_csv` streams)."""
    buf = io.BytesIO()
    write_csv(records, buf, excel=excel, decimal=decimal)
    return buf.getvalue()


def write_csv(records: Iterable[CaseRecord], out: IO[bytes], *, excel: bool = False,
              decimal: str | None = None) -> int:
    """Canonical CSV: UTF-8 without BOM and commas; `excel` adds a BOM, uses `;` and decimal
    commas (so a French spreadsheet reads 45,5 as a number, not text); `decimal` overrides.
    Formula-like cells get a leading `'` (csvsafe); the importer strips it again."""
    comma = decimal_comma(excel, decimal)
    text = io.TextIOWrapper(out, encoding="utf-8-sig" if excel else "utf-8", newline="", write_through=True)
    writer = SafeDictWriter(text, fieldnames=CANONICAL_COLUMNS, delimiter=";" if excel else ",",
                            lineterminator="\r\n" if excel else "\n")
    writer.writeheader()
    n = 0
    for record in records:
        row = record.to_row()
        if comma:
            for column in NUMBER_COLUMNS:
                row[column] = row[column].replace(".", ",")
        writer.writerow(row)
        n += 1
    text.flush()
    text.detach()
    return n


def export_cases(source: str | Path, output: str | Path, *, mapping: MappingSpec, excel: bool = False,
                 decimal: str | None = None) -> ExportResult:
    """Stream a FHIR source to the canonical CSV: resources wait in a temporary sqlite file,
    rows are written as they are assembled, the output appears atomically at the end."""
    out = Path(output)
    guard_outputs({"FILE": source}, {"-o": out})
    with CaseAssembler(mapping) as assembler, atomic_open(out) as fh:
        assembler.explain = shape_reason
        assembler.add_all(iter_resources(source))
        rows = write_csv(assembler.records(), fh, excel=excel, decimal=decimal)
    return ExportResult(rows=rows, skipped=assembler.skipped, warnings=assembler.warnings)
