"""The `ruxo-fhir` command line: parse options, call one library function, render, exit."""
from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ruxo_fhir import __version__
from ruxo_fhir.errors import RuxoError
from ruxo_fhir.logs import ProgressLine, setup_logging, status_line
from ruxo_fhir.redact import install_on_std_streams

if TYPE_CHECKING:  # each command imports the api when it runs: --help and usage errors stay fast
    from ruxo_fhir import api

log = logging.getLogger("ruxo_fhir.cli")
F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_REJECTED, EXIT_USAGE, EXIT_INPUT, EXIT_SERVER, EXIT_CAPABILITY = 0, 1, 2, 3, 4, 5


class Ctx:
    """Global options shared by every command."""

    def __init__(self, verbosity: int, log_format: str) -> None:
        self.verbosity = verbosity
        self.log_format = log_format

    @property
    def quiet(self) -> bool:
        return self.verbosity < 0


def tell(message: str, *, level: str = "info") -> None:
    """A summary or error line on stderr: plain, or JSON like the log lines with --log-format json."""
    current = click.get_current_context(silent=True)
    obj = current.find_object(Ctx) if current is not None else None
    click.echo(status_line(message, obj.log_format if obj else "plain", level=level), err=True)


def say(message: str, ctx: Ctx | None = None) -> None:
    """A human message on stderr, dropped with -q."""
    if ctx is None or not ctx.quiet:
        tell(message, level="warning" if message.startswith(("warning:", "rejected:")) else "info")


def fail(exc: RuxoError) -> None:
    tell(f"error: {exc}", level="error")
    sys.exit(exc.exit_code)


