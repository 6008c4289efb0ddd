"""Validation of FHIR resources: the fhir.resources models, then the spec's core rules.

Structure and datatypes are the models' verdict; cardinality, required bindings, invariants
(FHIRPath) and terminology warnings come from `ruxo_fhir.conformance` (the spec's definitions,
generated into rules/R4.json and rules/R5.json). `Validator.check` gives errors and warnings,
`Validator.validate` errors only (a resource is valid when it has none). By default a compiled fast path
(`ruxo_fhir.fastvalidate`) proves most resources valid without building model objects: the
first resource of each structural shape goes through the model, later ones of a shape the
model accepted are checked leaf by leaf against their FHIR primitive types, and anything the
fast path cannot prove valid goes through the model again, which also words the problems.
`Validator(version, fast=False)` always uses the model.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic

from ruxo_fhir.conformance import Rules, Trace, rules_for
from ruxo_fhir.fastvalidate import MISMATCH, OK, FastPath
from ruxo_fhir.fhir_version import FhirVersion, model_class
from ruxo_fhir.resource import Resource


@dataclass(frozen=True, slots=True)
class Problem:
    """One validation finding: which resource, where (FHIRPath-like), which rule and why.

    `rule` is an invariant key (per-1, qty-3, ...), `binding`, `cardinality`, `structure` (the
    model), or a terminology check (snomed-check-digit, icd10-format, ucum, system-uri, ...).
    """

    resource: str
    location: str
    message: str
    rule: str = "structure"
    severity: str = "error"  # or "warning": reported, but the resource stays valid

    def __str__(self) -> str:
        text = self.message if self.severity == "error" else f"warning: {self.message}"
        return f"{self.resource}  {self.location}  {self.rule}  {text}"


def _fhirpath(resource_type: str, loc: tuple[int | str, ...]) -> str:
    path = resource_type
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in ("__root__",):
            path += f".{part}"
    return path


def resource_label(resource: Resource) -> str:
    return f"{resource.get('resourceType', '?')}/{resource.get('id', '?')}"


class Validator:
    """Validates resources of one FHIR version; returns problems rather than raising."""

    def __init__(self, version: FhirVersion, *, fast: bool = True, frozen: Mapping[int, Any] | None = None) -> None:
        """`frozen`: objects shared by resources and never edited, deeply (see `FastPath`)."""
        self.version = version
        self._classes: dict[str, Any] = {}
        self.rules: Rules = rules_for(version)
        self.fast: FastPath | None = FastPath(self.rules, frozen) if fast else None

    def _class(self, resource_type: str) -> Any:
        if resource_type not in self._classes:
            self._classes[resource_type] = model_class(self.version, resource_type)
        return self._classes[resource_type]

    def validate(self, resource: Resource) -> list[Problem]:
        """The errors of `resource` (empty: valid)."""
        fast = self.fast
        verdict = MISMATCH
        if fast is not None:  # the hot path: a compiled shape proves most resources valid
            verdict = fast.check(resource)
            if verdict == OK:
                fast.stats.fast += 1
                return []
        found = self._check(resource, verdict)
        return [p for p in found if p.severity == "error"] if found else found

    def check(self, resource: Resource) -> list[Problem]:
        """Errors and warnings of `resource`."""
        fast = self.fast
        verdict = MISMATCH
        if fast is not None:
            verdict = fast.check(resource)
            if verdict == OK:
                fast.stats.fast += 1
                return []
        return self._check(resource, verdict)

    def _check(self, resource: Resource, verdict: int) -> list[Problem]:
        """Errors and warnings of a resource the fast path did not prove valid (`verdict`)."""
        kind = resource.get("resourceType")
        if not isinstance(kind, str) or not kind:
            return [Problem(resource_label(resource), "resourceType", "missing resourceType")]
        cls = self._classes.get(kind)
        if cls is None:
            try:
                cls = self._class(kind)
            except (KeyError, ValueError, AttributeError, ImportError):
                return [Problem(resource_label(resource), "resourceType",
                                f"unknown resource type {kind!r} in FHIR {self.version}")]
        fast = self.fast
        if fast is not None:
            fast.stats.model += 1
        try:
            cls.model_validate(resource)
        except pydantic.ValidationError as exc:
            label = resource_label(resource)
            return [
                Problem(label, _fhirpath(kind, tuple(err["loc"])), str(err["msg"]))
                for err in exc.errors()
            ]
        except (ValueError, TypeError) as exc:  # some model validators raise plain errors
            return [Problem(resource_label(resource), kind, str(exc).splitlines()[0])]
        trace = Trace() if fast is not None and verdict == MISMATCH else None
        findings = self.rules.check(resource, trace)
        if findings:
            label = resource_label(resource)
            return [Problem(label, f.location, f.message, f.rule, f.severity) for f in findings]
        if fast is not None and trace is not None:
            fast.learn(cls, resource, trace)
        return []


def shape_reason(resources: Iterable[Any]) -> str | None:
    """The first structural problem of the resources, as `Type/id at location: why`, or None."""
    from ruxo_fhir.fhir_version import data_version
    from ruxo_fhir.shapes import SHAPE_ERRORS

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
