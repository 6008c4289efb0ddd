"""Unit and property tests for the response rule (ruxo_fhir.outcomes_rule)."""
from __future__ import annotations

import csv
import math
from collections import Counter
from datetime import date, datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ruxo_fhir.outcomes_rule import (
    CATEGORIES,
    RULE_VERSION,
    classify,
    clopper_pearson,
    improvement_fraction,
    improvement_from_scores,
    months_between,
    response_rate,
    to_decimal,
)

try:  # only the cross-check against scipy needs it; the core tests never skip
    from scipy import stats as scipy_stats
except ImportError:  # pragma: no cover - scipy is in the dev environment
    scipy_stats = None

needs_scipy = pytest.mark.skipif(scipy_stats is None, reason="scipy not installed")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cases.csv"


def test_rule_version_is_a_versioned_string() -> None:
    assert RULE_VERSION == "ruxo-response-1.0"
    assert CATEGORIES == ("complete", "partial", "none", "not_evaluable")


# --- classify: every boundary --------------------------------------------------------------


@pytest.mark.parametrize(
    ("improvement", "expected"),
    [
        (Decimal("39.99"), "none"),
        (Decimal("40"), "partial"),
        (Decimal("40.00"), "partial"),
        (Decimal("80"), "partial"),
        (Decimal("80.00"), "partial"),
        (Decimal("80.01"), "complete"),
        (Decimal("100"), "complete"),
        (Decimal("-10"), "none"),
        (Decimal("0"), "none"),
        (Decimal("-100"), "none"),
        (None, "not_evaluable"),
        (Fraction(80) + Fraction(1, 10**40), "complete"),
        (Fraction(40) - Fraction(1, 10**40), "none"),
        (Fraction(40), "partial"),
        (Fraction(80), "partial"),
        (40, "partial"),
        (80, "partial"),
        (81, "complete"),
        (39.99, "none"),
        (40.0, "partial"),
        (80.0, "partial"),
        (80.01, "complete"),
    ],
)
def test_classify_boundaries(improvement: Any, expected: str) -> None:
    assert classify(improvement) == expected


@pytest.mark.parametrize("bad", [Decimal("NaN"), Decimal("Infinity"), float("nan"), float("-inf")])
def test_classify_rejects_non_finite(bad: Any) -> None:
    with pytest.raises(ValueError):
        classify(bad)


@pytest.mark.parametrize("bad", [True, "85", [85]])
def test_classify_rejects_non_numbers(bad: Any) -> None:
    with pytest.raises(TypeError):
        classify(bad)


# --- improvement from a score pair ---------------------------------------------------------


def test_score_ratio_hits_40_exactly() -> None:
    value = improvement_from_scores(Decimal("8.1"), Decimal("4.86"))
    assert value == Decimal("40")
    assert str(value) == "40"
    assert classify(value) == "partial"
    assert improvement_fraction(Decimal("8.1"), Decimal("4.86")) == Fraction(40)
    # the float computation would have said 39.99999999999999 -> "none"
    assert (8.1 - 4.86) / 8.1 * 100 < 40


def test_score_ratio_hits_80_exactly() -> None:
    value = improvement_from_scores(Decimal("8.1"), Decimal("1.62"))
    assert value == Decimal("80")
    assert classify(value) == "partial"


def test_float_scores_are_taken_at_their_decimal_repr() -> None:
    assert improvement_from_scores(8.1, 4.86) == Decimal("40")


@pytest.mark.parametrize(
    ("baseline", "followup", "expected"),
    [
        (Decimal("20"), Decimal("3"), Decimal("85")),  # the example cohort's CLASI case
        (Decimal("25"), Decimal("12"), Decimal("52")),  # the example cohort's CDASI case
        (Decimal("10"), Decimal("10"), Decimal("0")),
        (Decimal("10"), Decimal("0"), Decimal("100")),
        (Decimal("10"), Decimal("11"), Decimal("-10")),
        (Decimal("10"), Decimal("25"), Decimal("-150")),  # worsening beyond -100 still classifies
        (Decimal("2"), Decimal("0.29"), Decimal("85.5")),
    ],
)
def test_improvement_from_scores(baseline: Decimal, followup: Decimal, expected: Decimal) -> None:
    assert improvement_from_scores(baseline, followup) == expected


