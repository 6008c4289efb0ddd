"""One boundary for wrong-typed FHIR input: a resource whose fields have the wrong JSON type
(a string `subject`, `medication`, `value`, ...) is left out with one line saying where and
why, instead of crashing the whole file.

Readers work on plain dicts for speed and do not check every type up front. When reading one
resource (or one case) fails with a type-shaped exception, the resources are validated
against the FHIR models to name the field; if validation finds nothing wrong, the exception
was a real bug and is raised again.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from decimal import InvalidOperation
from typing import Any

SHAPE_ERRORS: tuple[type[BaseException], ...] = (
    AttributeError, TypeError, KeyError, IndexError, ValueError, InvalidOperation,
)


def shape_reason(resources: Iterable[Any]) -> str | None:
    """The first structural problem of the resources, as `Type/id at location: why`, or None."""
    from ruxo_fhir.fhir_version import FhirVersion, data_version
    from ruxo_fhir.validate import Validator

    validators: dict[FhirVersion, Validator] = {}
    for res in resources:
        if not isinstance(res, dict):
            return f"a resource is a JSON {type(res).__name__}, not an object"
        try:
            found = data_version(res)
        except SHAPE_ERRORS:
            found = None
        version: FhirVersion = found[0] if found else "R4"  # R4 is the primary target
        validator = validators.setdefault(version, Validator(version))
        problems = [p for p in validator.validate(res) if p.severity == "error"]
        if problems:
            p = problems[0]
            where = f" at {p.location}" if p.location else ""
            return f"{p.resource or res.get('resourceType')}{where}: {p.message}"
    return None


@contextlib.contextmanager
def shape_guard(resources: list[Any], warnings: list[str], consequence: str) -> Iterator[None]:
    """Turn a type error while reading `resources` into one warning (`<why>; <consequence>`)."""
    try:
        yield
    except SHAPE_ERRORS:
        reason = shape_reason(resources)
        if reason is None:
            raise  # the data is valid FHIR: this is our bug, not bad input
        warnings.append(f"{reason}; {consequence}")
