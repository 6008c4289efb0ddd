"""The application layer: one typed function per job; the library people import.

Each job takes its inputs, an options dataclass (every field has a default, so new options
never break a caller) and, for server jobs, `ServerSettings`; it returns a result dataclass
with an `exit_code` (README's table) and raises `RuxoError` for what stops it. Nothing here
prints: the CLI renders results, a program reads their fields.

    >>> from ruxo_fhir import api
    >>> done = api.import_file("examples/cases.csv", "/tmp/bundle.json")
    >>> cohort = api.outcomes("/tmp/bundle.json").cohort
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ruxo_fhir.connect import ServerSettings
from ruxo_fhir.errors import RuxoError, UsageError
from ruxo_fhir.resource import Resource

if TYPE_CHECKING:  # imported where used: `ruxo-fhir --help` stays fast
    from typing import TypeAlias

    from ruxo_fhir.exporter import ExportResult
    from ruxo_fhir.fhir_version import FhirVersion
    from ruxo_fhir.importer import ImportResult
    from ruxo_fhir.mapping.spec import MappingSpec
    from ruxo_fhir.outcomes import CohortOutcomes
    from ruxo_fhir.records import CaseReader, Reject
    from ruxo_fhir.runreport import RunReport
    from ruxo_fhir.sync.plan import CheckLine, PushPlan
    from ruxo_fhir.sync.pull import PullResult
    from ruxo_fhir.sync.push import PushResult
    from ruxo_fhir.transport.rest import FhirClient
    from ruxo_fhir.validate import Problem

log = logging.getLogger("ruxo_fhir.api")

MappingLike: TypeAlias = "MappingSpec | str | Path | None"
#: Progress callback: `(resources done since the last call, total if known)`.
OnProgress: TypeAlias = "Callable[[int, int | None], None]"

__all__ = [
    "CheckOptions", "CheckSummary", "ExportOptions", "ImportOptions", "OutcomesOptions", "OutcomesSummary",
    "PullOptions", "PullSummary", "PushOptions", "PushSummary", "ServerSettings", "ValidateOptions",
    "ValidateResult",
    "check", "export_file", "import_file", "outcomes", "pull", "push", "server_settings", "validate",
]


def _mapping_path(value: MappingLike) -> Path | None:
    """The mapping file an option names (an input the output guard protects), if any."""
    return Path(value) if isinstance(value, (str, Path)) else None


def _mapping(value: MappingLike) -> MappingSpec:
    """A loaded mapping: given, read from a path, or the shipped default."""
    from ruxo_fhir.mapping.spec import MappingSpec, load_mapping

    if isinstance(value, MappingSpec):
        return value
    return load_mapping(Path(value) if value is not None else None)


def server_settings(profile: str | None = None, config: Path | None = None, **flags: Any) -> ServerSettings:
    """Settings from a `[servers.NAME]` profile overridden by flags (`url=`, `auth=`, ...)."""
    from ruxo_fhir.connect import resolve_settings

    return resolve_settings(profile, config, **flags)


def _report_failure(run: RunReport, path: Path | None, exc: BaseException) -> None:
    if isinstance(exc, RuxoError):
        run.fail(exc)
        run.write(path)


# --- import -------------------------------------------------------------------------------

@dataclass
class ImportOptions:
    fmt: str = "bundle"  # "bundle" | "ndjson"
    mapping: MappingLike = None
    fhir_version: str | None = None  # None: R4
    rejects: Path | None = None  # default: <input stem>.rejects.csv beside the output
    report: Path | None = None  # JSON run report
    jobs: int = 1
    sheet: str | None = None  # with an .xlsx source: the sheet to read (default: the first)
    date_formats: tuple[str, ...] = ()  # strptime formats for non-ISO dates, tried before the mapping's


def import_file(cases: str | Path, output: str | Path, options: ImportOptions | None = None) -> ImportResult:
    """Map a case CSV to validated FHIR (Bundle or ndjson folder); bad rows go to the rejects file."""
    from ruxo_fhir.fhir_version import normalise_version
    from ruxo_fhir.importer import default_rejects_path, import_cases
    from ruxo_fhir.outpaths import guard_outputs
    from ruxo_fhir.runreport import RunReport

    opt = options or ImportOptions()
    guard_outputs({"CASES": cases, "--mapping": _mapping_path(opt.mapping)},
                  {"-o": output, "--rejects": opt.rejects or default_rejects_path(Path(cases), Path(output)),
                   "--report": opt.report})
    run = RunReport.start("import", obj_args={"format": opt.fmt, "fhir_version": opt.fhir_version or "R4"})
    mapping = _mapping(opt.mapping)
    run.add_input(Path(cases))
    run.set_mapping(mapping)
    try:
        result = import_cases(cases, output, mapping=mapping, fmt=opt.fmt,
                              version=normalise_version(opt.fhir_version or "R4"), rejects_path=opt.rejects, jobs=opt.jobs,
                              sheet=opt.sheet, date_formats=opt.date_formats)
    except RuxoError as exc:
        _report_failure(run, opt.report, exc)
        raise
    run.counts.update(accepted=result.report.accepted, rejected=result.report.rejected,
                      total=result.report.total, **{f"resources.{k}": v for k, v in result.resources.items()})
    run.warnings.extend(result.report.warning_lines())
    run.write(opt.report)
    return result


# --- validate -----------------------------------------------------------------------------

@dataclass
class ValidateOptions:
    fhir_version: str | None = None  # None: R4
    on_problem: Callable[[Problem], None] | None = None  # streamed; else collected in the result


@dataclass
class ValidateResult:
    checked: int = 0
    invalid: int = 0  # resources with at least one error
    warned: int = 0  # resources with warnings only (they do not fail the run)
    problems: list[Problem] = field(default_factory=list)

    @property
    def valid(self) -> int:
        return self.checked - self.invalid

    @property
    def exit_code(self) -> int:
        return 1 if self.invalid else 0


def validate(file: str | Path, options: ValidateOptions | None = None) -> ValidateResult:
    """Validate every resource of a Bundle JSON or an ndjson folder."""
    from ruxo_fhir.bundle import iter_resources
    from ruxo_fhir.fhir_version import normalise_version
    from ruxo_fhir.validate import Validator

    opt = options or ValidateOptions()
    validator = Validator(normalise_version(opt.fhir_version or "R4"))
    result = ValidateResult()
    report = opt.on_problem or result.problems.append
    for resource in iter_resources(file):
        result.checked += 1
        problems = validator.check(resource)
        if any(p.severity == "error" for p in problems):
            result.invalid += 1
        elif problems:
            result.warned += 1
        for problem in problems:
            report(problem)
    return result


# --- export -------------------------------------------------------------------------------

@dataclass
class ExportOptions:
    mapping: MappingLike = None
    excel: bool = False  # UTF-8 BOM, ';' and decimal commas for spreadsheet users
    decimal: str | None = None  # "comma" | "point" (default: comma with excel, point otherwise)


def export_file(file: str | Path, output: str | Path, options: ExportOptions | None = None) -> ExportResult:
    """A Bundle (any type) or an ndjson folder back to the canonical case CSV."""
    from ruxo_fhir.exporter import export_cases
    from ruxo_fhir.outpaths import guard_outputs

    opt = options or ExportOptions()
    guard_outputs({"FILE": file, "--mapping": _mapping_path(opt.mapping)}, {"-o": output})
    return export_cases(file, output, mapping=_mapping(opt.mapping), excel=opt.excel, decimal=opt.decimal)


# --- push (and its dry run) ---------------------------------------------------------------

@dataclass
class PushOptions:
    batch_size: int | None = None  # default: the profile's, else 200
    mode: str | None = None  # None: transaction, switching to batch on a batch-only server
    fhir_version: str | None = None  # given: beats the profile's fhir_version; neither: R4
    mapping: MappingLike = None
    dry_run: bool = False
    use_ledger: bool = True
    ledger_path: Path | None = None  # default: the user state dir (RUXO_FHIR_STATE_DIR)
    report: Path | None = None
    on_progress: OnProgress | None = None
    # Bundles in flight at once (1: one request at a time). Worth raising for a remote server
    # that is slow per request but takes several at once; the reference order is kept.
    concurrency: int = 1
    ids: str = "auto"  # client | server | auto (server when the server refuses client ids)
    on_conflict: str = "skip"  # skip | overwrite a server copy someone else changed
    prune: bool = False  # retract cohort resources the source no longer produces
    prune_max: float = 20.0  # percent of the cohort a prune may retract
    rejects: Path | None = None  # rejected cases (CSV); default <input stem>.push-rejects.csv beside it


@dataclass
class PushSummary:
    """A push (`result`) or its dry run (`plan`), plus the CSV rows that could not be mapped."""

    server: str
    result: PushResult | None = None
    plan: PushPlan | None = None
    row_rejects: list[Reject] = field(default_factory=list)
    requests: int = 0
    prune: bool = False
    rejects_file: Path | None = None  # written when push rejected a case
    default_rejects: Path = Path("push-rejects.csv")

    @property
    def exit_code(self) -> int:
        if self.plan is not None:
            return 1 if self.plan.problems or self.plan.totals["conflict"] or self.plan.prune_refused else 0
        r = self.result
        failed = r is not None and bool(r.rejected or r.conflict or r.prune_refused)
        return 1 if failed or self.row_rejects else 0


class RecentRows(dict[str, int]):
    """case_id -> source row of the most recent `limit` cases: push names a refused case's row
    while the case is in flight, and memory stays flat on a CSV of any length."""

    def __init__(self, limit: int = 50_000) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: str, value: int) -> None:
        super().__setitem__(key, value)
        if len(self) > self.limit:
            del self[next(iter(self))]  # the oldest (dicts keep insertion order)


def _push_source(path: Path, mapping: MappingSpec, version: FhirVersion,
                 case_rows: dict[str, int], rejects: list[Reject]) -> Iterable[Resource]:
    """A case CSV is mapped as push consumes it (streamed, rows remembered for errors); Bundle
    files and ndjson folders stream too."""
    from ruxo_fhir.bundle import iter_push_resources, refuse_spreadsheet
    from ruxo_fhir.importer import is_case_sheet
    from ruxo_fhir.records import CaseReader

    if is_case_sheet(path):
        reader = CaseReader(path, mapping)  # an unusable file is refused here, before any request
        return CaseStream(reader, mapping, version, case_rows, rejects)
    if path.is_file():
        refuse_spreadsheet(path)  # before any request: a workbook must be imported first
    return iter_push_resources(path)


class CaseStream:
    """The resources of a case CSV, mapped as push consumes them (memory stays flat), counting
    rows and resources so progress can show an estimated total that is exact at the end."""

    def __init__(self, reader: CaseReader, mapping: MappingSpec, version: FhirVersion, case_rows: dict[str, int],
                 rejects: list[Reject]) -> None:
        self.reader, self.mapping, self.version = reader, mapping, version
        self.case_rows, self.rejects = case_rows, rejects
        self.resources = 0
        self.finished = False

    def __iter__(self) -> Iterator[Resource]:
        from ruxo_fhir.importer import case_resources

        for record, resources in case_resources(self.reader, self.mapping, self.version, self.rejects.append):
            self.case_rows[record.case_id] = record.row or 0
            self.resources += len(resources)
            yield from resources
        self.finished = True

    def estimated_total(self, rows: int | None) -> int | None:
        if self.finished:
            return self.resources
        done = self.reader.report.total
        if not rows or not done:
            return None
        return self.resources + round(max(0, rows - done) * self.resources / done)


def push(file: str | Path, server: ServerSettings, options: PushOptions | None = None) -> PushSummary:
    """Push a Bundle, an ndjson folder or a case CSV idempotently (PUT at stable ids)."""
    from ruxo_fhir.connect import make_client
    from ruxo_fhir.fhir_version import normalise_version
    from ruxo_fhir.outpaths import guard_outputs
    from ruxo_fhir.runreport import RunReport

    opt = options or PushOptions()
    guard_outputs({"FILE": file, "--mapping": _mapping_path(opt.mapping)}, {"--report": opt.report})
    version = normalise_version(opt.fhir_version or server.fhir_version or "R4")
    mapping = _mapping(opt.mapping)
    run = RunReport.start("push", {"mode": opt.mode, "batch_size": opt.batch_size, "dry_run": opt.dry_run,
                                   "fhir_version": version})
    run.server = server.url
    run.add_input(Path(file))
    run.set_mapping(mapping)
    source = Path(file)
    summary = PushSummary(server=server.url or "", prune=opt.prune,
                          default_rejects=source.parent / f"{source.stem}.push-rejects.csv")
    case_rows: dict[str, int] = RecentRows()
    resources = _push_source(Path(file), mapping, version, case_rows, summary.row_rejects)
    client = make_client(server)
    try:
        if opt.dry_run:
            _dry_run(client, resources, mapping, version, case_rows, opt, server, summary, run)
        else:
            _push(client, resources, mapping, version, case_rows, opt, server, summary, run, Path(file))
    except RuxoError as exc:
        _report_failure(run, opt.report, exc)
        raise
    finally:
        client.close()
    summary.requests = client.request_count
    run.write(opt.report)
    return summary


def _sync_options(opt: PushOptions, server: ServerSettings, version: FhirVersion, summary: PushSummary) -> Any:
    from ruxo_fhir.sync.push import PushOptions as SyncPushOptions

    return SyncPushOptions(batch_size=opt.batch_size or server.batch_size or 200,
                           mode=opt.mode or "transaction", mode_explicit=opt.mode is not None,
                           version=version, use_ledger=opt.use_ledger, ids=opt.ids, on_conflict=opt.on_conflict,
                           dry_run=opt.dry_run, prune=opt.prune, prune_max=opt.prune_max,
                           source_rejected_rows=len(summary.row_rejects), concurrency=opt.concurrency)


def _dry_run(client: FhirClient, resources: Iterable[Resource], mapping: MappingSpec, version: FhirVersion,
             case_rows: dict[str, int], opt: PushOptions, server: ServerSettings, summary: PushSummary,
             run: RunReport) -> None:
    """The push's own decisions (reads only): create/update/unchanged/conflict, retractions."""
    from ruxo_fhir.sync.ledger import Ledger
    from ruxo_fhir.sync.plan import plan_push

    with Ledger(opt.ledger_path) as ledger:
        plan = summary.plan = plan_push(client, resources, mapping, version, case_rows,
                                        options=_sync_options(opt, server, version, summary), ledger=ledger)
    t = plan.totals
    run.counts.update(create=t["create"], update=t["update"], unchanged=t["unchanged"], conflict=t["conflict"],
                      problems=len(plan.problems), retractable=len(plan.retractable))


