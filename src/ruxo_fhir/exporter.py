"""The export stage: FHIR (Bundle or ndjson) -> canonical case-record CSV."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from ruxo_fhir.bundle import atomic_write_bytes, iter_resources
from ruxo_fhir.mapping.reverse import CaseAssembler
from ruxo_fhir.mapping.spec import MappingSpec
from ruxo_fhir.records import CANONICAL_COLUMNS, CaseRecord


@dataclass
class ExportResult:
    rows: int
    skipped: int
    warnings: list[str] = field(default_factory=list)


def read_cases(source: str | Path, mapping: MappingSpec) -> tuple[list[CaseRecord], CaseAssembler]:
    """All case records found in a Bundle / ndjson source, with the assembler's counters."""
    assembler = CaseAssembler(mapping).add_all(iter_resources(source))
    return list(assembler.records()), assembler


def render_csv(records: list[CaseRecord], *, excel: bool = False) -> bytes:
    """Canonical CSV: UTF-8 without BOM and commas; `excel` adds a BOM and uses `;`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CANONICAL_COLUMNS, delimiter=";" if excel else ",",
                            lineterminator="\r\n" if excel else "\n")
    writer.writeheader()
    for record in records:
        writer.writerow(record.to_row())
    data = buf.getvalue().encode("utf-8")
    return b"\xef\xbb\xbf" + data if excel else data


def export_cases(source: str | Path, output: str | Path, *, mapping: MappingSpec, excel: bool = False) -> ExportResult:
    records, assembler = read_cases(source, mapping)
    atomic_write_bytes(Path(output), render_csv(records, excel=excel))
    return ExportResult(rows=len(records), skipped=assembler.skipped, warnings=assembler.warnings)
