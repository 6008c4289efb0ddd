"""A seeded generator of synthetic, valid case rows (CSV text) for the end-to-end sync tests.

`generate_cases(n, seed)` returns the CSV text of `n` case rows in the canonical column order.
The same (n, seed) always gives the same text. Rows are valid for the shipped mapping
(mappings/default.yaml) and varied on purpose:

- some patients have several cases (same sex and birth date on every row of a patient);
- every indication label of the default mapping appears as soon as n >= 9 (the first rows
  cycle through them), and every optional column is sometimes empty, sometimes filled;
- prior treatments and adverse events are `;`-lists of 0..3 known labels;
- scores come as name + baseline and/or follow-up value; recurrence is yes / no / empty;
- improvement is an integer or a one-decimal number in 0..100 (sometimes negative), or empty.

Nothing here is real: ids are `G000001`-style case ids and `GP00001`-style patient ids.
Written independently of the code under test (only the label lists mirror the mapping file).
"""
from __future__ import annotations

import csv
import io
import random
from datetime import date, timedelta

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


def _patient(rng: random.Random, number: int) -> tuple[str, str, str]:
    """(patient_id, sex, birth_date) for a new patient; birth date sometimes only a year."""
    sex = rng.choice(("F", "F", "F", "M", "M", "other", "unknown"))
    born = date(1930, 1, 1) + timedelta(days=rng.randrange(0, 365 * 85))
    birth = "" if rng.random() < 0.05 else (str(born.year) if rng.random() < 0.1 else born.isoformat())
    return f"GP{number:05d}", sex, birth


def generate_rows(n: int, seed: int = 1) -> list[dict[str, str]]:
    """`n` valid case rows as dicts of the canonical columns (all values strings)."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    patients: list[tuple[str, str, str]] = []
    for i in range(n):
        if patients and rng.random() < 0.3:  # another course for an earlier patient
            patient_id, sex, birth = rng.choice(patients)
        else:
            patient_id, sex, birth = _patient(rng, len(patients) + 1)
            patients.append((patient_id, sex, birth))
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
        rows.append({
            "case_id": f"G{i + 1:06d}",
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
        })
    return rows


def rows_to_csv(rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in COLUMNS})
    return buf.getvalue()


def generate_cases(n: int, seed: int = 1) -> str:
    """CSV text (header + `n` rows, UTF-8-safe ASCII, comma, `\\n`) of synthetic valid cases."""
    return rows_to_csv(generate_rows(n, seed))


if __name__ == "__main__":  # python tests/cohort_gen.py 1500 > cases.csv
    import sys

    sys.stdout.write(generate_cases(int(sys.argv[1]) if len(sys.argv) > 1 else 100,
                                    int(sys.argv[2]) if len(sys.argv) > 2 else 1))