def _push(client: FhirClient, resources: Iterable[Resource], mapping: MappingSpec, version: FhirVersion,
          case_rows: dict[str, int], opt: PushOptions, server: ServerSettings, summary: PushSummary,
          run: RunReport, source: Path) -> None:
    from ruxo_fhir.sync.ledger import Ledger
    from ruxo_fhir.sync.push import push as sync_push
    from ruxo_fhir.sync.push import write_push_rejects

    options = _sync_options(opt, server, version, summary)
    progress = None
    if opt.on_progress is not None:  # a total for every input kind: a list, a Bundle, an ndjson folder
        from ruxo_fhir.progress import count_items

        if isinstance(resources, CaseStream):  # streamed: estimated as it goes, exact at the end
            sink, stream, rows = opt.on_progress, resources, count_items(source)
            progress = lambda n: sink(n, stream.estimated_total(rows))  # noqa: E731
        else:
            total = len(resources) if isinstance(resources, list) else count_items(source)
            progress = _progress(opt.on_progress, total)
    # --no-ledger: the ledger file is never opened (a corrupt one cannot stop the push)
    with (contextlib.nullcontext() if not opt.use_ledger else Ledger(opt.ledger_path)) as ledger:
        result = summary.result = sync_push(client, resources, mapping, options, ledger=ledger,
                                                 on_progress=progress, case_rows=case_rows)
    if result.rejects:
        summary.rejects_file = write_push_rejects(opt.rejects or summary.default_rejects, result.rejects)
    run.counts.update(created=result.created, updated=result.updated, unchanged=result.unchanged,
                      conflict=result.conflict, rejected=result.rejected, total=result.total,
                      requests=client.request_count, rows_rejected=len(summary.row_rejects),
                      retracted=result.retracted, retractable=len(result.retractable))
    run.warnings.extend(result.notices)
    run.errors.extend(result.errors + [f"conflict: {c}" for c in result.conflicts])


