"""Experiment results per arm against the control arm, with confidence intervals and tests.

Per member of an arm (a member counts once they made a purchase while assigned): purchases
and points. Reported per arm: members, purchases per member (mean, 95% t interval), repeat-
purchase rate (share with two or more purchases, Wilson interval), points per member; against
control: the repeat-rate lift with a 95% normal interval and a two-proportion z-test, a Welch
t-test on purchases per member, and the points cost per incremental purchase. An arm is called
significant when the repeat-rate test's p-value is below ALPHA (0.05, two-sided). These are
statistics, not value: floats are fine here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats

ALPHA = 0.05
Z = 1.959963984540054  # two-sided 95%


@dataclass(frozen=True, slots=True)
class ArmResult:
    arm: str
    members: int
    purchases_per_member: float
    purchases_ci: tuple[float, float]
    repeat_rate: float
    repeat_ci: tuple[float, float]
    points_per_member: float
    # Against control (zeros for the control arm itself).
    repeat_lift: float = 0.0
    lift_ci: tuple[float, float] = (0.0, 0.0)
    p_repeat: float = 1.0
    p_purchases: float = 1.0
    points_per_incremental_purchase: float | None = None
    significant: bool = False


def _mean_ci(values: Sequence[int]) -> tuple[float, tuple[float, float]]:
    n = len(values)
    if n == 0:
        return 0.0, (0.0, 0.0)
    mean = sum(values) / n
    if n < 2:
        return mean, (mean, mean)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return mean, (mean - half, mean + half)


def _wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson interval of the rate k/n. In exact arithmetic it lies within [0, 1] and reaches 0
    when k == 0 and 1 when k == n; in floats centre -/+ half lands a hair outside (1.0000000000000002,
    -1.4e-17), which a report must not show as a rate, so the ends are clamped and pinned."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    denom = 1 + Z * Z / n
    centre = (p + Z * Z / (2 * n)) / denom
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def _two_proportions(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test."""
    if not n1 or not n2:
        return 1.0
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = (k1 / n1 - k2 / n2) / se
    return float(2 * stats.norm.sf(abs(z)))


def report(members: Mapping[str, Sequence[tuple[int, int]]], control: str) -> list[ArmResult]:
    """`members[arm]` holds (purchases, points) per member; the control arm is compared with each other arm."""
    base = members.get(control, ())
    base_purchases = [p for p, _ in base]
    base_repeat = sum(1 for p in base_purchases if p >= 2)
    base_points = sum(pts for _, pts in base) / len(base) if base else 0.0
    base_mean = sum(base_purchases) / len(base) if base else 0.0
    out = []
    for arm in sorted(members, key=lambda a: (a != control, a)):
        rows = members[arm]
        n = len(rows)
        purchases = [p for p, _ in rows]
        repeat = sum(1 for p in purchases if p >= 2)
        mean, ci = _mean_ci(purchases)
        rate = repeat / n if n else 0.0
        points = sum(pts for _, pts in rows) / n if n else 0.0
        result = ArmResult(arm, n, mean, ci, rate, _wilson(repeat, n), points)
        if arm != control and n and base:
            base_rate = base_repeat / len(base)
            lift = rate - base_rate
            se = math.sqrt(rate * (1 - rate) / n + base_rate * (1 - base_rate) / len(base))
            p_repeat = _two_proportions(repeat, n, base_repeat, len(base))
            welch = stats.ttest_ind(purchases, base_purchases, equal_var=False) if n > 1 and len(base) > 1 else None
            p_purchases = float(welch.pvalue) if welch is not None and not math.isnan(welch.pvalue) else 1.0
            extra = mean - base_mean
            result = ArmResult(
                arm, n, mean, ci, rate, _wilson(repeat, n), points, lift, (lift - Z * se, lift + Z * se), p_repeat,
                p_purchases, (points - base_points) / extra if extra > 0 else None, p_repeat < ALPHA,
            )  # fmt: skip
        out.append(result)
    return out