def handles_errors(func: F) -> F:
    """Turn RuxoError into one line and its exit code; anything else into one line too."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RuxoError as exc:
            fail(exc)
        except BrokenPipeError:
            sys.stderr.close()
            sys.exit(0)
        except OSError as exc:  # e.g. an output folder that is a file, a full disk, no permission
            where = f"{exc.filename}: " if exc.filename else ""
            tell(f"error: {where}cannot read or write ({exc.strerror or type(exc).__name__})", level="error")
            sys.exit(EXIT_INPUT)
        except KeyboardInterrupt:
            tell("error: interrupted", level="error")
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # a bug: one line here, a traceback only when asked for
            if os.environ.get("RUXO_FHIR_DEBUG"):
                import traceback

                install_on_std_streams()  # the traceback is redacted like every other line
                traceback.print_exc(file=sys.stderr)
                sys.exit(70)
            tell(f"error: internal error ({type(exc).__name__}); rerun with RUXO_FHIR_DEBUG=1 "
                       "for details and please report it", level="error")
            sys.exit(70)

    return wrapper  # type: ignore[return-value]


def mapping_option(func: F) -> F:
    return click.option(
        "--mapping", "mapping_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help="Mapping file (YAML/JSON). Default: the shipped mappings/default.yaml.",
    )(func)


def version_option(func: F) -> F:
    return click.option(
        "--fhir-version", "fhir_version", type=click.Choice(["R4", "R5"], case_sensitive=False),
        default=None, help="FHIR version (default: the profile's, else R4, the primary target). "
                           "Given, it beats the profile's.",
    )(func)


_GLOBAL_FLAGS = re.compile(r"^(-v+|--verbose|-q|--quiet|--log-format=.*)$")


class _Group(click.Group):
    """Takes -v, -q and --log-format after the subcommand too (`ruxo-fhir import ... -q`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        front: list[str] = []
        rest: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                rest += args[i:]
                break
            if _GLOBAL_FLAGS.match(arg):
                front.append(arg)
            elif arg == "--log-format" and i + 1 < len(args):
                front += args[i:i + 2]
                i += 1
            else:
                rest.append(arg)
            i += 1
        return super().parse_args(ctx, [*front, *rest])


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ruxo-fhir")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and the final summary line.")
@click.option("--log-format", type=click.Choice(["plain", "json"]), default="plain", show_default=True,
              help="json: one JSON object per log line, for log collectors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, log_format: str) -> None:
    """ruxo-fhir: case-record sheets <-> FHIR R4, server sync, treatment outcomes.

    \b
    Example:
      ruxo-fhir import examples/cases.csv -o /tmp/bundle.json
      ruxo-fhir validate /tmp/bundle.json
      ruxo-fhir outcomes /tmp/bundle.json --format table
    """
    verbosity = -1 if quiet else verbose
    install_on_std_streams()  # every line printed from here on passes the redaction step
    setup_logging(verbosity, log_format)
    ctx.obj = Ctx(verbosity, log_format)


# --- import -----------------------------------------------------------------------------

strict_option = click.option("--strict", is_flag=True,
                             help="Treat warnings as errors: exit 1 when there was any warning.")


def _check_date_formats(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    for fmt in value:
        if "%" not in fmt:
            raise click.BadParameter(f"{fmt!r} is not a strptime format (e.g. %d/%m/%Y, %m/%Y)")
    return value


def exit_strict(strict: bool, warnings: int, code: int = EXIT_OK) -> None:
    """Exit with `code`; with --strict a run that warned ends with exit 1 (its output is still written)."""
    if code == EXIT_OK and strict and warnings:
        tell(f"--strict: {warnings} warning(s); exit 1")
        sys.exit(EXIT_REJECTED)
    sys.exit(code)


@cli.command("import")
@click.argument("cases", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Bundle JSON file, or (with --format ndjson) a folder of <Type>.ndjson files.")
@click.option("--format", "fmt", type=click.Choice(["bundle", "ndjson"]), default="bundle", show_default=True)
@mapping_option
@version_option
@click.option("--rejects", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Rejected rows (CSV). Default: <input stem>.rejects.csv beside the output.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a JSON run report (counts, inputs with sha256, versions).")
@click.option("--jobs", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes for mapping and validation (same output, byte for byte).")
@click.option("--sheet", default=None, help="With an .xlsx CASES: the sheet to read (default: the first).")
@click.option("--date-format", "date_formats", multiple=True, callback=_check_date_formats, metavar="FMT",
              help="strptime format for dates that are not ISO, e.g. %d/%m/%Y (repeatable, tried in order "
                   "before the mapping's date_formats). Never guessed: without one, a reject names the format.")
@strict_option
@click.pass_obj
@handles_errors
def import_cmd(obj: Ctx, /, cases: Path, output: Path, fmt: str, mapping_path: Path | None,
               fhir_version: str | None, rejects: Path | None, report_path: Path | None, jobs: int,
               sheet: str | None, date_formats: tuple[str, ...], strict: bool) -> None:
    """Map a case-record CSV or .xlsx workbook to validated FHIR resources.

    Delimiter (, ; tab) and encoding (UTF-8 with or without BOM, Windows-1252, UTF-16 with
    BOM) are detected; an .xlsx sheet is read directly (date cells as dates, numbers as
    numbers). Bad rows go to the rejects file; the rest is written. Exit 0 when every row was
    accepted, 1 when some were rejected, 3 when the file is unusable.

    \b
    Example:
      ruxo-fhir import examples/cases.csv -o /tmp/bundle.json
      ruxo-fhir import cases.csv -o out/ --format ndjson --fhir-version R5
      ruxo-fhir import export-fr.csv -o b.json --date-format %d/%m/%Y --date-format %m/%Y
      ruxo-fhir import cases.xlsx --sheet Cas -o b.json
    """
    from ruxo_fhir import api

    result = api.import_file(cases, output, api.ImportOptions(
        fmt=fmt, mapping=mapping_path, fhir_version=fhir_version, rejects=rejects, report=report_path, jobs=jobs,
        sheet=sheet, date_formats=date_formats))
    for line in result.report.warning_lines():
        say(f"warning: {line}", obj)
    say(f"wrote {sum(result.resources.values())} resources "
        f"({', '.join(f'{k} {v}' for k, v in sorted(result.resources.items()))}) to {output}", obj)
    if result.report.rejected:
        say(f"rejected rows written to {result.rejects_path}", obj)
    tell(result.summary_line)
    exit_strict(strict, len(result.report.warnings), result.exit_code)


# --- validate ---------------------------------------------------------------------------

@cli.command("validate")
@click.argument("file", type=click.Path(path_type=Path))
@version_option
@mapping_option
@click.pass_obj
@handles_errors
def validate_cmd(obj: Ctx, /, file: Path, fhir_version: str | None, mapping_path: Path | None) -> None:
    """Validate every resource in a Bundle JSON or an ndjson folder.

    Checks structure and datatypes, cardinality, the spec's required bindings and invariants
    (FHIRPath), and offline terminology (SNOMED CT check digit, ICD-10 shape, UCUM units, system
    URIs; these are warnings). Prints one line per problem: `Type/id  path  rule  message`.
    Exit 0 when no resource has an error (warnings alone do not fail it), else 1.

    \b
    Example:
      ruxo-fhir validate /tmp/bundle.json
      ruxo-fhir validate out/ --fhir-version R5
    """
    from ruxo_fhir import api

    result = api.validate(file, api.ValidateOptions(fhir_version=fhir_version,
                                                    on_problem=lambda p: click.echo(str(p))))
    tail = f", {result.warned} with warnings only" if result.warned else ""
    tell(f"validated {result.checked} resources: {result.valid} valid, {result.invalid} invalid{tail}")
    sys.exit(result.exit_code)


# --- export -----------------------------------------------------------------------------

@cli.command("export")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Case CSV to write (UTF-8, comma; --excel: BOM and ';').")
@click.option("--excel", is_flag=True,
              help="For spreadsheet users: a UTF-8 BOM, ';' between fields and decimal commas (45,5).")
@click.option("--decimal", type=click.Choice(["comma", "point"]), default=None,
              help="Decimal separator of numbers (default: comma with --excel, point otherwise).")
@mapping_option
@click.pass_obj
@handles_errors
def export_cmd(obj: Ctx, /, file: Path, output: Path, excel: bool, decimal: str | None,
               mapping_path: Path | None) -> None:
    """Turn a Bundle (any type) or an ndjson folder back into the canonical case CSV.

    Resources that are not part of a case (other people's patients and observations on a
    shared server) are skipped and counted in a warning.

    \b
    Example:
      ruxo-fhir export /tmp/bundle.json -o /tmp/cases.csv
      ruxo-fhir export pulled/ -o cases.csv --excel
    """
    from ruxo_fhir import api

    result = api.export_file(file, output, api.ExportOptions(mapping=mapping_path, excel=excel, decimal=decimal))
    for line in result.warnings:
        say(f"warning: {line}", obj)
    tell(f"wrote {result.rows} case rows to {output}")


# --- server commands --------------------------------------------------------------------

AUTH_HELP = (
    "Auth: none|bearer|basic|smart (default: bearer when RUXO_FHIR_TOKEN is set, else none). "
    "Bearer reads the token from RUXO_FHIR_TOKEN, basic the password from RUXO_FHIR_PASSWORD; "
    "secrets are never taken on the command line."
)


def server_options(func: F) -> F:
    opts = [
        click.option("--server", "server", metavar="URL", help="FHIR base URL (overrides the profile)."),
        click.option("--profile", metavar="NAME", help="Named server from the config file."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="Config file (TOML). Default: RUXO_FHIR_CONFIG or the user config dir."),
        click.option("--auth", type=click.Choice(["none", "bearer", "basic", "smart"]), default=None, help=AUTH_HELP),
        click.option("--user", metavar="NAME", help="User for --auth basic (password: RUXO_FHIR_PASSWORD)."),
        click.option("--client-id", metavar="ID", help="SMART Backend Services client id."),
        click.option("--private-key", type=click.Path(dir_okay=False), metavar="PEM",
                     help="SMART Backend Services private key (RS384/ES384)."),
        click.option("--key-id", metavar="KID", help="JWT kid (default: the key's RFC 7638 thumbprint)."),
        click.option("--scope", metavar="S", help="SMART scope (default: system/*.read system/*.write)."),
        click.option("--ca-bundle", type=click.Path(dir_okay=False), metavar="FILE", help="CA bundle for TLS."),
        click.option("--insecure", is_flag=True, help="Turn TLS verification OFF (explicit only; never default)."),
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Seconds per request: a deadline for the whole response, not per read (default 60)."),
        click.option("--max-response-mb", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Largest response body accepted, after decompression (default 128)."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


SERVER_KEYS = ("server", "profile", "config_path", "auth", "user", "client_id", "private_key", "key_id",
               "scope", "ca_bundle", "insecure", "timeout", "max_response_mb")


def pop_server(kwargs: dict[str, Any], required: bool = True) -> api.ServerSettings | None:
    """Settings from --profile and flags (flags win); None when no server was asked for."""
    from ruxo_fhir import api

    opts = {k: kwargs.pop(k) for k in SERVER_KEYS}
    if not required and not opts["server"] and not opts["profile"]:
        return None
    return api.server_settings(opts.pop("profile"), opts.pop("config_path"), url=opts.pop("server"), **opts)


def need_server(kwargs: dict[str, Any]) -> api.ServerSettings:
    settings = pop_server(kwargs)
    assert settings is not None
    return settings


class Progress:
    """Done/total, percent, rate and ETA on one terminal line; silent when stderr is not a TTY or with -q."""

    def __init__(self, obj: Ctx, label: str) -> None:
        self.on = sys.stderr.isatty() and not obj.quiet
        self.line = ProgressLine(label, lambda text: click.echo(text, err=True, nl=False))

    def __call__(self, n: int, total: int | None = None) -> None:
        if self.on:
            self.line(n, total)

    def close(self) -> None:
        if self.on:
            self.line.close()


@cli.command("push")
@click.argument("file", type=click.Path(path_type=Path))
@server_options
@click.option("--batch-size", type=click.IntRange(1, 10000), default=None,
              help="Entries per bundle (default 200, or the profile's).")
@click.option("--mode", type=click.Choice(["transaction", "batch"]), default=None,
              help="transaction (default; a batch-only server switches to batch by itself) or batch.")
@version_option
@mapping_option
@click.option("--dry-run", is_flag=True, help="Read-only: print what would be created/updated/unchanged.")
@click.option("--no-ledger", is_flag=True, help="Do not consult or update the local push ledger.")
@click.option("--concurrency", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Bundles in flight at once (raise it for a remote server that is slow per request).")
@click.option("--ids", type=click.Choice(["client", "server", "auto"]), default="auto", show_default=True,
              help="client: PUT at ids derived from identifiers; server: the server assigns ids, resources "
                   "are written by identifier; auto: server when the server refuses client ids.")
@click.option("--on-conflict", type=click.Choice(["skip", "overwrite"]), default="skip", show_default=True,
              help="A server copy changed by someone else: skip it (reported) or overwrite it.")
@click.option("--prune", is_flag=True,
              help="Retract cohort resources on the server that the source no longer produces "
                   "(entered-in-error, or deleted where a type has no such status; Patients never).")
@click.option("--prune-max", type=click.FloatRange(0, 100), default=20.0, show_default=True, metavar="PERCENT",
              help="Refuse a prune that would retract more than this share of the cohort.")
@click.option("--rejects", "rejects_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CSV of rejected cases (case_id, row, error); default <input stem>.push-rejects.csv "
                   "beside the input, written only when a case is rejected.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a JSON run report.")
@click.pass_obj
@handles_errors
def push_cmd(obj: Ctx, /, file: Path, batch_size: int | None, mode: str | None, fhir_version: str | None,
             mapping_path: Path | None, dry_run: bool, no_ledger: bool, concurrency: int, ids: str, on_conflict: str,
             prune: bool, prune_max: float, rejects_path: Path | None, report_path: Path | None,
             **kwargs: Any) -> None:
    """Push a Bundle, an ndjson folder or a case CSV to a FHIR server, idempotently.

    Every resource is written with PUT at its stable id, so reruns create nothing new and an
    interrupted push can simply be run again. A local ledger skips resources the server
    still holds unchanged. The token comes from RUXO_FHIR_TOKEN, never from a flag.

    \b
    Example:
      export RUXO_FHIR_TOKEN=...   # if the server needs one
      ruxo-fhir push /tmp/bundle.json --server http://localhost:8080/fhir
      ruxo-fhir push examples/cases.csv --profile sandbox --dry-run
    """
    from ruxo_fhir import api

    settings = need_server(kwargs)
    progress = Progress(obj, "pushed")
    options = api.PushOptions(batch_size=batch_size, mode=mode, fhir_version=fhir_version, mapping=mapping_path,
                              dry_run=dry_run, use_ledger=not no_ledger, report=report_path, on_progress=progress,
                              concurrency=concurrency, ids=ids, on_conflict=on_conflict, prune=prune, prune_max=prune_max,
                              rejects=rejects_path)
    try:
        summary = api.push(file, settings, options)
    finally:
        progress.close()
    for rej in summary.row_rejects:
        say(f"warning: {file}, row {rej.row}: {rej.message} (row not pushed)", obj)
    if summary.plan is not None:
        render_plan(summary, obj)
    else:
        render_push(summary, obj)
    sys.exit(summary.exit_code)


def render_plan(summary: api.PushSummary, obj: Ctx) -> None:
    plan = summary.plan
    assert plan is not None
    for notice in plan.notices:
        say(f"note: {notice}", obj)
    click.echo(f"plan for {summary.server} (nothing written; validation: {plan.validated_with}):")
    for kind in sorted(plan.by_type):
        c = plan.by_type[kind]
        click.echo(f"  {kind:<20} create {c['create']:>6}  update {c['update']:>6}  unchanged {c['unchanged']:>6}"
                   f"  conflict {c['conflict']:>6}")
    for line in plan.conflicts:
        click.echo(f"  conflict: {line}")
    if summary.prune:
        for line in plan.retractable:
            click.echo(f"  would retract: {line}")
        if plan.prune_refused:
            click.echo(f"  {plan.prune_refused}")
    for problem in plan.problems:
        click.echo(f"  problem: {problem}")
    t = plan.totals
    tell(f"would create {t['create']}, update {t['update']}, leave {t['unchanged']} unchanged; "
         f"{t['conflict']} conflict(s); {len(plan.problems)} problem(s)")


def render_push(summary: api.PushSummary, obj: Ctx) -> None:
    result = summary.result
    assert result is not None
    for line in result.conflicts:
        say(f"conflict: {line}", obj)
    for line in result.errors:
        say(f"rejected: {line}", obj)
    if result.prune_refused:
        say(result.prune_refused, obj)
    elif summary.prune:
        say(f"retracted {result.retracted} of {len(result.retractable)} cohort resource(s) no longer in the "
            f"source (of {result.cohort_on_server} on the server)", obj)
    if summary.rejects_file is not None:
        say(f"rejected cases written to {summary.rejects_file}", obj)
    say(f"mode {result.mode}, {result.bundles_sent} bundle(s), {summary.requests} request(s), {result.ids} ids", obj)
    tell(result.summary_line)


@cli.command("pull")
@server_options
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Bundle JSON file (collection) or, with --format ndjson, a folder.")
@click.option("--format", "fmt", type=click.Choice(["bundle", "ndjson"]), default="bundle", show_default=True)
@click.option("--since", metavar="DATETIME", help="Only resources changed after this instant (_lastUpdated).")
@click.option("--cursor", type=click.Path(dir_okay=False, path_type=Path),
              help="Cursor file: read --since from it and save the new one after a good pull (nightly jobs).")
@click.option("--patient", metavar="ID", help="Only this local patient_id.")
@click.option("--bulk", is_flag=True, help="Use Bulk Data system $export instead of paged searches.")
@click.option("--page-size", type=click.IntRange(1, 1000), default=None, help="_count per search page.")
@click.option("--max-pages", type=click.IntRange(1), default=None,
              help="Stop a search (error, exit 4) after this many pages; default 20000 (a runaway guard).")
@mapping_option
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a JSON run report.")
@click.pass_obj
@handles_errors
def pull_cmd(obj: Ctx, /, output: Path, fmt: str, since: str | None, cursor: Path | None, patient: str | None,
             bulk: bool, page_size: int | None, max_pages: int | None, mapping_path: Path | None,
             report_path: Path | None, **kwargs: Any) -> None:
    """Pull the cohort (and only the cohort) from a FHIR server.

    The cohort is the MedicationStatements carrying the mapping's case identifier system and
    the resources linked to them; other people's resources are never pulled. Every `next`
    link is followed.

    \b
    Example:
      ruxo-fhir pull --server http://localhost:8080/fhir -o /tmp/pulled.json
      ruxo-fhir pull --profile ehr -o nightly/ --format ndjson --cursor state/ehr.cursor
      ruxo-fhir pull --server URL -o out/ --format ndjson --bulk
    """
    from ruxo_fhir import api

    settings = need_server(kwargs)
    progress = Progress(obj, "pulled")
    options = api.PullOptions(fmt=fmt, since=since, cursor=cursor, patient=patient, bulk=bulk, page_size=page_size,
                              max_pages=max_pages, mapping=mapping_path, report=report_path, on_progress=progress)
    try:
        summary = api.pull(settings, output, options)
    finally:
        progress.close()
    for w in summary.result.warnings:
        say(f"warning: {w}", obj)
    detail = ", ".join(f"{k} {v}" for k, v in sorted(summary.result.counts.items()))
    tell(f"pulled {summary.total} resources ({detail or 'none'}) to {output}")


@cli.command("outcomes")
@click.argument("source", required=False, type=click.Path(path_type=Path))
@server_options
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv", "markdown", "html"]), default=None,
              help="Default: table on a terminal, json otherwise. html: one self-contained page "
                   "(Tables I and II, response rate with its CI, the plot, the rule, the warnings).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="PNG: improvement % per case by indication with the 40/80 thresholds.")
@click.option("--write-back", is_flag=True,
              help="Write each response as an Observation (to --server, or into the bundle given by -o).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report here instead of stdout (e.g. --format html -o report.html). "
                   "With --write-back and a file SOURCE: the Bundle to write the derived Observations to.")
@mapping_option
@strict_option
@click.pass_obj
@handles_errors
def outcomes_cmd(obj: Ctx, /, source: Path | None, fmt: str | None, plot_path: Path | None, write_back: bool,
                 output: Path | None, mapping_path: Path | None, strict: bool, **kwargs: Any) -> None:
    """Response per case and cohort tables with a Clopper-Pearson 95 % CI.

    SOURCE is a case CSV, a Bundle JSON or an ndjson folder; or give --server (no SOURCE) to
    read the cohort from a server. complete > 80 %, partial 40-80 %, none < 40 %; the latest
    evaluation of a case counts.

    \b
    Example:
      ruxo-fhir outcomes examples/cases.csv --format table
      ruxo-fhir outcomes /tmp/bundle.json --format json --plot /tmp/outcomes.png
      ruxo-fhir outcomes --server http://localhost:8080/fhir --write-back
    """
    from ruxo_fhir import api

    settings = pop_server(kwargs, required=False)
    if (source is None) == (settings is None):
        raise click.UsageError("give either SOURCE or --server/--profile")
    bundle_out = write_back and settings is None  # -o is then the write-back bundle
    if bundle_out and output is None:
        raise click.UsageError("--write-back with a file SOURCE needs -o BUNDLE")
    if bundle_out and fmt == "html" and output is not None:
        raise click.UsageError("with --write-back and a file SOURCE, -o is the write-back bundle: "
                               "write the HTML report in a run without --write-back")
    options = api.OutcomesOptions(
        mapping=mapping_path, plot=plot_path, write_back=write_back, output=output if bundle_out else None,
        report_format=fmt or ("table" if sys.stdout.isatty() else "json"),
        report_path=None if bundle_out else output)
    summary = api.outcomes(source, settings, options)
    render_outcomes(summary, obj)
    exit_strict(strict, len(summary.cohort.warnings), summary.exit_code)


def render_outcomes(summary: api.OutcomesSummary, obj: Ctx) -> None:
    if summary.report_path is not None:
        say(f"{summary.report_format} report written to {summary.report_path}", obj)
    else:
        click.echo(summary.report_text, nl=False)
    if summary.plot:
        say(f"plot written to {summary.plot}", obj)
    if summary.pushed is not None:
        say(f"write-back: {summary.pushed.summary_line}", obj)
        if summary.pushed.rejected:
            for line in summary.pushed.errors:
                say(f"rejected: {line}", obj)
    elif summary.written is not None:
        say(f"write-back: {summary.written} response Observation(s) written to {summary.output}", obj)
    if not summary.cohort.cases:
        tell("no cohort case in the source: nothing to evaluate (see the warnings)")


@cli.command("check")
@server_options
@version_option
@mapping_option
@click.pass_obj
@handles_errors
def check_cmd(obj: Ctx, /, fhir_version: str | None, mapping_path: Path | None, **kwargs: Any) -> None:
    """Say whether a server will work: reachable, TLS, FHIR version, auth, capabilities.

    Exit 0 when everything push and pull need is there, 5 when something needed is missing,
    4 when the server cannot be reached or refuses the credentials.

    \b
    Example:
      ruxo-fhir check --server http://localhost:8080/fhir
      ruxo-fhir check --profile sandbox
    """
    from ruxo_fhir import api

    summary = api.check(need_server(kwargs), api.CheckOptions(fhir_version=fhir_version, mapping=mapping_path))
    if summary.auth_failure is not None:
        click.echo(f"  [FAIL] auth: {summary.auth_failure}")
        sys.exit(summary.exit_code)
    for line in summary.lines:
        mark = "ok" if line.ok else ("FAIL" if line.needed else "warn")
        click.echo(f"  [{mark:>4}] {line.item}: {line.detail}")
    verdict = {0: "server is usable for push and pull", 4: "server not usable (see above)",
               5: "server lacks something push/pull need (see above)"}
    tell(verdict[summary.exit_code])
    sys.exit(summary.exit_code)


def main() -> None:
    """Entry point: click handles usage errors (exit 2)."""
    cli(prog_name="ruxo-fhir")