def _progress(on_progress: OnProgress | None, total: int | None) -> Callable[[int], None] | None:
    if on_progress is None:
        return None
    sink = on_progress
    return lambda n: sink(n, total)


# --- pull ---------------------------------------------------------------------------------

@dataclass
class PullOptions:
    fmt: str = "bundle"  # "bundle" (a collection) | "ndjson" (a folder)
    since: str | None = None  # only resources changed after this instant (_lastUpdated)
    cursor: Path | None = None  # read `since` from it; save the new one after a good pull
    patient: str | None = None  # only this local patient_id
    bulk: bool = False  # Bulk Data system $export instead of paged searches
    page_size: int | None = None
    max_pages: int | None = None  # stop a search (error) after this many pages (default: pull's guard)
    mapping: MappingLike = None
    report: Path | None = None
    on_progress: OnProgress | None = None


@dataclass
class PullSummary:
    server: str
    output: Path
    result: PullResult
    requests: int = 0
    since: str | None = None  # the lower bound used (from the options or the cursor)

    @property
    def total(self) -> int:
        return sum(self.result.counts.values())

    @property
    def exit_code(self) -> int:
        return 0


def pull(server: ServerSettings, output: str | Path, options: PullOptions | None = None) -> PullSummary:
    """Pull the cohort (and only the cohort) to a Bundle or an ndjson folder; written atomically."""
    from ruxo_fhir.bundle import writer_for
    from ruxo_fhir.connect import make_client
    from ruxo_fhir.outpaths import guard_outputs
    from ruxo_fhir.runreport import RunReport
    from ruxo_fhir.sync.pull import PullResult, check_since, pull_start_time, read_cursor, write_cursor

    opt = options or PullOptions()
    guard_outputs({"--mapping": _mapping_path(opt.mapping)},
                  {"-o": output, "--report": opt.report, "--cursor": opt.cursor})
    mapping = _mapping(opt.mapping)
    run = RunReport.start("pull", {"format": opt.fmt, "since": opt.since, "bulk": opt.bulk,
                                   "patient": bool(opt.patient)})
    run.server = server.url
    run.set_mapping(mapping)
    since = opt.since if opt.since or not opt.cursor else read_cursor(opt.cursor, server.url)
    since = check_since(since)  # a usage mistake: exit 2 before any request
    summary = PullSummary(server=server.url or "", output=Path(output), result=PullResult(), since=since)
    client = make_client(server)
    writer = writer_for(Path(output), opt.fmt, "collection")
    progress = _progress(opt.on_progress, None)
    try:
        started = pull_start_time(client)
        with closing(_pulled(client, mapping, opt, since, summary.result)) as pulled:
            for res in pulled:
                writer.write(res)
                if progress:
                    progress(1)
        writer.close()
    except BaseException as exc:
        writer.abort()
        _report_failure(run, opt.report, exc)
        raise
    finally:
        client.close()
    if opt.cursor:
        write_cursor(opt.cursor, server.url or "", started)
    summary.requests = client.request_count
    run.counts.update({f"pulled.{k}": v for k, v in summary.result.counts.items()})
    run.counts["requests"] = client.request_count
    run.warnings.extend(summary.result.warnings)
    run.write(opt.report)
    return summary


