"""The `ruxo-fhir` command line: parse options, call one library function, render, exit."""
from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ruxo_fhir import __version__
from ruxo_fhir.errors import RuxoError
from ruxo_fhir.fhir_version import FhirVersion, normalise_version
from ruxo_fhir.logs import setup_logging
from ruxo_fhir.mapping.spec import MappingSpec, load_mapping

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


def say(message: str, ctx: Ctx | None = None) -> None:
    """A human message on stderr, dropped with -q."""
    if ctx is None or not ctx.quiet:
        click.echo(message, err=True)


def fail(exc: RuxoError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


def handles_errors(func: F) -> F:
    """Turn RuxoError into one line and its exit code; anything else into one line too."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RuxoError as exc:
            fail(exc)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # a bug: one line here, a traceback only when asked for
            if os.environ.get("RUXO_FHIR_DEBUG"):
                raise
            click.echo(f"error: internal error ({type(exc).__name__}); rerun with RUXO_FHIR_DEBUG=1 "
                       "for details and please report it", err=True)
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
        default="R4", show_default=True, help="FHIR version of the output (R4 is the primary target).",
    )(func)


def get_mapping(path: Path | None) -> MappingSpec:
    return load_mapping(path)


def as_version(value: str) -> FhirVersion:
    return normalise_version(value)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    setup_logging(verbosity, log_format)
    ctx.obj = Ctx(verbosity, log_format)


# --- import -----------------------------------------------------------------------------

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
@click.pass_obj
@handles_errors
def import_cmd(obj: Ctx, cases: Path, output: Path, fmt: str, mapping_path: Path | None,
               fhir_version: str, rejects: Path | None, report_path: Path | None) -> None:
    """Map a case-record CSV to validated FHIR resources.

    Delimiter (, ; tab) and encoding (UTF-8 with or without BOM, Windows-1252, UTF-16 with
    BOM) are detected. Bad rows go to the rejects file; the rest is written. Exit 0 when
    every row was accepted, 1 when some were rejected, 3 when the file is unusable.

    \b
    Example:
      ruxo-fhir import examples/cases.csv -o /tmp/bundle.json
      ruxo-fhir import cases.csv -o out/ --format ndjson --fhir-version R5
    """
    from ruxo_fhir.importer import import_cases
    from ruxo_fhir.runreport import RunReport

    run = RunReport.start("import", obj_args={"format": fmt, "fhir_version": fhir_version})
    mapping = get_mapping(mapping_path)
    run.add_input(cases)
    run.set_mapping(mapping)
    try:
        result = import_cases(cases, output, mapping=mapping, fmt=fmt, version=as_version(fhir_version),
                              rejects_path=rejects)
    except RuxoError as exc:
        run.fail(exc)
        run.write(report_path)
        raise
    for line in result.report.warning_lines():
        say(f"warning: {line}", obj)
    say(f"wrote {sum(result.resources.values())} resources "
        f"({', '.join(f'{k} {v}' for k, v in sorted(result.resources.items()))}) to {output}", obj)
    if result.report.rejected:
        say(f"rejected rows written to {result.rejects_path}", obj)
    run.counts.update(accepted=result.report.accepted, rejected=result.report.rejected,
                      total=result.report.total, **{f"resources.{k}": v for k, v in result.resources.items()})
    run.warnings.extend(result.report.warning_lines())
    run.write(report_path)
    click.echo(result.summary_line, err=True)
    sys.exit(EXIT_REJECTED if result.report.rejected else EXIT_OK)


# --- validate ---------------------------------------------------------------------------

@cli.command("validate")
@click.argument("file", type=click.Path(path_type=Path))
@version_option
@mapping_option
@click.pass_obj
@handles_errors
def validate_cmd(obj: Ctx, file: Path, fhir_version: str, mapping_path: Path | None) -> None:
    """Validate every resource in a Bundle JSON or an ndjson folder.

    Prints one line per problem (resource, FHIRPath-like location, reason). Exit 0 only
    when everything is valid.

    \b
    Example:
      ruxo-fhir validate /tmp/bundle.json
      ruxo-fhir validate out/ --fhir-version R5
    """
    from ruxo_fhir.bundle import iter_resources
    from ruxo_fhir.validate import Validator

    validator = Validator(as_version(fhir_version))
    checked = bad = 0
    for resource in iter_resources(file):
        checked += 1
        problems = validator.validate(resource)
        if problems:
            bad += 1
        for problem in problems:
            click.echo(str(problem))
    click.echo(f"validated {checked} resources: {checked - bad} valid, {bad} invalid", err=True)
    sys.exit(EXIT_REJECTED if bad else EXIT_OK)


# --- export -----------------------------------------------------------------------------

@cli.command("export")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Case CSV to write (UTF-8, comma; --excel: BOM and ';').")
@click.option("--excel", is_flag=True, help="Add a UTF-8 BOM and use ';' for spreadsheet users.")
@mapping_option
@click.pass_obj
@handles_errors
def export_cmd(obj: Ctx, file: Path, output: Path, excel: bool, mapping_path: Path | None) -> None:
    """Turn a Bundle (any type) or an ndjson folder back into the canonical case CSV.

    Resources that are not part of a case (other people's patients and observations on a
    shared server) are skipped and counted in a warning.

    \b
    Example:
      ruxo-fhir export /tmp/bundle.json -o /tmp/cases.csv
      ruxo-fhir export pulled/ -o cases.csv --excel
    """
    from ruxo_fhir.exporter import export_cases

    result = export_cases(file, output, mapping=get_mapping(mapping_path), excel=excel)
    for line in result.warnings:
        say(f"warning: {line}", obj)
    click.echo(f"wrote {result.rows} case rows to {output}", err=True)


def main() -> None:
    """Entry point: click handles usage errors (exit 2)."""
    cli(prog_name="ruxo-fhir")
