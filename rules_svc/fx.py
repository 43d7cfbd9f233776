"""Amounts between the currencies of a program, through its base currency, floored.

The points engine (thresholds, line minimums) and gamification (a challenge's minimum total)
compare a basket with an amount written in another currency; both convert the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction

from pointmesh.currencies import scale
from rules_svc.program import Program


def rates_of(program: Program) -> tuple[str, dict[str, Fraction]]:
    """The base currency and the units of each other currency per unit of the base."""
    if program.fx is None:
        return "", {}
    return program.fx.base_currency, {r.currency: Fraction(r.per_base) for r in program.fx.rates}


def convert_minor(amount_minor: int, currency: str, to: str, base: str, rates: Mapping[str, Fraction]) -> int | None:
    """`amount_minor` of `currency` in minor units of `to`, floored; None when the program has
    no rate to get there (e.g. JPY earning at its own base rate)."""
    if currency == to:
        return amount_minor
    in_base = amount_minor
    if currency != base:
        rate = rates.get(currency)
        if rate is None:
            return None
        in_base = amount_minor * scale(base) * rate.denominator // (scale(currency) * rate.numerator)
    if to == base:
        return in_base
    rate = rates.get(to)
    if rate is None:
        return None
    return in_base * scale(to) * rate.numerator // (scale(base) * rate.denominator)
