"""Seeded, streaming generator of synthetic case rows for the benchmark and the streaming test.

`write_cases(path, n, seed)` writes a header and `n` rows without holding them in memory:
a patient's sex and birth date are derived from (seed, patient number), so a later course of
the same patient needs no remembered state. Rows are valid for mappings/default.yaml unless
`dup_every` / `conflict_every` ask for deliberate cross-row problems:

- every `dup_every`-th row repeats the case_id of the row before it (a duplicate case);
- every `conflict_every`-th row reuses an earlier patient with another sex (a conflict).

Run: python benchmarks/gen_cases.py 100000 > cases.csv
"""
from __future__ import annotations

import csv
import random
import sys
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
PRIOR = ("topical_steroids", "tacrolimus", "pimecrolimus", "topical_antifungals", "isotretinoin")
ADVERSE = ("burning", "pruritus", "erythema")
SITES = ("face", "trunk", "fingers", "face+neck", "legs", "toes", "scalp")
SCORES = ("CDASI", "CLASI", "mSASSI")
SEXES = ("F", "F", "F", "M", "M", "other", "unknown")


def patient(seed: int, number: int) -> tuple[str, str, str]:
    """(patient_id, sex, birth_date) of patient `number`: a pure function, no state kept."""
    rng = random.Random(seed * 1_000_003 + number)
    sex = rng.choice(SEXES)
    born = date(1930, 1, 1) + timedelta(days=rng.randrange(0, 365 * 85))
    birth = "" if rng.random() < 0.05 else (str(born.year) if rng.random() < 0.1 else born.isoformat())
    return f"BP{number:07d}", sex, birth


def rows(n: int, seed: int = 1, *, dup_every: int = 0, conflict_every: int = 0):  # type: ignore[no-untyped-def]
    """Yield `n` rows as lists of strings in COLUMNS order."""
    rng = random.Random(seed)
    patients = 0
    for i in range(n):
        if patients and rng.random() < 0.3:
            number = rng.randrange(1, patients + 1)
        else:
            patients += 1
            number = patients
        pid, sex, birth = patient(seed, number)
        case_id = f"B{i + 1:08d}"
        if dup_every and i and i % dup_every == 0:
            case_id = f"B{i:08d}"  # the previous row's case id
        elif conflict_every and i and i % conflict_every == 0 and patients > 1:
            pid, sex, birth = patient(seed, 1)
            sex = "M" if sex != "M" else "F"
        indication = INDICATIONS[i] if i < len(INDICATIONS) else rng.choice(INDICATIONS)
        start = date(2020, 1, 1) + timedelta(days=rng.randrange(0, 365 * 5))
        if birth and int(birth[:4]) >= start.year:
            start = date(int(birth[:4]) + 1, 6, 1)
        onset = ""
        if rng.random() < 0.85:
            before = start - timedelta(days=rng.randrange(30, 365 * 20))
            form = rng.random()
            onset = before.isoformat() if form < 0.3 else (f"{before:%Y-%m}" if form < 0.9 else str(before.year))
        evaluation = (start + timedelta(days=rng.randrange(14, 400))).isoformat() if rng.random() < 0.9 else ""
        improvement = ""
        if rng.random() < 0.9:
            value = rng.randrange(0, 101)
            improvement = f"{value}.5" if rng.random() < 0.1 and value < 100 else str(value)
        score_name = baseline = followup = ""
        if rng.random() < 0.3:
            score_name = rng.choice(SCORES)
            baseline = str(rng.randrange(0, 60))
            followup = str(rng.randrange(0, 60)) if rng.random() < 0.8 else ""
        prior = ";".join(rng.sample(PRIOR, rng.choice((0, 1, 1, 2, 3))))
        adverse = ";".join(rng.sample(ADVERSE, rng.choice((0, 0, 0, 1, 2))))
        yield [
            case_id, pid, sex, birth, indication, rng.choice(SITES) if rng.random() < 0.85 else "",
            onset, prior, start.isoformat(), rng.choice(("BID", "BID", "QD")), evaluation, improvement,
            score_name, baseline, followup, adverse, rng.choice(("", "", "yes", "no")),
        ]


def write_to(fh: TextIO, n: int, seed: int = 1, *, dup_every: int = 0, conflict_every: int = 0) -> None:
    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(rows(n, seed, dup_every=dup_every, conflict_every=conflict_every))


def write_cases(path: str | Path, n: int, seed: int = 1, *, dup_every: int = 0, conflict_every: int = 0) -> Path:
    p = Path(path)
    with p.open("w", encoding="utf-8", newline="") as fh:
        write_to(fh, n, seed, dup_every=dup_every, conflict_every=conflict_every)
    return p


if __name__ == "__main__":
    write_to(sys.stdout, int(sys.argv[1]) if len(sys.argv) > 1 else 1000,
             int(sys.argv[2]) if len(sys.argv) > 2 else 1)