def _pulled(client: FhirClient, mapping: MappingSpec, opt: PullOptions, since: str | None,
            result: PullResult) -> Generator[Resource, None, None]:
    """The cohort's resources, by paged searches or from a Bulk export (staged in a temp folder)."""
    from ruxo_fhir.sync.pull import COHORT_TYPES, filter_cohort, pull_cohort
    from ruxo_fhir.sync.pull import PullOptions as SyncPullOptions

    if not opt.bulk:
        options = SyncPullOptions(since=since, patient=opt.patient, page_size=opt.page_size,
                                  max_pages=opt.max_pages)
        yield from pull_cohort(client, mapping, options, result)
        return

    from ruxo_fhir.bundle import iter_resources
    from ruxo_fhir.transport.bulk import bulk_export_to_dir

    with tempfile.TemporaryDirectory(prefix="ruxo-bulk-") as tmp:
        bulk_export_to_dir(client, list(COHORT_TYPES), since, tmp)

        def by_type(kind: str) -> Iterator[Resource]:
            f = Path(tmp) / f"{kind}.ndjson"
            return iter_resources(f) if f.exists() else iter(())

        yield from filter_cohort(by_type, mapping, result)


# --- outcomes (and write-back) ------------------------------------------------------------

@dataclass
class OutcomesOptions:
    mapping: MappingLike = None
    plot: Path | None = None  # PNG: improvement % per case by indication (needs matplotlib)
    write_back: bool = False  # each response as an Observation: to the server, or into `output`
    output: Path | None = None  # with write_back and a file source: the Bundle to write
    ledger_path: Path | None = None
    report_format: str = "json"  # table | json | csv | markdown | html
    report_path: Path | None = None  # write the rendered report here (else it is in `report_text`)


