"""The import stage: case CSV -> validated FHIR (Bundle or ndjson) plus a rejects file."""
from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ruxo_fhir.bundle import atomic_write_bytes, writer_for
from ruxo_fhir.fhir_version import FhirVersion, to_version
from ruxo_fhir.mapping.forward import ForwardMapper, Resource
from ruxo_fhir.mapping.spec import MappingSpec
from ruxo_fhir.records import CANONICAL_COLUMNS, Accepted, CaseReader, CaseRecord, ReadReport, Reject, _digest
from ruxo_fhir.validate import Validator

REJECT_COLUMNS: tuple[str, ...] = (*CANONICAL_COLUMNS, "row", "error")


@dataclass
class ImportResult:
    """What an import did: the read report, resource counts per type, where things went."""

    report: ReadReport
    output: Path
    rejects_path: Path
    resources: Counter[str] = field(default_factory=Counter)

    @property
    def summary_line(self) -> str:
        r = self.report
        return f"accepted {r.accepted}, rejected {r.rejected}, total {r.total}"


def default_rejects_path(source: Path, output: Path) -> Path:
    """`<input stem>.rejects.csv` beside the output."""
    return output.parent / f"{source.stem}.rejects.csv"


def write_rejects(path: Path, rejects: list[Reject]) -> None:
    """UTF-8, comma: the row's values under the canonical names, plus `row` and `error`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REJECT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for rej in rejects:
        writer.writerow({**rej.values, "row": rej.row, "error": rej.message})
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def case_resources(
    reader: CaseReader,
    mapping: MappingSpec,
    version: FhirVersion,
    on_reject: Callable[[Reject], None],
) -> Iterator[tuple[CaseRecord, list[Resource]]]:
    """Accepted cases with their validated resources; invalid ones become rejects.

    A Patient is emitted once, with the first accepted case of its patient_id; the set of
    emitted patients holds 8-byte digests, not resources.
    """
    mapper = ForwardMapper(mapping)
    validator = Validator(version)
    emitted: set[bytes] = set()
    for item in reader:
        if isinstance(item, Reject):
            on_reject(item)
            continue
        record = item.record
        key = _digest(record.patient_id)
        resources = [to_version(r, version) for r in mapper.case(record, include_patient=key not in emitted)]
        problems = [p for res in resources for p in validator.validate(res)]
        if problems:
            reader.report.accepted -= 1
            reader.report.rejected += 1
            first = problems[0]
            on_reject(Reject(record.row or 0, record.to_row(), first.location,
                             f"FHIR {version} validation failed: {first.message}"))
            continue
        emitted.add(key)
        yield record, resources


def import_cases(
    source: str | Path,
    output: str | Path,
    *,
    mapping: MappingSpec,
    fmt: str = "bundle",
    version: FhirVersion = "R4",
    rejects_path: str | Path | None = None,
    on_accepted: Callable[[Accepted | CaseRecord], None] | None = None,
) -> ImportResult:
    """Read a case CSV, map and validate every case, write the output and the rejects file.

    File-level problems raise InputError before anything is written; row problems go to the
    rejects file and never stop the run.
    """
    src, out = Path(source), Path(output)
    reader = CaseReader(src, mapping)  # raises InputError for unusable files, nothing written yet
    rej_path = Path(rejects_path) if rejects_path else default_rejects_path(src, out)
    result = ImportResult(report=reader.report, output=out, rejects_path=rej_path)
    rejects: list[Reject] = []
    writer = writer_for(out, fmt)
    try:
        for record, resources in case_resources(reader, mapping, version, rejects.append):
            for res in resources:
                writer.write(res)
                result.resources[res["resourceType"]] += 1
            if on_accepted:
                on_accepted(record)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    write_rejects(rej_path, rejects)
    return result


def source_resources(source: str | Path, mapping: MappingSpec, *, version: FhirVersion = "R4",
                     rejects: list[Reject] | None = None) -> Iterator[Resource]:
    """Resources from any source: a case CSV is mapped in memory, a Bundle/ndjson is read."""
    from ruxo_fhir.bundle import iter_resources

    path = Path(source)
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv", ".txt"):
        reader = CaseReader(path, mapping)
        sink: list[Reject] = rejects if rejects is not None else []
        for _record, resources in case_resources(reader, mapping, version, sink.append):
            yield from resources
        return
    yield from iter_resources(path)
