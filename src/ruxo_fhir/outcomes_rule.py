"""The response rule as pure math: improvement %, remission category, months, exact binomial CI.

No I/O, no FHIR, stdlib only. Everything the outcomes report computes per case or per cohort
comes from these few functions, so the rule lives (and is versioned) in one place.

The rule, version ``ruxo-response-1.0`` (:data:`RULE_VERSION`):

- improvement % from a severity score pair = (baseline − follow-up) / baseline × 100, or
  (follow-up − baseline) / baseline × 100 when higher scores are better; a baseline of 0
  makes the case not evaluable. Computed exactly (:class:`fractions.Fraction`), so baseline
  8.1 and follow-up 4.86 give exactly 40.
- category: ``complete`` if improvement > 80; ``partial`` if 40 ≤ improvement ≤ 80; ``none`` if
  improvement < 40 (worsening, a negative value, is ``none``); ``not_evaluable`` without a value.
  Always classified on the exact value, never on a rounded display value.
- months to evaluation = days between treatment start and evaluation / 30.4375 (= 365.25 / 12),
  rounded to 1 decimal.
- response rate = (complete + partial) / evaluable, with an exact Clopper–Pearson interval.

Choosing which Observation counts (the improvement value first, else a score pair; the latest
evaluation of a case) is the caller's job (``outcomes``), but it is part of the same rule
version: any change to a threshold, an inclusive bound, the score formula, the month length or
that selection order needs a new :data:`RULE_VERSION`.
"""
from __future__ import annotations

import math
import operator
from datetime import date, datetime
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Final, Literal

RULE_VERSION: Final[str] = "ruxo-response-1.0"
"""Identifies the rule above. Written into every derived resource (method/note of a response
Observation) and into the ``rule_version`` key of the outcomes JSON; bump it (``-1.1``,
``-2.0``) whenever a change could move any case to another category or change a number."""

Category = Literal["complete", "partial", "none", "not_evaluable"]
COMPLETE: Final = "complete"
PARTIAL: Final = "partial"
NONE: Final = "none"
NOT_EVALUABLE: Final = "not_evaluable"
CATEGORIES: Final[tuple[Category, ...]] = (COMPLETE, PARTIAL, NONE, NOT_EVALUABLE)
"""All categories, in the order reports list them."""

COMPLETE_ABOVE: Final = Fraction(80)
"""Complete remission: improvement strictly above this (seed: "plus de 80 %")."""
PARTIAL_FROM: Final = Fraction(40)
"""Partial remission: improvement from this up to and including COMPLETE_ABOVE ("entre 40 et 80 %")."""
DAYS_PER_MONTH: Final = Fraction(487, 16)
"""30.4375 days: the mean Gregorian month (365.25 / 12), exactly."""

Number = Decimal | Fraction | int | float
"""A numeric input. Decimals, Fractions and ints are taken exactly; a float is taken at its
shortest decimal representation (``repr``), i.e. 8.1 means exactly 81/10."""