@dataclass
class OutcomesSummary:
    cohort: CohortOutcomes
    report_format: str = "json"
    report_text: str = ""  # the rendered report (also when it was written to `report_path`)
    report_path: Path | None = None
    plot: Path | None = None
    pushed: PushResult | None = None  # write-back to a server
    written: int | None = None  # write-back into a Bundle: how many Observations
    output: Path | None = None

    @property
    def exit_code(self) -> int:
        """1 when write-back entries were rejected or the source held no cohort case."""
        return 1 if (self.pushed is not None and self.pushed.rejected) or not self.cohort.cases else 0


def outcomes(source: str | Path | None = None, server: ServerSettings | None = None,
             options: OutcomesOptions | None = None) -> OutcomesSummary:
    """Response per case and cohort tables from a case CSV, a Bundle, an ndjson folder or a server."""
    from ruxo_fhir.connect import make_client
    from ruxo_fhir.outpaths import guard_outputs

    opt = options or OutcomesOptions()
    guard_outputs({"SOURCE": source, "--mapping": _mapping_path(opt.mapping)},
                  {"-o": opt.output or opt.report_path, "--plot": opt.plot})
    if (source is None) == (server is None):
        raise UsageError("give either a source file or a server")
    if opt.write_back and server is None and opt.output is None:
        raise UsageError("--write-back with a file SOURCE needs -o BUNDLE")
    mapping = _mapping(opt.mapping)
    client = make_client(server) if server is not None else None
    try:
        summary = OutcomesSummary(cohort=_cohort(client, source, mapping), report_format=opt.report_format)
        _render(summary, mapping, opt)
        if opt.plot:
            from ruxo_fhir.report import plot

            plot(summary.cohort, opt.plot, mapping.report)
            summary.plot = opt.plot
        if opt.write_back:
            _write_back(summary, client, mapping, opt)
    finally:
        if client is not None:
            client.close()
    return summary


