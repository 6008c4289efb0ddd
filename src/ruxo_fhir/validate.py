"""Validation of FHIR resources against the fhir.resources models of the chosen version.

Every resource gets the models' verdict. By default a compiled fast path
(`ruxo_fhir.fastvalidate`) proves most resources valid without building model objects: the
first resource of each structural shape goes through the model, later ones of a shape the
model accepted are checked leaf by leaf against their FHIR primitive types, and anything the
fast path cannot prove valid goes through the model again, which also words the problems.
`Validator(version, fast=False)` always uses the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pydantic

from ruxo_fhir.fastvalidate import MISMATCH, OK, FastPath
from ruxo_fhir.fhir_version import FhirVersion, model_class

Resource = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Problem:
    """One validation finding: which resource, where (FHIRPath-like) and why."""

    resource: str
    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.resource} at {self.location}: {self.message}"


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

    def __init__(self, version: FhirVersion, *, fast: bool = True) -> None:
        self.version = version
        self._classes: dict[str, Any] = {}
        self.fast: FastPath | None = FastPath() if fast else None

    def _class(self, resource_type: str) -> Any:
        if resource_type not in self._classes:
            self._classes[resource_type] = model_class(self.version, resource_type)
        return self._classes[resource_type]

    def validate(self, resource: Resource) -> list[Problem]:
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
        verdict = MISMATCH
        if fast is not None:
            verdict = fast.check(resource)
            if verdict == OK:
                fast.stats.fast += 1
                return []
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
        if fast is not None and verdict == MISMATCH:
            fast.learn(cls, resource)
        return []
