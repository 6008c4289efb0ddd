"""Property: any valid case CSV -> import -> export gives back the same rows, normalised."""
from __future__ import annotations

import csv
import io
import tempfile
import warnings
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from helpers import CANONICAL, read_csv_rows, read_exported_rows
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ruxo_fhir.exporter import export_cases
from ruxo_fhir.importer import import_cases
from ruxo_fhir.mapping.spec import load_mapping

# When a property fails, hypothesis' pytest plugin imports libcst (to suggest an @example
# patch), which raises a DeprecationWarning from mypy_extensions; under `filterwarnings =
# error` that turns a plain test failure into a pytest INTERNALERROR. Import it once here,
# warnings silenced, so a failure is reported as a failure.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:
        pass

KNOWN_INDICATIONS = ["dermatomyositis", "discoid_lupus", "lupus_panniculitis", "cutaneous_sarcoidosis",
                     "calcinosis_cutis", "chilblains", "morphea", "sweet_syndrome", "mixed_facial_dermatosis"]
KNOWN_PRIOR = ["topical_steroids", "tacrolimus", "pimecrolimus", "topical_antifungals", "systemic_antifungals",
               "topical_ivermectin", "isotretinoin"]
KNOWN_AE = ["burning", "pruritus", "erythema"]

# input spelling -> normalised value
SEX_SPELLINGS = {"F": ["F", "female", "f", "Female"], "M": ["M", "male", "m"], "other": ["other", "Other"],
                 "unknown": ["unknown", "UNKNOWN"]}
YES_NO_SPELLINGS = {"yes": ["yes", "Yes", "y", "oui"], "no": ["no", "NO", "n", "non"]}
FREQ_SPELLINGS = {"BID": ["BID", "bid"], "QD": ["QD", "qd"]}

# Free text: letters (some accented), digits and punctuation that needs CSV quoting; no
# leading/trailing spaces (the reader trims) and no ';' in list labels.
_WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyzéèœçABCXYZ0123456789_-'", min_size=1, max_size=10)
_TEXT = st.builds(lambda a, sep, b: f"{a}{sep}{b}" if b else a, _WORD, st.sampled_from([" ", "+", ", ", "/"]),
                  st.one_of(st.just(""), _WORD))
_ID = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,10}", fullmatch=True)

UNKNOWN_LABEL = _WORD.filter(lambda w: w not in KNOWN_INDICATIONS + KNOWN_PRIOR + KNOWN_AE)


def plain(hundredths: int) -> str:
    """Normalised decimal text of hundredths/100, computed independently of the code under test."""
    sign = "-" if hundredths < 0 else ""
    whole, frac = divmod(abs(hundredths), 100)
    text = f"{whole}.{frac:02d}".rstrip("0").rstrip(".")
    return "0" if text == "0" else sign + text


def spelled_decimal(hundredths: int, style: int) -> str:
    """An input spelling of hundredths/100: plain, two fixed places, or decimal comma."""
    if style == 0:
        return plain(hundredths)
    sign = "-" if hundredths < 0 else ""
    whole, frac = divmod(abs(hundredths), 100)
    return f"{sign}{whole}{'.' if style == 1 else ','}{frac:02d}"


@dataclass
class Case:
    raw: dict[str, str]
    expected: dict[str, str]


@st.composite
def iso_date(draw: st.DrawFn, lo: date, hi: date) -> date:
    return lo + timedelta(days=draw(st.integers(0, (hi - lo).days)))


@st.composite
def patients(draw: st.DrawFn) -> list[tuple[str, str, str]]:
    ids = draw(st.lists(_ID, min_size=1, max_size=4, unique=True))
    out = []
    for pid in ids:
        sex = draw(st.sampled_from(sorted(SEX_SPELLINGS)))
        kind = draw(st.sampled_from(["", "year", "full"]))
        birth = draw(iso_date(date(1920, 1, 1), date(2019, 12, 31)))
        birth_text = {"": "", "year": f"{birth.year:04d}", "full": birth.isoformat()}[kind]
        out.append((pid, sex, birth_text))
    return out


@st.composite
def labels(draw: st.DrawFn, known: list[str], max_size: int) -> list[str]:
    return draw(st.lists(st.one_of(st.sampled_from(known), UNKNOWN_LABEL), max_size=max_size))


@st.composite
def optional(draw: st.DrawFn, strategy: st.SearchStrategy[str]) -> str:
    return draw(st.one_of(st.just(""), strategy))