def test_zero_baseline_is_not_evaluable() -> None:
    assert improvement_from_scores(Decimal("0"), Decimal("3")) is None
    assert improvement_from_scores(Decimal("0"), Decimal("0")) is None
    assert improvement_fraction(Decimal("0.0"), Decimal("1")) is None
    assert classify(improvement_from_scores(Decimal("0"), Decimal("3"))) == "not_evaluable"


def test_higher_is_better_inverts_the_sign() -> None:
    assert improvement_from_scores(Decimal("10"), Decimal("15"), higher_is_better=True) == Decimal("50")
    assert improvement_from_scores(Decimal("10"), Decimal("5"), higher_is_better=True) == Decimal("-50")
    assert improvement_from_scores(Decimal("10"), Decimal("5")) == Decimal("50")
    assert improvement_from_scores(Decimal("5"), Decimal("9"), higher_is_better=True) == Decimal("80")
    assert classify(improvement_from_scores(Decimal("5"), Decimal("9"), higher_is_better=True)) == "partial"
    assert improvement_from_scores(Decimal("0"), Decimal("9"), higher_is_better=True) is None


@pytest.mark.parametrize(("baseline", "followup"), [(Decimal("-1"), Decimal("1")), (Decimal("5"), Decimal("-1"))])
def test_negative_scores_are_rejected(baseline: Decimal, followup: Decimal) -> None:
    with pytest.raises(ValueError, match="negative"):
        improvement_from_scores(baseline, followup)


def test_non_terminating_ratio_is_a_decimal_in_the_right_category() -> None:
    value = improvement_from_scores(Decimal("3"), Decimal("1"))
    assert isinstance(value, Decimal)
    assert abs(value - Decimal(200) / Decimal(3)) < Decimal("1e-25")
    assert classify(value) == "partial"


def test_decimal_never_rounds_onto_a_threshold() -> None:
    # written out, since Decimal arithmetic would itself round to 28 digits
    below_0_6 = Decimal("0.5" + "9" * 39)  # 0.6 - 1e-40
    above_1_8 = Decimal("1.8" + "0" * 38 + "1")  # 1.8 + 1e-40
    # 100 * (3 - (0.6 - 1e-40)) / 3 = 80 + 1e-38/3: complete, although 28 digits would show 80
    just_above_80 = improvement_from_scores(Decimal("3"), below_0_6)
    assert just_above_80 is not None and just_above_80 > 80
    assert classify(just_above_80) == "complete"
    # 100 * (3 - (1.8 + 1e-40)) / 3 = 40 - 1e-38/3: none, although 28 digits would show 40
    just_below_40 = improvement_from_scores(Decimal("3"), above_1_8)
    assert just_below_40 is not None and just_below_40 < 40
    assert classify(just_below_40) == "none"


decimals = st.decimals(min_value=0, max_value=1000, places=3, allow_nan=False, allow_infinity=False)


@given(baseline=decimals, followup=decimals, higher_is_better=st.booleans())
def test_decimal_result_classifies_like_the_exact_fraction(
    baseline: Decimal, followup: Decimal, higher_is_better: bool
) -> None:
    exact = improvement_fraction(baseline, followup, higher_is_better)
    value = improvement_from_scores(baseline, followup, higher_is_better)
    if exact is None:
        assert value is None and baseline == 0
        return
    assert value is not None
    assert classify(value) == classify(exact)
    assert abs(Fraction(value) - exact) <= abs(exact) * Fraction(1, 10**25)


