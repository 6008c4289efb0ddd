"""The case record: the canonical columns and one normalised treatment course (no I/O).

Below both `mapping/` (which maps records to FHIR and back) and `records` (which reads
sheets into records), so neither imports the other for the model.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from decimal import Decimal
from operator import attrgetter

# The canonical case columns, in export order: the code reads each of them, so a mapping must
# declare every one (a column the mapping forgot would be read as empty, silently).
CANONICAL_COLUMNS: tuple[str, ...] = (
    "case_id", "patient_id", "sex", "birth_date", "indication", "site", "disease_onset",
    "prior_treatments", "treatment_start", "frequency", "evaluation_date", "improvement_pct",
    "score_name", "baseline_score", "followup_score", "adverse_events", "recurrence_after_stop",
)


@dataclass(frozen=True, slots=True)
class CaseRecord:
    """One treatment course, values normalised (dates ISO strings, sex F/M/other/unknown)."""

    case_id: str
    patient_id: str
    sex: str
    indication: str
    treatment_start: str
    frequency: str
    birth_date: str | None = None
    site: str | None = None
    disease_onset: str | None = None
    prior_treatments: tuple[str, ...] = ()
    evaluation_date: str | None = None
    improvement_pct: Decimal | None = None
    score_name: str | None = None
    baseline_score: Decimal | None = None
    followup_score: Decimal | None = None
    adverse_events: tuple[str, ...] = ()
    recurrence_after_stop: bool | None = None
    row: int | None = None

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        # pickled (to and from `import --jobs` workers) as new_record(*fields): the frozen
        # dataclass's own state protocol sets each field through object.__setattr__
        return new_record, _record_fields(self)

    def to_row(self) -> dict[str, str]:
        """The canonical CSV row (strings; lists `;`-joined; decimals plain)."""
        return {
            "case_id": self.case_id,
            "patient_id": self.patient_id,
            "sex": self.sex,
            "birth_date": self.birth_date or "",
            "indication": self.indication,
            "site": self.site or "",
            "disease_onset": self.disease_onset or "",
            "prior_treatments": ";".join(self.prior_treatments),
            "treatment_start": self.treatment_start,
            "frequency": self.frequency,
            "evaluation_date": self.evaluation_date or "",
            "improvement_pct": format_decimal(self.improvement_pct),
            "score_name": self.score_name or "",
            "baseline_score": format_decimal(self.baseline_score),
            "followup_score": format_decimal(self.followup_score),
            "adverse_events": ";".join(self.adverse_events),
            "recurrence_after_stop": {True: "yes", False: "no", None: ""}[self.recurrence_after_stop],
        }


# The slot setters of CaseRecord, in field order. A frozen dataclass's __init__ sets each field
# through object.__setattr__ (a generic attribute lookup per field); the reader builds one record
# per row, so `new_record` sets the slots directly: the same record for a third of the cost.
_RECORD_SLOTS = tuple(getattr(CaseRecord, f.name).__set__ for f in fields(CaseRecord))
_record_fields = attrgetter(*(f.name for f in fields(CaseRecord)))
_new = object.__new__


def new_record(*values: object) -> CaseRecord:
    """CaseRecord(*values), every field given in declaration order (the reader's hot path)."""
    if len(values) != len(_RECORD_SLOTS):
        raise TypeError(f"new_record takes {len(_RECORD_SLOTS)} values, got {len(values)}")
    record: CaseRecord = _new(CaseRecord)
    for set_slot, value in zip(_RECORD_SLOTS, values):
        set_slot(record, value)
    return record


@dataclass(frozen=True, slots=True)
class Reject:
    """A row that could not be accepted: its raw values, source line and the reason."""

    row: int
    values: dict[str, str]
    column: str
    error: str

    @property
    def message(self) -> str:
        return f"{self.column}: {self.error}"


def format_decimal(value: Decimal | None) -> str:
    """Plain decimal text without exponent or trailing zeros: 85.50 -> 85.5, 1E+2 -> 100."""
    if value is None:
        return ""
    text = format(value.normalize(), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text
