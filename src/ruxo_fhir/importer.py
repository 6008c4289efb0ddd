"""The import stage: case CSV -> validated FHIR (Bundle or ndjson) plus a rejects file.

Streaming: rows are read, checked, mapped, validated and written one at a time. Cross-row
state lives in the reader's compact `CrossRowIndex` (hashes in flat arrays); rejects are
written to a temporary file as they come and renamed at the end. With `jobs > 1` worker
processes parse, map, validate and serialise chunks of cases while the main process reads,
checks cross-row rules and writes (`import_jobs`); the output is byte-identical to `jobs=1`.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ruxo_fhir.atomic import AtomicFile
from ruxo_fhir.bundle import writer_for
from ruxo_fhir.csvsafe import SafeDictWriter
from ruxo_fhir.fhir_version import FhirVersion, to_version
from ruxo_fhir.mapping.forward import ForwardMapper
from ruxo_fhir.mapping.spec import MappingSpec
from ruxo_fhir.outpaths import guard_outputs
from ruxo_fhir.records import CANONICAL_COLUMNS, Accepted, CaseReader, CaseRecord, ReadReport, Reject, _digest
from ruxo_fhir.redact import redact
from ruxo_fhir.resource import Resource
from ruxo_fhir.validate import Problem, Validator

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

    @property
    def exit_code(self) -> int:
        """0 when every row was accepted, 1 when some were rejected (README's exit codes)."""
        return 1 if self.report.rejected else 0


def default_rejects_path(source: Path, output: Path) -> Path:
    """`<input stem>.rejects.csv` beside the output."""
    return output.parent / f"{source.stem}.rejects.csv"


def _reject_row(rej: Reject) -> dict[str, Any]:
    """The rejects-file row; the reason passes the redaction step like every message."""
    return {**rej.values, "row": rej.row, "error": redact(rej.message)}


class RejectsWriter:
    """The rejects file (UTF-8, comma: the row's values under the canonical names, plus `row`
    and `error`), written as rejects come.

    Rows go to a temporary file beside the target; `close()` renames it into place and
    `abort()` removes it, so a failed run never leaves a half-written rejects file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        # surrogateescape: a stray byte of a mostly-UTF-8 input goes back out as the same byte
        self._target = AtomicFile(path, "w", encoding="utf-8", errors="surrogateescape", newline="")
        self._fh: IO[str] = self._target.file
        self._csv = SafeDictWriter(self._fh, fieldnames=REJECT_COLUMNS, lineterminator="\n")
        self._csv.writeheader()

    def write(self, rej: Reject) -> None:
        self._csv.writerow(_reject_row(rej))
        self.count += 1

    def close(self) -> None:
        self._target.commit()

    def abort(self) -> None:
        self._target.abort()


class _CaseBuilder:
    """Maps one case and validates its resources (in the main process or in a worker)."""

    def __init__(self, mapping: MappingSpec, version: FhirVersion, *, share_constants: bool = False) -> None:
        self.mapper = ForwardMapper(mapping, share_constants=share_constants)
        # the shared constants are never edited (share_constants' contract): checked once per shape
        self.validator = Validator(version, frozen=self.mapper.constants)
        self.version = version

    def resources(self, record: CaseRecord, include_patient: bool) -> list[Resource]:
        """The case's resources in the output version (the mapper's fresh dicts, rewritten in place)."""
        resources = self.mapper.case(record, include_patient=include_patient)
        if self.version == "R4":
            return resources
        return [to_version(r, self.version, in_place=True) for r in resources]

    def build(self, record: CaseRecord, include_patient: bool) -> tuple[list[Resource], Problem | None]:
        validate = self.validator.validate
        resources = self.resources(record, include_patient)
        for res in resources:
            problems = validate(res)
            if problems:
                return resources, problems[0]
        return resources, None


def _reject_accepted(reader: CaseReader, on_reject: Callable[[Reject], None], record: CaseRecord,
                     version: FhirVersion, problem: Problem) -> None:
    """A row the reader accepted fails FHIR validation: count it as rejected and report it."""
    reader.report.accepted -= 1
    reader.report.rejected += 1
    on_reject(_validation_reject(record, version, problem))


def _validation_reject(record: CaseRecord, version: FhirVersion, problem: Problem) -> Reject:
    return Reject(record.row or 0, record.to_row(), problem.location,
                  f"FHIR {version} validation failed: {problem.rule}: {problem.message}")


class _PatientsPending:
    """Patients whose Patient resource is still owed because their cases failed validation.

    The reader's index marks the first accepted case of each patient (`new_patient`); the
    Patient goes out with it. Only when that case then fails FHIR validation does a later case
    of the patient have to carry the Patient instead; this set holds just those (rare)
    patients, so emitting each Patient once needs no per-patient state here.
    """

    def __init__(self) -> None:
        self._keys: set[bytes] = set()

    def include(self, item: Accepted) -> bool:
        if item.new_patient:
            return True
        return bool(self._keys) and _digest(item.record.patient_id) in self._keys

    def settle(self, record: CaseRecord, included: bool, valid: bool) -> None:
        if not included:
            return
        if valid:
            if self._keys:  # almost always empty: no digest to compute
                self._keys.discard(_digest(record.patient_id))
        else:
            self._keys.add(_digest(record.patient_id))


def case_resources(
    reader: CaseReader,
    mapping: MappingSpec,
    version: FhirVersion,
    on_reject: Callable[[Reject], None],
    *,
    share_constants: bool = False,
) -> Iterator[tuple[CaseRecord, list[Resource]]]:
    """Accepted cases with their validated resources; invalid ones become rejects.

    A Patient is emitted once, with the first accepted case of its patient_id that passes
    validation; nothing per case or per patient is kept here (see `_PatientsPending`).
    `share_constants`: the resources share the mapping's constant values (see ForwardMapper),
    for a caller that only serialises them.
    """
    builder = _CaseBuilder(mapping, version, share_constants=share_constants)
    pending = _PatientsPending()
    for item in reader:
        if isinstance(item, Reject):
            on_reject(item)
            continue
        record = item.record
        include = pending.include(item)
        resources, problem = builder.build(record, include)
        pending.settle(record, include, problem is None)
        if problem is not None:
            _reject_accepted(reader, on_reject, record, version, problem)
            continue
        yield record, resources


# --- the import ---------------------------------------------------------------------------

def mapping_terminology_warnings(mapping: MappingSpec) -> list[str]:
    """The validator's terminology warnings (SNOMED CT check digit, ICD-10 shape, UCUM, system
    URIs) for the codings and units the mapping writes: every coded value of the output comes
    from the mapping, so checking it once stands for checking every row."""
    from ruxo_fhir.terminology import UCUM, coding_warnings, quantity_warnings

    out: list[str] = []
    for where, code in mapping.all_codes():
        for rule, message in coding_warnings(mapping.system_uri(code.system), code.code):
            out.append(f"mapping {where}: {message} ({rule})")
    for name in ("improvement", "score", "recurrence", "response"):
        unit = getattr(mapping.observations, name).unit
        for rule, message in quantity_warnings(UCUM, unit) if unit else []:
            out.append(f"mapping observations.{name}.unit: {message} ({rule})")
    return out


def import_cases(
    source: str | Path,
    output: str | Path,
    *,
    mapping: MappingSpec,
    fmt: str = "bundle",
    version: FhirVersion = "R4",
    rejects_path: str | Path | None = None,
    on_accepted: Callable[[Accepted | CaseRecord], None] | None = None,
    jobs: int = 1,
    sheet: str | None = None,
    date_formats: tuple[str, ...] = (),
) -> ImportResult:
    """Read a case CSV or .xlsx sheet, map and validate every case, write the output and the rejects file.

    File-level problems raise InputError before anything is written; row problems go to the
    rejects file and never stop the run. `jobs > 1` maps and validates in that many worker
    processes (same output, byte for byte). `date_formats` are tried (in order) before the
    mapping's own `date_formats`, for dates that are not ISO.
    """
    src, out = Path(source), Path(output)
    mapping = mapping.with_date_formats(date_formats)
    rej_path = Path(rejects_path) if rejects_path else default_rejects_path(src, out)
    guard_outputs({"CASES": src, "--mapping": mapping.source if Path(mapping.source).is_file() else None},
                  {"-o": out, "--rejects": rej_path})
    reader = CaseReader(src, mapping, sheet=sheet)  # raises InputError for unusable files, nothing written yet
    result = ImportResult(report=reader.report, output=out, rejects_path=rej_path)
    for line in mapping_terminology_warnings(mapping):
        reader.report.warn(line)
    counts = result.resources
    if jobs > 1:  # the worker module (and multiprocessing) only when asked for
        from ruxo_fhir.import_jobs import RawNdjsonWriter, parallel_chunks
    writer = RawNdjsonWriter(out) if jobs > 1 and fmt == "ndjson" else writer_for(out, fmt)
    rejects: RejectsWriter | None = None
    try:
        rejects = RejectsWriter(rej_path)
        if jobs > 1:
            for chunk in parallel_chunks(reader, version, rejects.write, jobs, by_kind=fmt == "ndjson"):
                chunk.write_to(writer, counts)
                if on_accepted:
                    for record in chunk.records:
                        on_accepted(record)
        else:
            write = writer.write
            for record, resources in case_resources(reader, mapping, version, rejects.write, share_constants=True):
                for res in resources:
                    write(res)
                    counts[res["resourceType"]] += 1
                if on_accepted:
                    on_accepted(record)
        writer.close()
        rejects.close()
    except BaseException:  # a bad row never gets here; a full disk or an interrupt does
        writer.abort()
        if rejects is not None:
            rejects.abort()
        raise
    return result


CASE_SHEET_SUFFIXES = (".csv", ".tsv", ".txt")


def is_case_sheet(path: str | Path) -> bool:
    """A case CSV (mapped on the fly) rather than a Bundle or an ndjson folder (read as FHIR)."""
    p = Path(path)
    return p.is_file() and p.suffix.lower() in CASE_SHEET_SUFFIXES


def source_resources(source: str | Path, mapping: MappingSpec, *, version: FhirVersion = "R4",
                     rejects: list[Reject] | None = None,
                     case_rows: dict[str, int] | None = None) -> Iterator[Resource]:
    """Resources from any source: a case CSV is mapped in memory, a Bundle/ndjson is read.

    `rejects` collects the CSV rows that could not be mapped; `case_rows` remembers the source
    row of each case so later errors (e.g. a server refusal) can name it.
    """
    from ruxo_fhir.bundle import iter_resources

    path = Path(source)
    if is_case_sheet(path):
        reader = CaseReader(path, mapping)
        sink: list[Reject] = rejects if rejects is not None else []
        for record, resources in case_resources(reader, mapping, version, sink.append):
            if case_rows is not None:
                case_rows[record.case_id] = record.row or 0
            yield from resources
        return
    yield from iter_resources(path)
