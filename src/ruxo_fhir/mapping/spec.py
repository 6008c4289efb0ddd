"""Loads and checks a mapping file (mappings/*.yaml|json): columns, code tables, identifier systems."""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ruxo_fhir.errors import MappingError
from ruxo_fhir.model import CANONICAL_COLUMNS as CANONICAL_COLUMNS

Confidence = Literal["C", "P", "U"]
_RANK = {"C": 2, "P": 1, "U": 0}

# Keys the mapping code looks up by name (forward, reverse and outcomes).
NEEDED_PROJECT_SYSTEMS = ("indication", "score", "prior_treatment", "adverse_event")
NEEDED_SYSTEMS = ("ucum", "data_absent_reason", "timing_abbreviation", "observation_category")
NEEDED_OBSERVATION_CODES = ("improvement", "recurrence", "response")
RESPONSE_CATEGORIES = ("complete", "partial", "none", "not_evaluable")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSpec(_Model):
    """One coding: `system` is a short name from `systems:` or `project:<name>`, or a URI."""

    system: str
    code: str
    display: str | None = None
    confidence: Confidence = "C"


class ColumnSpec(_Model):
    required: bool = False
    aliases: tuple[str, ...] = ()


class LabelSpec(_Model):
    """An indication / prior treatment / adverse event label and its codes."""

    display: str
    seed_wording: str | None = None
    group: str | None = None
    codes: tuple[CodeSpec, ...] = ()


class FrequencySpec(_Model):
    frequency: int
    period: float
    period_unit: str
    text: str


class RouteSpec(_Model):
    text: str
    codes: tuple[CodeSpec, ...] = ()


class MedicationSpec(_Model):
    text: str
    codes: tuple[CodeSpec, ...] = ()
    route: RouteSpec
    frequencies: dict[str, FrequencySpec]


class ReportSpec(_Model):
    """The words of the outcomes report and plot: the study's, so they live in the mapping."""

    title: str = "Treatment outcomes"
    plot_title: str = "Improvement per case by indication"
    improvement_axis: str = "improvement (%)"


MedicationStatementStatus = Literal["active", "completed", "entered-in-error", "intended", "stopped",
                                    "on-hold", "unknown", "not-taken"]
ObservationStatus = Literal["registered", "preliminary", "final", "amended", "corrected", "cancelled",
                            "entered-in-error", "unknown"]
ConditionClinicalStatus = Literal["active", "recurrence", "relapse", "inactive", "remission", "resolved"]


class StatusesSpec(_Model):
    """The status codes the forward mapping writes (values of FHIR R4's required bindings):
    a study's data may be, e.g., a finished treatment or preliminary results."""

    medication_statement: MedicationStatementStatus = "active"
    prior_treatment: MedicationStatementStatus = "completed"
    observation: ObservationStatus = "final"
    condition_clinical: ConditionClinicalStatus = "active"


class ObservationSpec(_Model):
    code: CodeSpec | None = None
    unit: str | None = None
    category: str | None = None
    higher_is_better: tuple[str, ...] = ()
    categories: dict[str, CodeSpec] = Field(default_factory=dict)


class ObservationsSpec(_Model):
    improvement: ObservationSpec
    score: ObservationSpec
    recurrence: ObservationSpec
    response: ObservationSpec


class IdentifierSystems(_Model):
    case: str
    patient: str
    resource: str


PatientMode = Literal["create", "link", "link-or-create"]


class PatientsSpec(_Model):
    """Whose Patients these are. `create`: ours (identifier system `identifier_systems.patient`).
    `link`: the EHR's own Patients, matched by `match_system` (e.g. the hospital MRN) and only
    referenced, never written. `link-or-create`: linked when found, else created carrying the
    match identifier too."""

    mode: PatientMode = "create"
    match_system: str | None = None

    @model_validator(mode="after")
    def _needs_system(self) -> PatientsSpec:
        if self.mode != "create" and not self.match_system:
            raise ValueError(f"patients.mode {self.mode} needs patients.match_system "
                             "(the identifier system of the EHR's own Patients, e.g. its MRN)")
        return self

    @property
    def linked(self) -> bool:
        return self.mode != "create"