@st.composite
def case(draw: st.DrawFn, case_id: str, patient: tuple[str, str, str]) -> Case:
    pid, sex, birth = patient
    raw: dict[str, str] = {"case_id": case_id, "patient_id": pid, "birth_date": birth}
    exp: dict[str, str] = {"case_id": case_id, "patient_id": pid, "birth_date": birth, "sex": sex}
    raw["sex"] = draw(st.sampled_from(SEX_SPELLINGS[sex]))
    exp["indication"] = raw["indication"] = draw(st.one_of(st.sampled_from(KNOWN_INDICATIONS), UNKNOWN_LABEL))
    exp["site"] = raw["site"] = draw(optional(st.one_of(st.sampled_from(["face", "Face", "face+hands"]), _TEXT)))
    onset = draw(iso_date(date(1990, 1, 1), date(2019, 12, 31)))
    exp["disease_onset"] = raw["disease_onset"] = draw(st.sampled_from(
        ["", f"{onset.year:04d}", onset.isoformat()[:7], onset.isoformat()]))
    prior = draw(labels(KNOWN_PRIOR, 4))
    raw["prior_treatments"] = draw(st.sampled_from([";", "; "])).join(prior)
    exp["prior_treatments"] = ";".join(prior)
    start = draw(iso_date(date(2020, 1, 1), date(2025, 12, 31)))
    exp["treatment_start"] = raw["treatment_start"] = start.isoformat()
    freq = draw(st.sampled_from(sorted(FREQ_SPELLINGS)))
    exp["frequency"], raw["frequency"] = freq, draw(st.sampled_from(FREQ_SPELLINGS[freq]))
    has_eval = draw(st.booleans())
    evaluation = (start + timedelta(days=draw(st.integers(0, 400)))).isoformat() if has_eval else ""
    exp["evaluation_date"] = raw["evaluation_date"] = evaluation
    raw["improvement_pct"] = exp["improvement_pct"] = ""
    if draw(st.booleans()):
        n = draw(st.integers(-10000, 10000))
        raw["improvement_pct"] = spelled_decimal(n, draw(st.integers(0, 2)))
        exp["improvement_pct"] = plain(n)
    raw["baseline_score"] = exp["baseline_score"] = raw["followup_score"] = exp["followup_score"] = ""
    for column in ("baseline_score", "followup_score"):
        if draw(st.booleans()):
            n = draw(st.integers(0, 20000))
            raw[column], exp[column] = spelled_decimal(n, draw(st.integers(0, 2))), plain(n)
    has_score = bool(exp["baseline_score"] or exp["followup_score"])
    name = draw(st.sampled_from(["CDASI", "CLASI", "mSWAT", "IGA 5-point"]))
    # score_name is required with a value and optional (may still be given) without one
    exp["score_name"] = raw["score_name"] = name if has_score or draw(st.booleans()) else ""
    events = draw(labels(KNOWN_AE, 3))
    raw["adverse_events"], exp["adverse_events"] = ";".join(events), ";".join(events)
    recurrence = draw(st.sampled_from(["", "yes", "no"]))
    exp["recurrence_after_stop"] = recurrence
    raw["recurrence_after_stop"] = draw(st.sampled_from(YES_NO_SPELLINGS[recurrence])) if recurrence else ""
    return Case(raw, {c: exp[c] for c in CANONICAL})


@st.composite
def cohorts(draw: st.DrawFn) -> list[Case]:
    people = draw(patients())
    case_ids = draw(st.lists(_ID, min_size=1, max_size=6, unique=True))
    return [draw(case(cid, draw(st.sampled_from(people)))) for cid in case_ids]


def write_raw(path: Path, cases: list[Case], columns: list[str], delimiter: str) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, delimiter=delimiter, lineterminator="\n")
    writer.writeheader()
    for c in cases:
        writer.writerow({k: c.raw[k] for k in columns})
    path.write_text(buf.getvalue(), encoding="utf-8")


# No explain phase: it re-runs a failing example many times (slow) and adds little here.
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])
@given(cohort=cohorts(), column_order=st.permutations(list(CANONICAL)), delimiter=st.sampled_from([",", ";"]),
       fmt=st.sampled_from(["bundle", "ndjson"]), version=st.sampled_from(["R4", "R5"]))
def test_import_then_export_gives_the_same_rows(
    cohort: list[Case], column_order: list[str], delimiter: str, fmt: str, version: str,
) -> None:
    mapping = load_mapping()
    with tempfile.TemporaryDirectory() as tmp:
        src, out, back = Path(tmp, "cases.csv"), Path(tmp, "out.json" if fmt == "bundle" else "out"), Path(tmp, "back.csv")
        write_raw(src, cohort, column_order, delimiter)
        result = import_cases(src, out, mapping=mapping, fmt=fmt, version=version)  # type: ignore[arg-type]
        assert (result.report.accepted, result.report.rejected) == (len(cohort), 0), \
            read_csv_rows(result.rejects_path)
        export_cases(out, back, mapping=mapping)
        assert read_exported_rows(back) == [c.expected for c in cohort]