def _cohort(client: FhirClient | None, source: str | Path | None, mapping: MappingSpec) -> CohortOutcomes:
    from ruxo_fhir.outcomes import compute_outcomes

    rejects: list[Reject] = []
    if client is not None:
        from ruxo_fhir.sync.pull import pull_cohort  # here: a file source needs no HTTP stack

        result = compute_outcomes(pull_cohort(client, mapping), mapping)
    else:
        from ruxo_fhir.importer import source_resources

        assert source is not None
        result = compute_outcomes(source_resources(source, mapping, rejects=rejects), mapping)
    for rej in rejects:
        result.warnings.append(f"row {rej.row} rejected ({rej.message}); not in the outcomes")
    for w in result.warnings:
        log.info("data quality: %s", w)
    return result


def _render(summary: OutcomesSummary, mapping: MappingSpec, opt: OutcomesOptions) -> None:
    from ruxo_fhir.report import render

    displays = {label: spec.display for label, spec in mapping.indications.items()}
    summary.report_text = render(summary.cohort, opt.report_format, displays=displays, texts=mapping.report)
    if opt.report_path is not None:
        from ruxo_fhir.atomic import atomic_write_bytes

        atomic_write_bytes(opt.report_path, summary.report_text.encode("utf-8"))
        summary.report_path = opt.report_path


