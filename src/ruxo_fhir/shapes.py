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
from collections.abc import Callable, Iterator
from decimal import InvalidOperation
from typing import Any

SHAPE_ERRORS: tuple[type[BaseException], ...] = (
    AttributeError, TypeError, KeyError, IndexError, ValueError, InvalidOperation,
)


@contextlib.contextmanager
def shape_guard(resources: list[Any], warnings: list[str], consequence: str,
                explain: Callable[[list[Any]], str | None] | None) -> Iterator[None]:
    """Turn a type error while reading `resources` into one warning (`<why>; <consequence>`).

    `explain` (validate.shape_reason, passed in by the stage layer) names the bad field."""
    try:
        yield
    except SHAPE_ERRORS:
        reason = explain(resources) if explain is not None else None
        if reason is None:
            raise  # the data is valid FHIR: this is our bug, not bad input
        warnings.append(f"{reason}; {consequence}")