class MappingSpec(_Model):
    """A whole mapping file; `source` and `digest` say which file and which content."""

    mapping_version: str
    identifier_systems: IdentifierSystems
    patients: PatientsSpec = Field(default_factory=PatientsSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)
    statuses: StatusesSpec = Field(default_factory=StatusesSpec)
    project_systems: dict[str, str]
    min_confidence: Confidence = "P"
    columns: dict[str, ColumnSpec]
    sex: dict[str, Any]
    indications: dict[str, LabelSpec]
    body_sites: dict[str, CodeSpec] = Field(default_factory=dict)
    prior_treatments: dict[str, LabelSpec] = Field(default_factory=dict)
    adverse_events: dict[str, LabelSpec] = Field(default_factory=dict)
    medication: MedicationSpec
    observations: ObservationsSpec
    systems: dict[str, str]
    # strptime formats tried in order for dates that are not ISO (e.g. ["%d/%m/%Y", "%m/%Y", "%Y"]);
    # empty = ISO only. `import --date-format` adds to these.
    date_formats: tuple[str, ...] = ()
    source: str = ""
    digest: str = ""

    @model_validator(mode="after")
    def _check_systems(self) -> MappingSpec:
        for where, code in self._all_codes():
            self.system_uri(code.system, where=where)
        return self

    @model_validator(mode="after")
    def _check_needed_keys(self) -> MappingSpec:
        """Refuse at load what the code would otherwise read as empty or fail on mid-run."""
        missing = [f"columns.{c}" for c in CANONICAL_COLUMNS if c not in self.columns]
        missing += [f"project_systems.{k}" for k in NEEDED_PROJECT_SYSTEMS if k not in self.project_systems]
        missing += [f"systems.{k}" for k in NEEDED_SYSTEMS if k not in self.systems]
        missing += [f"observations.{k}.code" for k in NEEDED_OBSERVATION_CODES
                    if getattr(self.observations, k).code is None]
        missing += [f"observations.response.categories.{k}" for k in RESPONSE_CATEGORIES
                    if k not in self.observations.response.categories]
        if not self.medication.frequencies:
            missing.append("medication.frequencies")
        if missing:
            raise ValueError(f"missing key(s) the mapping code needs: {', '.join(missing)} "
                             "(copy them from the shipped mappings/default.yaml)")
        for fmt in self.date_formats:
            if "%" not in fmt:
                raise ValueError(f"date_formats: {fmt!r} is not a strptime format (e.g. %d/%m/%Y)")
        return self

    def all_codes(self) -> list[tuple[str, CodeSpec]]:
        """Every coding the mapping writes, with where it is in the mapping file."""
        return self._all_codes()

    def _all_codes(self) -> list[tuple[str, CodeSpec]]:
        out: list[tuple[str, CodeSpec]] = []
        for table_name in ("indications", "prior_treatments", "adverse_events"):
            table: dict[str, LabelSpec] = getattr(self, table_name)
            for label, spec in table.items():
                out += [(f"{table_name}.{label}", c) for c in spec.codes]
        out += [(f"body_sites.{k}", c) for k, c in self.body_sites.items()]
        out += [("medication.codes", c) for c in self.medication.codes]
        out += [("medication.route", c) for c in self.medication.route.codes]
        for name in ("improvement", "score", "recurrence", "response"):
            obs: ObservationSpec = getattr(self.observations, name)
            if obs.code:
                out.append((f"observations.{name}.code", obs.code))
            out += [(f"observations.{name}.categories.{k}", c) for k, c in obs.categories.items()]
        return out

    @property
    def patient_system(self) -> str:
        """The identifier system that names a case's Patient (the MRN system in link modes)."""
        if self.patients.linked and self.patients.match_system:
            return self.patients.match_system
        return self.identifier_systems.patient

    def example_identifier_systems(self) -> list[str]:
        """Identifier systems still on a `*.example` host (the shipped ones): every site that
        keeps them names its resources the same way, so they collide on a shared server."""
        from urllib.parse import urlsplit

        systems = [self.identifier_systems.case, self.identifier_systems.patient,
                   self.identifier_systems.resource, *([self.patients.match_system] if self.patients.linked
                                                       and self.patients.match_system else [])]
        out = []
        for system in systems:
            host = (urlsplit(system).hostname or "").lower()
            if (host == "example" or host.endswith(".example")) and system not in out:
                out.append(system)
        return out

    def system_uri(self, name: str, *, where: str = "") -> str:
        """Resolve a short system name (`snomed`, `project:outcome`) or pass a URI through."""
        if "://" in name or name.startswith("urn:"):
            return name
        if name.startswith("project:"):
            key = name.split(":", 1)[1]
            if key in self.project_systems:
                return self.project_systems[key]
        elif name in self.systems:
            return self.systems[name]
        raise ValueError(f"unknown code system {name!r} at {where or '?'}")

    def with_date_formats(self, formats: tuple[str, ...] | list[str]) -> MappingSpec:
        """This mapping with `formats` tried first for non-ISO dates (import --date-format)."""
        if not formats:
            return self
        for fmt in formats:
            if "%" not in fmt:
                raise MappingError(f"{fmt!r} is not a strptime date format (e.g. %d/%m/%Y)", key="date_formats")
        merged = tuple(dict.fromkeys((*formats, *self.date_formats)))
        return self.model_copy(update={"date_formats": merged})

    def keeps(self, code: CodeSpec) -> bool:
        """True when the code's confidence reaches `min_confidence` (U codes never do)."""
        return code.confidence != "U" and _RANK[code.confidence] >= _RANK[self.min_confidence]

    def coding(self, code: CodeSpec) -> dict[str, str]:
        out = {"system": self.system_uri(code.system), "code": code.code}
        if code.display:
            out["display"] = code.display
        return out

    def codings(self, codes: tuple[CodeSpec, ...]) -> list[dict[str, str]]:
        return [self.coding(c) for c in codes if self.keeps(c)]

    def sex_spellings(self) -> dict[str, Any]:
        """Every accepted input spelling, lower case -> F/M/other/unknown: the aliases, and the
        canonical keys in any case (a canonical key beats an alias). Build it once per file."""
        table: dict[str, Any] = dict(self.sex.get("aliases", {}))
        table.update({key.lower(): key for key in self.sex if key != "aliases"})
        return table

    def sex_code(self, raw: str) -> str | None:
        """Normalise an input sex spelling to F/M/other/unknown, or None when unknown."""
        return self.sex_spellings().get(raw.strip().lower())

    def gender(self, sex: str) -> str:
        return str(self.sex[sex])

    def sex_from_gender(self, gender: str) -> str:
        for key, value in self.sex.items():
            if key != "aliases" and value == gender:
                return key
        return "unknown"

    @property
    def required_columns(self) -> list[str]:
        return [name for name, col in self.columns.items() if col.required]

    def group_of(self, label: str) -> str:
        spec = self.indications.get(label)
        return spec.group or label if spec else label