@given(numerator=st.integers(-(10**12), 10**12), twos=st.integers(0, 30), fives=st.integers(0, 30))
def test_to_decimal_is_exact_for_terminating_fractions(numerator: int, twos: int, fives: int) -> None:
    q = Fraction(numerator, 2**twos * 5**fives)
    assert Fraction(to_decimal(q)) == q


# --- months between two dates --------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "months"),
    [
        (date(2024, 5, 1), date(2024, 6, 1), 1.0),  # 31 days
        (date(2024, 5, 1), date(2024, 5, 31), 1.0),  # 30 days
        (date(2024, 5, 1), date(2024, 5, 1), 0.0),
        (date(2024, 5, 1), date(2024, 6, 15), 1.5),  # 45 days = 1.478
        (date(2024, 5, 21), date(2024, 9, 20), 4.0),  # 122 days
        (date(2024, 11, 28), date(2025, 1, 28), 2.0),  # across a year end, 61 days
        (date(2024, 1, 1), date(2025, 1, 1), 12.0),  # 366 days = 12.02
        (date(2023, 1, 1), date(2024, 1, 1), 12.0),  # 365 days = 11.99
        (date(2024, 6, 1), date(2024, 5, 1), -1.0),  # evaluation before start: negative
    ],
)
def test_months_between(start: date, end: date, months: float) -> None:
    result = months_between(start, end)
    assert isinstance(result, float)
    assert result == months


def test_months_between_uses_the_date_of_datetimes() -> None:
    assert months_between(datetime(2024, 5, 1, 23, 59), datetime(2024, 6, 1, 0, 1)) == 1.0


@given(days=st.integers(-20000, 20000))
def test_months_between_is_days_over_30_4375(days: int) -> None:
    start = date(2000, 1, 1)
    end = date.fromordinal(start.toordinal() + days)
    assert months_between(start, end) == round(days / 30.4375, 1)


# --- response rate and Clopper-Pearson -----------------------------------------------------


def test_response_rate() -> None:
    assert response_rate(6, 5, 12) == pytest.approx(11 / 12)
    assert response_rate(0, 0, 3) == 0.0
    assert response_rate(2, 1, 3) == 1.0
    assert response_rate(0, 0, 0) is None


@pytest.mark.parametrize(("complete", "partial", "evaluable"), [(6, 5, 10), (-1, 0, 3), (0, 0, -1)])
def test_response_rate_rejects_impossible_counts(complete: int, partial: int, evaluable: int) -> None:
    with pytest.raises(ValueError):
        response_rate(complete, partial, evaluable)


@pytest.mark.parametrize(
    ("k", "n", "lower", "upper"),
    [
        (11, 12, 0.6152, 0.9979),
        (0, 10, 0.0, 0.3085),
        (10, 10, 0.6915, 1.0),
        (5, 10, 0.1871, 0.8129),
        (0, 1, 0.0, 0.975),
        (1, 1, 0.025, 1.0),
        (6, 12, 0.2109, 0.7891),
    ],
)
def test_clopper_pearson_known_values(k: int, n: int, lower: float, upper: float) -> None:
    lo, hi = clopper_pearson(k, n)
    assert (round(lo, 4), round(hi, 4)) == (lower, upper)


def test_clopper_pearson_exact_ends() -> None:
    assert clopper_pearson(0, 7)[0] == 0.0
    assert clopper_pearson(7, 7)[1] == 1.0


def test_clopper_pearson_other_confidence() -> None:
    lo90, hi90 = clopper_pearson(11, 12, confidence=0.90)
    lo99, hi99 = clopper_pearson(11, 12, confidence=0.99)
    lo95, hi95 = clopper_pearson(11, 12)
    assert lo99 < lo95 < lo90 < 11 / 12 < hi90 < hi95 < hi99


