"""Retention offers: which offer from the catalogue is worth making to a member at risk.

Expected value in points = churn probability x the offer's uplift (share of at-risk members it
keeps) x the member's yearly value in points - the offer's bonus cost. Offers whose value is not
positive, or whose segment or churn band does not fit the member, are not made. Values are
integer points; the probability only ranks and scales, it never moves points itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from fraud_svc.domain import BadRequest


@dataclass(frozen=True, slots=True)
class CatalogueOffer:
    offer_id: str
    title: str
    bonus_points: int
    # Share of would-be churners this offer keeps, in percent.
    uplift_percent: int
    min_churn_percent: int = 0
    segments: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ChosenOffer:
    offer: CatalogueOffer
    expected_value_points: int
    explanation: str


DEFAULT_CATALOGUE = (
    CatalogueOffer("double-next-visit", "Double points on your next visit", 150, 12, 40),
    CatalogueOffer("bonus-500", "500 bonus points on a purchase this month", 500, 25, 60),
    CatalogueOffer("student-coffee", "A free coffee for students", 80, 15, 30, ("student",)),
    CatalogueOffer("thank-you-50", "50 thank-you points", 50, 3, 20),
)


def catalogue_of(items: object) -> tuple[CatalogueOffer, ...]:
    """A parsed catalogue document (a list of offers) -> offers, or BadRequest naming the bad
    field (`[2].bonus_points`): an operator's file is refused whole, never half read."""
    if not isinstance(items, list) or not items:
        raise BadRequest("the catalogue is a non-empty list of offers", field="catalogue")
    offers, seen = [], set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequest("an offer is a mapping", field=f"[{i}]")
        unknown = set(item) - _OFFER_FIELDS
        if unknown:
            # YAML 1.1 reads `on:` as the key True: sort by repr, as keys of mixed types do not compare.
            raise BadRequest(f"unknown fields {sorted(unknown, key=repr)}", field=f"[{i}]")
        offer_id, title = _text(item, "offer_id", i), _text(item, "title", i)
        if offer_id in seen:
            raise BadRequest(f"offer {offer_id!r} is listed twice", field=f"[{i}].offer_id")
        seen.add(offer_id)
        segments = item.get("segments", [])
        if not isinstance(segments, list) or not all(isinstance(s, str) and s for s in segments):
            raise BadRequest("a list of segment names", field=f"[{i}].segments")
        offers.append(CatalogueOffer(
            offer_id, title, _whole(item, "bonus_points", i, 0, 1_000_000), _whole(item, "uplift_percent", i, 0, 100),
            _whole(item, "min_churn_percent", i, 0, 100, default=0), tuple(segments),
        ))  # fmt: skip
    return tuple(offers)


_OFFER_FIELDS = {"offer_id", "title", "bonus_points", "uplift_percent", "min_churn_percent", "segments"}


def _text(item: dict[str, object], name: str, i: int) -> str:
    value = item.get(name)
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise BadRequest("1..200 characters required", field=f"[{i}].{name}")
    return value


def _whole(item: dict[str, object], name: str, i: int, low: int, high: int, default: int | None = None) -> int:
    value = item.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"a whole number from {low} to {high}", field=f"[{i}].{name}")
    return value


def yearly_value_points(spend_90d_minor: int) -> int:
    """What keeping the member is worth: a year of their spend at the base earn rate (1 point per
    100 minor units), as the program's own yardstick of value."""
    return spend_90d_minor * 4 // 100


def choose(
    catalogue: tuple[CatalogueOffer, ...], churn_probability: float, segment: str, spend_90d_minor: int, limit: int = 3
) -> list[ChosenOffer]:
    # The model's probability becomes whole basis points (floored) once, here: from then on the
    # choice is integer arithmetic, and 59.51% does not pass a 60% minimum by rounding.
    churn_bp = int(Decimal(repr(churn_probability)) * 10_000)  # 0.57 is 5700, not 5699.99...
    value = yearly_value_points(spend_90d_minor)
    chosen = []
    for offer in catalogue:
        if churn_bp < offer.min_churn_percent * 100 or (offer.segments and segment not in offer.segments):
            continue
        kept = value * churn_bp * offer.uplift_percent // 1_000_000
        ev = kept - offer.bonus_points
        if ev <= 0:
            continue
        why = (f"churn risk {churn_bp // 100}.{churn_bp % 100:02d}%, yearly value {value} points, keeps {offer.uplift_percent}% of "
               f"would-be churners: expected {kept} points kept for {offer.bonus_points} given")  # fmt: skip
        chosen.append(ChosenOffer(offer, ev, why))
    chosen.sort(key=lambda c: (-c.expected_value_points, c.offer.offer_id))
    return chosen[:limit]