def default_mapping_path() -> Path:
    """The shipped mapping: the packaged copy in an installed wheel, `mappings/default.yaml` in a checkout.

    Only the checkout this module sits in counts (`<repo>/src/ruxo_fhir/mapping/spec.py`), never
    some other `mappings/` folder further up the tree.
    """
    packaged = Path(str(resources.files("ruxo_fhir"))) / "data" / "default.yaml"
    if packaged.is_file():
        return packaged
    package_dir = Path(__file__).resolve().parents[1]
    if package_dir.parent.name == "src":
        checkout = package_dir.parent.parent / "mappings" / "default.yaml"
        if checkout.is_file():
            return checkout
    return packaged


def _parse_yaml(raw: bytes) -> Any:
    """The YAML document, read by libyaml when PyYAML has it: a tenth of the pure parser's time
    on the shipped mapping, most of a small import's mapping cost. Only the parser differs (the
    constructor is the same safe one), and only where both read a file alike: a file libyaml
    refuses, or one with a tab or a `?` (libyaml accepts `key:<tab>value` and `?` inside a flow
    scalar, which the pure parser refuses), is read by the pure parser, so it is read or
    reported exactly as before. (No other disagreement in 7,000 mutated copies of the shipped file.)"""
    import yaml  # here: a JSON mapping never needs it

    fast = getattr(yaml, "CSafeLoader", None)
    if fast is not None and b"\t" not in raw and b"?" not in raw:
        try:
            return yaml.load(raw, Loader=fast)  # CSafeLoader: the safe loader, in C
        except yaml.YAMLError:
            pass
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


@lru_cache(maxsize=16)
def _load_cached(path: str, mtime_ns: int) -> MappingSpec:
    p = Path(path)
    try:
        raw_bytes = p.read_bytes()
    except OSError as exc:
        raise MappingError(f"cannot read mapping file ({exc.strerror})", file=path) from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(raw_bytes)
        else:
            data = _parse_yaml(raw_bytes)
    except ValueError as exc:
        raise MappingError(f"not valid YAML/JSON ({str(exc).splitlines()[0]})", file=path) from None
    if not isinstance(data, dict):
        raise MappingError("top level must be a mapping (key: value)", file=path)
    data["source"] = str(p)
    data["digest"] = hashlib.sha256(raw_bytes).hexdigest()
    try:
        return MappingSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        msg = err["msg"]
        if err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        raise MappingError(msg, file=path, key=key or None) from None


def load_mapping(path: str | Path | None = None) -> MappingSpec:
    """Load a mapping file (YAML or JSON); None means the shipped default."""
    p = Path(path) if path is not None else default_mapping_path()
    try:
        mtime = p.stat().st_mtime_ns
    except OSError:
        raise MappingError("mapping file not found", file=str(p)) from None
    return _load_cached(str(p), mtime)