@pytest.mark.parametrize(
    ("k", "n", "confidence"),
    [(0, 0, 0.95), (1, 0, 0.95), (-1, 5, 0.95), (6, 5, 0.95), (1, 5, 0.0), (1, 5, 1.0), (1, 5, float("nan"))],
)
def test_clopper_pearson_rejects_bad_input(k: int, n: int, confidence: float) -> None:
    with pytest.raises(ValueError):
        clopper_pearson(k, n, confidence)


def _binomial_tail_ge(k: int, n: int, p: Fraction) -> Fraction:
    """P(X >= k) for X ~ Binomial(n, p), exactly."""
    return sum((math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)), Fraction(0))


@pytest.mark.parametrize(("k", "n"), [(1, 2), (11, 12), (5, 10), (1, 50), (49, 50), (37, 200), (100, 200)])
def test_clopper_pearson_bounds_solve_the_binomial_tails_exactly(k: int, n: int) -> None:
    """Independent of scipy: at the bounds each binomial tail equals alpha/2 = 0.025."""
    lo, hi = clopper_pearson(k, n)
    assert float(_binomial_tail_ge(k, n, Fraction(lo))) == pytest.approx(0.025, rel=1e-9)
    assert float(1 - _binomial_tail_ge(k + 1, n, Fraction(hi))) == pytest.approx(0.025, rel=1e-9)


@needs_scipy
@settings(deadline=None, max_examples=300)
@given(
    data=st.integers(1, 200).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))),
    confidence=st.sampled_from([0.8, 0.9, 0.95, 0.99]),
)
def test_clopper_pearson_matches_scipy(data: tuple[int, int], confidence: float) -> None:
    k, n = data
    tail = (1 - confidence) / 2
    lo, hi = clopper_pearson(k, n, confidence)
    expected_lo = 0.0 if k == 0 else float(scipy_stats.beta.ppf(tail, k, n - k + 1))
    expected_hi = 1.0 if k == n else float(scipy_stats.beta.ppf(1 - tail, k + 1, n - k))
    assert abs(lo - expected_lo) < 1e-6
    assert abs(hi - expected_hi) < 1e-6
    assert 0.0 <= lo <= k / n <= hi <= 1.0


@needs_scipy
@pytest.mark.parametrize(("k", "n"), [(5_000, 10_000), (3, 100_000), (99_990, 100_000), (500_000, 1_000_000)])
def test_clopper_pearson_large_n_matches_scipy(k: int, n: int) -> None:
    lo, hi = clopper_pearson(k, n)
    assert abs(lo - float(scipy_stats.beta.ppf(0.025, k, n - k + 1))) < 1e-9
    assert abs(hi - float(scipy_stats.beta.ppf(0.975, k + 1, n - k))) < 1e-9


# --- the bundled example cohort under the rule ---------------------------------------------


def test_example_cohort_gives_the_seed_results() -> None:
    with EXAMPLE.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    categories = Counter(classify(Decimal(r["improvement_pct"])) for r in rows)
    assert categories == Counter(complete=6, partial=5, none=1)
    for r in rows:  # a score pair, when present, gives the same value as improvement_pct
        if r["score_name"]:
            assert improvement_from_scores(Decimal(r["baseline_score"]), Decimal(r["followup_score"])) == Decimal(
                r["improvement_pct"]
            )
    months = [
        months_between(date.fromisoformat(r["treatment_start"]), date.fromisoformat(r["evaluation_date"]))
        for r in rows
    ]
    assert sorted(months) == [1.0] * 4 + [2.0] * 2 + [3.0] * 2 + [4.0] * 4
    assert sum(months) / len(months) == 2.5
    rate = response_rate(categories["complete"], categories["partial"], len(rows))
    assert rate is not None and round(rate, 4) == 0.9167
    lo, hi = clopper_pearson(categories["complete"] + categories["partial"], len(rows))
    assert (round(lo, 3), round(hi, 3)) == (0.615, 0.998)
