"""THE seeded generator of synthetic case rows, for the tests and the benchmarks alike.

`generate_cases(n, seed)` returns the CSV text of `n` case rows in the canonical column order;
`write_cases(path, n, seed)` streams them to a file (benchmarks/gen_cases.py is its command line).
The same (n, seed) always gives the same rows. Rows are valid for the shipped mapping
(mappings/default.yaml) and varied on purpose:

- some patients have several cases (same sex and birth date on every row of a patient);
- every indication label of the default mapping appears as soon as n >= 9 (the first rows
  cycle through them), and every optional column is sometimes empty, sometimes filled;
- prior treatments and adverse events are `;`-lists of 0..3 known labels;
- scores come as name + baseline and/or follow-up value; recurrence is yes / no / empty;
- improvement is an integer or a one-decimal number in 0..100 (sometimes negative), or empty.

Deliberate cross-row problems only when asked: every `dup_every`-th row repeats the case id of
the row before it (a duplicate case); every `conflict_every`-th row reuses the first patient with
another sex (a conflict). Rows stream: what is kept per patient is 5 bytes (two arrays), so a
million rows need a few MB.

Nothing here is real: ids are `G000001`-style case ids and `GP00001`-style patient ids.
Written independently of the code under test (only the label lists mirror the mapping file).
"""
from __future__ import annotations

import csv
import io
import random
from array import array
from collections.abc import Iterable, Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import TextIO

COLUMNS = (
    "case_id", "patient_id", "sex", "birth_date", "indication", "site", "disease_onset",
    "prior_treatments", "treatment_start", "frequency", "evaluation_date", "improvement_pct",
    "score_name", "baseline_score", "followup_score", "adverse_events", "recurrence_after_stop",
)

INDICATIONS = (
    "dermatomyositis", "discoid_lupus", "lupus_panniculitis", "cutaneous_sarcoidosis",
    "calcinosis_cutis", "chilblains", "morphea", "sweet_syndrome", "mixed_facial_dermatosis",
)
PRIOR_TREATMENTS = (
    "topical_steroids", "tacrolimus", "pimecrolimus", "topical_antifungals", "systemic_antifungals",
    "topical_ivermectin", "isotretinoin",
)
ADVERSE_EVENTS = ("burning", "pruritus", "erythema")
SITES = ("face", "trunk", "fingers", "face+neck", "face+hands", "legs", "toes", "left arm+shoulder", "scalp")
SCORES = ("CDASI", "CLASI", "mSASSI")
SEXES = ("F", "M", "other", "unknown")
_SEX_DRAW = ("F", "F", "F", "M", "M", "other", "unknown")
_EPOCH = date(1930, 1, 1)


class _Patients:
    """The patients drawn so far, 5 bytes each: sex (index into SEXES) and birth date (days
    since 1930 * 2 + 1 if only the year is given; -1 if empty). A sequence for `rng.choice`."""

    def __init__(self) -> None:
        self._sex = array("B")
        self._birth = array("l")

    def __len__(self) -> int:
        return len(self._sex)

    def __getitem__(self, i: int) -> tuple[str, str, str]:
        code = self._birth[i]
        birth = ""
        if code >= 0:
            born = _EPOCH + timedelta(days=code >> 1)
            birth = str(born.year) if code & 1 else born.isoformat()
        return f"GP{i + 1:05d}", SEXES[self._sex[i]], birth

    def new(self, rng: random.Random) -> tuple[str, str, str]:
        """Draw the next patient; birth date sometimes only a year, sometimes missing."""
        sex = rng.choice(_SEX_DRAW)
        days = rng.randrange(0, 365 * 85)
        code = -1 if rng.random() < 0.05 else days * 2 + (1 if rng.random() < 0.1 else 0)
        self._sex.append(SEXES.index(sex))
        self._birth.append(code)
        return self[len(self) - 1]


