"""Offer choice is integer arithmetic on the churn probability floored to basis points."""

from __future__ import annotations

import pytest

from fraud_svc.offers import CatalogueOffer, choose

BONUS = CatalogueOffer("bonus-500", "500 bonus points", 500, 25, min_churn_percent=60)


@pytest.mark.parametrize(
    ("probability", "offered"), [(0.5951, False), (0.59999, False), (0.6, True), (0.61, True), (0.57, False)]
)
def test_a_minimum_churn_risk_is_not_reached_by_rounding(probability: float, offered: bool) -> None:
    chosen = choose((BONUS,), probability, "regular", spend_90d_minor=2_000_000)  # 80,000 points a year

    assert [c.offer.offer_id for c in chosen] == (["bonus-500"] if offered else [])


def test_expected_value_and_explanation_use_basis_points() -> None:
    (chosen,) = choose((BONUS,), 0.6543, "regular", spend_90d_minor=2_000_000)

    # 80,000 x 65.43% x 25% = 13,086 points kept, less the 500 given.
    assert chosen.expected_value_points == 13_086 - 500
    assert chosen.explanation.startswith("churn risk 65.43%, yearly value 80000 points")


def test_a_probability_written_exactly_at_the_minimum_reaches_it() -> None:
    at_57 = CatalogueOffer("at-57", "57%", 100, 25, min_churn_percent=57)

    assert [c.offer.offer_id for c in choose((at_57,), 0.57, "regular", spend_90d_minor=2_000_000)] == ["at-57"]