def _write_back(summary: OutcomesSummary, client: FhirClient | None, mapping: MappingSpec,
                opt: OutcomesOptions) -> None:
    """Each case's response as an Observation: pushed to the server, or into a Bundle file."""
    from ruxo_fhir.outcomes import response_observation

    derived = [o for o in (response_observation(c, mapping) for c in summary.cohort.cases) if o]
    if client is not None:
        from ruxo_fhir.sync.ledger import Ledger
        from ruxo_fhir.sync.push import push as sync_push

        with Ledger(opt.ledger_path) as ledger:
            summary.pushed = sync_push(client, derived, mapping, ledger=ledger)
        return
    from ruxo_fhir.bundle import BundleWriter

    assert opt.output is not None
    bw = BundleWriter(opt.output, "transaction")
    for o in derived:
        bw.write(o)
    bw.close()
    summary.written, summary.output = len(derived), opt.output


# --- check --------------------------------------------------------------------------------

@dataclass
class CheckOptions:
    fhir_version: str | None = None  # given: beats the profile's fhir_version; neither: R4
    mapping: MappingLike = None  # its identifier systems: warned about when still the shipped examples


@dataclass
class CheckSummary:
    """One line per thing push/pull need; `auth_failure` when no token could be obtained."""

    server: str
    lines: list[CheckLine] = field(default_factory=list)
    auth_failure: str | None = None

    @property
    def usable(self) -> bool:
        return self.auth_failure is None and not any(
            not ln.ok and ln.item in ("reachable", "auth") for ln in self.lines)

    @property
    def exit_code(self) -> int:
        if not self.usable:
            return 4
        return 5 if any(not ln.ok and ln.needed for ln in self.lines) else 0


def check(server: ServerSettings, options: CheckOptions | None = None) -> CheckSummary:
    """Whether a server will work: reachable, TLS, FHIR version, auth, capabilities (quick retries)."""
    from ruxo_fhir.connect import make_client
    from ruxo_fhir.fhir_version import normalise_version
    from ruxo_fhir.sync.plan import check_server
    from ruxo_fhir.transport.auth import SmartBackendAuth

    opt = options or CheckOptions()
    version = normalise_version(opt.fhir_version or server.fhir_version or "R4")
    summary = CheckSummary(server=server.url or "")
    client = make_client(server, quick=True)
    try:
        token_info = None
        if isinstance(client.auth, SmartBackendAuth):
            try:
                client.auth.access_token()
            except RuxoError as exc:
                summary.auth_failure = str(exc)
                return summary
            left = client.auth.expires_in()
            token_info = f"SMART token obtained from {client.auth.token_endpoint}" + (
                f" (expires in {left:.0f} s)" if left is not None else "")
        summary.lines = check_server(client, version, token_info, mapping=_mapping(opt.mapping))
    finally:
        client.close()
    return summary