def iter_rows(n: int, seed: int = 1, *, dup_every: int = 0, conflict_every: int = 0) -> Iterator[dict[str, str]]:
    """`n` case rows, one at a time, as dicts of the canonical columns (all values strings)."""
    rng = random.Random(seed)
    patients = _Patients()
    for i in range(n):
        if len(patients) and rng.random() < 0.3:  # another course for an earlier patient
            patient_id, sex, birth = rng.choice(patients)
        else:
            patient_id, sex, birth = patients.new(rng)
        case_id = f"G{i + 1:06d}"
        if dup_every and i and i % dup_every == 0:
            case_id = f"G{i:06d}"  # the previous row's case id
        elif conflict_every and i and i % conflict_every == 0 and len(patients) > 1:
            patient_id, sex, birth = patients[0]
            sex = "M" if sex != "M" else "F"
        indication = INDICATIONS[i] if i < len(INDICATIONS) else rng.choice(INDICATIONS)
        start = date(2020, 1, 1) + timedelta(days=rng.randrange(0, 365 * 5))
        if birth:
            born_year = int(birth[:4])
            if born_year >= start.year:  # keep birth before the start
                start = date(born_year + 1, 6, 1)
        onset = ""
        if rng.random() < 0.85:
            before = start - timedelta(days=rng.randrange(30, 365 * 20))
            form = rng.random()
            onset = before.isoformat() if form < 0.3 else (f"{before:%Y-%m}" if form < 0.9 else str(before.year))
        evaluation = ""
        if rng.random() < 0.9:
            evaluation = (start + timedelta(days=rng.randrange(14, 400))).isoformat()
        improvement = ""
        if rng.random() < 0.9:
            value = rng.randrange(-20, 101) if rng.random() < 0.1 else rng.randrange(0, 101)
            improvement = f"{value}.5" if rng.random() < 0.1 and value < 100 and value >= 0 else str(value)
        score_name = baseline = followup = ""
        if rng.random() < 0.3:
            score_name = rng.choice(SCORES)
            which = rng.random()
            if which < 0.8:
                baseline = str(rng.randrange(0, 60))
            if which > 0.2 or not baseline:
                followup = str(rng.randrange(0, 60)) if rng.random() < 0.9 else f"{rng.randrange(0, 60)}.5"
        prior = ";".join(rng.sample(PRIOR_TREATMENTS, rng.choice((0, 0, 1, 1, 2, 2, 3))))
        adverse = ";".join(rng.sample(ADVERSE_EVENTS, rng.choice((0, 0, 0, 0, 1, 1, 2))))
        yield {
            "case_id": case_id,
            "patient_id": patient_id,
            "sex": sex,
            "birth_date": birth,
            "indication": indication,
            "site": rng.choice(SITES) if rng.random() < 0.85 else "",
            "disease_onset": onset,
            "prior_treatments": prior,
            "treatment_start": start.isoformat(),
            "frequency": rng.choice(("BID", "BID", "BID", "QD")),
            "evaluation_date": evaluation,
            "improvement_pct": improvement,
            "score_name": score_name,
            "baseline_score": baseline,
            "followup_score": followup,
            "adverse_events": adverse,
            "recurrence_after_stop": rng.choice(("", "", "", "yes", "no")),
        }


def generate_rows(n: int, seed: int = 1) -> list[dict[str, str]]:
    """`n` valid case rows as dicts of the canonical columns (all values strings)."""
    return list(iter_rows(n, seed))


def write_rows(fh: TextIO, rows: Iterable[dict[str, str]]) -> None:
    """A header and the rows as CSV (comma, `\\n`, ASCII) on an open text stream."""
    writer = csv.DictWriter(fh, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in COLUMNS})


def rows_to_csv(rows: Iterable[dict[str, str]]) -> str:
    buf = io.StringIO()
    write_rows(buf, rows)
    return buf.getvalue()


def generate_cases(n: int, seed: int = 1) -> str:
    """CSV text (header + `n` rows, UTF-8-safe ASCII, comma, `\\n`) of synthetic valid cases."""
    return rows_to_csv(iter_rows(n, seed))


def write_cases(path: str | Path, n: int, seed: int = 1, *, dup_every: int = 0, conflict_every: int = 0) -> Path:
    """Stream `n` rows to a CSV file (nothing held in memory beyond the patients' 5 bytes)."""
    p = Path(path)
    with p.open("w", encoding="utf-8", newline="") as fh:
        write_rows(fh, iter_rows(n, seed, dup_every=dup_every, conflict_every=conflict_every))
    return p