def _exact(value: Number, what: str) -> Fraction:
    """Return ``value`` as an exact Fraction; reject bools, NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, (Decimal, Fraction, int, float)):
        raise TypeError(f"{what} must be a Decimal, Fraction, int or float, not {type(value).__name__}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{what} must be a finite number, got {value!r}")
        return Fraction(Decimal(repr(value)))
    if isinstance(value, Decimal) and not value.is_finite():
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return Fraction(value)


def improvement_fraction(
    baseline: Number, followup: Number, higher_is_better: bool = False
) -> Fraction | None:
    """Exact % improvement from a severity score pair, as a Fraction.

    ``(baseline − followup) / baseline × 100``; with ``higher_is_better`` (a score where a higher
    value means less disease) the sign is inverted: ``(followup − baseline) / baseline × 100``.
    Returns ``None`` (not evaluable) when the baseline is 0. The result may lie outside
    −100..100 (a score that more than doubles gives less than −100): it is still classifiable.

    Raises ValueError for a negative or non-finite score: severity scores are ≥ 0, and a
    negative one is a data error the caller should report, not a response.

    >>> improvement_fraction(Decimal("8.1"), Decimal("4.86"))
    Fraction(40, 1)
    """
    base = _exact(baseline, "baseline score")
    follow = _exact(followup, "follow-up score")
    if base < 0 or follow < 0:
        raise ValueError("severity scores must not be negative")
    if base == 0:
        return None
    change = follow - base if higher_is_better else base - follow
    return change / base * 100


def _terminating_decimal(q: Fraction) -> Decimal | None:
    """``q`` as an exact Decimal when its decimal expansion terminates, else None."""
    den = q.denominator
    twos = fives = 0
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    if den != 1:
        return None
    k = max(twos, fives)
    # built from a string: exact at any length (scaleb would round to the context's 28 digits)
    return Decimal(f"{q.numerator * 10**k // q.denominator}E-{k}")


def to_decimal(q: Fraction) -> Decimal:
    """Convert an exact improvement to a Decimal that classifies exactly as ``q`` does.

    Exact when ``q`` has a finite decimal expansion (e.g. 40, 85.5, 52). Otherwise (e.g. 200/3)
    rounded to at least 28 significant digits, and to more when needed so that the result lies
    strictly on the same side of 40 and of 80 as ``q`` (a non-terminating value is never equal
    to a threshold), hence ``classify(to_decimal(q)) == classify(q)`` always.
    """
    exact = _terminating_decimal(q)
    if exact is not None:
        return exact
    prec = 28
    while True:
        with localcontext() as ctx:
            ctx.prec = prec
            approx = Decimal(q.numerator) / Decimal(q.denominator)
        as_fraction = Fraction(approx)
        if all(
            (as_fraction > t) == (q > t) and as_fraction != t for t in (PARTIAL_FROM, COMPLETE_ABOVE)
        ):
            return approx
        prec *= 2


def improvement_from_scores(
    baseline: Number, followup: Number, higher_is_better: bool = False
) -> Decimal | None:
    """% improvement from a severity score pair, as a Decimal; ``None`` when baseline is 0.

    Computed exactly with :func:`improvement_fraction`, then converted by :func:`to_decimal`:
    the Decimal is exact whenever the quotient has a finite decimal expansion (so 8.1 → 4.86
    gives ``Decimal('40')``, 20 → 3 gives ``Decimal('85')``); otherwise it carries ≥ 28
    significant digits and is guaranteed to fall in the same category as the exact value.
    Use :func:`improvement_fraction` when you need the exact rational itself.

    >>> improvement_from_scores(Decimal("8.1"), Decimal("4.86"))
    Decimal('40')
    >>> improvement_from_scores(Decimal("10"), Decimal("15"), higher_is_better=True)
    Decimal('50')
    """
    q = improvement_fraction(baseline, followup, higher_is_better)
    return None if q is None else to_decimal(q)


def classify(improvement: Number | None) -> Category:
    """Remission category of an improvement %, compared exactly (no rounding, no float error).

    ``complete`` if > 80; ``partial`` if 40 ≤ x ≤ 80; ``none`` if < 40 (negative included);
    ``not_evaluable`` if ``None``. Raises ValueError for NaN or an infinity.

    >>> [classify(Decimal(x)) for x in ("39.99", "40", "80", "80.01")]
    ['none', 'partial', 'partial', 'complete']
    """
    if improvement is None:
        return NOT_EVALUABLE
    x = _exact(improvement, "improvement")
    if x > COMPLETE_ABOVE:
        return COMPLETE
    if x >= PARTIAL_FROM:
        return PARTIAL
    return NONE


def months_between(start: date, end: date) -> float:
    """Months from ``start`` to ``end``: days / 30.4375, rounded to 1 decimal.

    Datetimes are reduced to their date. The rounding is done on the exact quotient; a tie
    (x.x5) cannot occur, since days × 16 / 487 is never an odd multiple of 1/20. An ``end``
    before ``start`` gives a negative number: the caller reports it as a data-quality problem.

    >>> months_between(date(2024, 5, 1), date(2024, 6, 1))
    1.0
    """
    if isinstance(start, datetime):
        start = start.date()
    if isinstance(end, datetime):
        end = end.date()
    days = (end - start).days
    return float(round(Fraction(days) / DAYS_PER_MONTH, 1))


def response_rate(complete: int, partial: int, evaluable: int) -> float | None:
    """(complete + partial) / evaluable, unrounded; ``None`` when no case is evaluable.

    Raises ValueError for negative counts or more responders than evaluable cases.
    """
    complete, partial, evaluable = (operator.index(v) for v in (complete, partial, evaluable))
    if min(complete, partial, evaluable) < 0:
        raise ValueError("counts must not be negative")
    if complete + partial > evaluable:
        raise ValueError(
            f"complete + partial ({complete + partial}) exceeds evaluable cases ({evaluable})"
        )
    if evaluable == 0:
        return None
    return (complete + partial) / evaluable


# --- exact binomial (Clopper–Pearson) interval ---------------------------------------------
#
# The bounds are beta quantiles: lower = B⁻¹(α/2; k, n−k+1), upper = B⁻¹(1−α/2; k+1, n−k).
# The beta CDF (regularized incomplete beta I_x(a, b)) is evaluated with the continued
# fraction of Numerical Recipes §6.4 (modified Lentz), its prefactor from log(1/B(a, b))
# (exact integer arithmetic for moderate a + b, see _EXACT_COMB_LIMIT), and the quantile by
# bisection on x down to adjacent doubles. Tests check it against exact binomial tail sums
# and scipy.stats.beta.ppf.


_EXACT_COMB_LIMIT: Final = 10_000
"""Up to this a + b, 1/B(a, b) is computed as an exact integer (fast there: a few ms); above,
with lgamma, whose cancellation error (~1e-11 at 1e4, ~1e-10 at 1e5) is still far below what
moves a bound, while math.comb would take seconds."""


def _log_inv_beta(a: int, b: int) -> float:
    """log(1 / B(a, b)) for positive integers: log((a+b−1)·C(a+b−2, a−1))."""
    if a + b <= _EXACT_COMB_LIMIT:
        return math.log(math.comb(a + b - 2, a - 1)) + math.log(a + b - 1)
    return math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for I_x(a, b) (Numerical Recipes `betacf`, modified Lentz)."""
    tiny = 1e-300
    eps = 4e-16  # within 2 ulps of 1: converged to double precision
    max_iter = 1000 + 10 * int(math.sqrt(max(a, b)))
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) >= tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) >= tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) >= tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) >= tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) >= tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _betainc(a: int, b: int, x: float, log_inv_beta: float) -> float:
    """Regularized incomplete beta I_x(a, b) for positive integers a, b."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(log_inv_beta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _beta_ppf(p: float, a: int, b: int) -> float:
    """Quantile of Beta(a, b) for positive integers: the x with I_x(a, b) = p, by bisection."""
    log_inv_beta = _log_inv_beta(a, b)
    lo, hi = 0.0, 1.0
    for _ in range(1100):  # enough to reach adjacent doubles anywhere in [0, 1]
        mid = (lo + hi) / 2.0
        if mid <= lo or mid >= hi:
            break
        if _betainc(a, b, mid, log_inv_beta) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided confidence interval for a binomial proportion k / n.

    Returns ``(lower, upper)`` as unrounded floats, within a few 1e-12 of the exact bounds;
    the lower bound is 0 when k = 0 and the upper bound 1 when k = n. Raises ValueError when
    n < 1, k is outside 0..n, or confidence is not strictly between 0 and 1.

    >>> [round(v, 4) for v in clopper_pearson(11, 12)]
    [0.6152, 0.9979]
    """
    k, n = operator.index(k), operator.index(n)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be between 0 and n ({n}), got {k}")
    if not 0.0 < confidence < 1.0:  # also rejects NaN
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")
    tail = (1.0 - confidence) / 2.0
    # I_x(n, 1) = x**n and I_x(1, n) = 1 − (1 − x)**n: closed forms for the k = n and k = 0 ends.
    if k == 0:
        lower = 0.0
    elif k == n:
        lower = tail ** (1.0 / n)
    else:
        lower = _beta_ppf(tail, k, n - k + 1)
    if k == n:
        upper = 1.0
    elif k == 0:
        upper = 1.0 - tail ** (1.0 / n)
    else:
        upper = _beta_ppf(1.0 - tail, k + 1, n - k)
    return lower, upper
