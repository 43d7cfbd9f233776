"""A compound multiplier ranked after a guarded rule (a member cap, or a purchase number) pays
only on what the member is sure to get: base points and earlier components carrying no guard.

The ledger applies guards against its own counters and purchase count in the write that posts
the earn (pointmesh/guards.py), after the quote; a compound multiplier priced on a guarded
component would pay on points the ledger took away. `ledger_grants` does what
ledger_svc.purchases.accrue does with a quote. One line of 100.00 EUR: 100 base points.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from pointmesh.guards import apply_guards
from rules_svc.domain import Basket, Evaluation, Line, MemberContext
from tests.rules import compile_doc, program_doc

WEDNESDAY_NOON = datetime(2026, 1, 7, 12, 0, tzinfo=UTC)
BOOST_TODAY = "boost:day:2026-01-07"
BASKET = Basket("pos", "HEL-01", "r-1", "EUR", 10_000, (Line("sku-0", "misc", 1, 10_000),), WEDNESDAY_NOON)


def boost(caps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": "boost", "priority": 10, "effect": {"multiplier": "5"}, "caps": caps, **extra}


GOLD = {"id": "gold", "priority": 20, "effect": {"multiplier": "2", "compound": True}}


def points_of(evaluation: Evaluation) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in evaluation.components:
        out[part.rule_id] = out.get(part.rule_id, 0) + part.points
    return out


def ledger_grants(evaluation: Evaluation, counters: dict[str, int], ordinal: int = 1) -> dict[str, int]:
    """What the ledger posts for this quote: every component cut by its guard, in order."""
    granted, _ = apply_guards([(p.guard, p.points) for p in evaluation.components], counters, ordinal)
    out: dict[str, int] = {}
    for part, grant in zip(evaluation.components, granted, strict=True):
        out[part.rule_id] = out.get(part.rule_id, 0) + grant.points
    return out


def test_a_compound_multiplier_does_not_pay_on_points_a_spent_day_cap_took_away() -> None:
    engine = compile_doc(program_doc(boost({"per_member_per_day": 100}), GOLD))

    preview = engine.evaluate(BASKET, MemberContext("m-1", counters={BOOST_TODAY: 100}))
    quote = engine.evaluate(BASKET, MemberContext("m-1"))

    # boost is cut to 0 by the spent cap; gold doubles what the member gets, 100 + 0: +100.
    assert points_of(preview) == {"base": 100, "boost": 0, "gold": 100}
    assert [p.detail for p in preview.components if p.rule_id == "gold"] == ["x2 on 100 points"]
    assert preview.totals() == {"points": 200}
    assert ledger_grants(quote, {BOOST_TODAY: 100}) == points_of(preview)
    assert sum(ledger_grants(quote, {BOOST_TODAY: 100}).values()) == 200


@pytest.mark.parametrize(("used", "boost_granted"), [(0, 100), (40, 60), (99, 1), (100, 0)])
def test_preview_and_ledger_agree_and_explain_every_point_whatever_the_cap_has_left(
    used: int, boost_granted: int
) -> None:
    engine = compile_doc(program_doc(boost({"per_member_per_day": 100}), GOLD))

    preview = engine.evaluate(BASKET, MemberContext("m-1", counters={BOOST_TODAY: used}))
    quote = engine.evaluate(BASKET, MemberContext("m-1"))

    expected = {"base": 100, "boost": boost_granted, "gold": 100}
    assert points_of(preview) == expected
    assert ledger_grants(quote, {BOOST_TODAY: used}) == expected
    assert sum(p.points for p in preview.components) == preview.totals()["points"] == 200 + boost_granted


def test_the_quote_before_member_caps_does_not_compound_a_member_capped_rule() -> None:
    engine = compile_doc(program_doc(boost({"per_member_per_day": 100}), GOLD))

    quote = engine.evaluate(BASKET, MemberContext("m-1"))

    # boost asks for 400 before its cap; gold, which carries no guard, doubles the base alone.
    assert points_of(quote) == {"base": 100, "boost": 400, "gold": 100}
    assert [p.guard is None for p in quote.components if p.rule_id == "gold"] == [True]


def test_a_campaign_cap_is_not_compounded_either() -> None:
    campaign = {"date_range": {"start": "2026-01-01T00:00:00", "end": "2026-02-01T00:00:00"}}
    engine = compile_doc(program_doc(boost({"per_member_per_campaign": 100}, when=campaign), GOLD))
    counter = "boost:campaign:2026-01-01T00:00:00"

    preview = engine.evaluate(BASKET, MemberContext("m-1", counters={counter: 100}))
    quote = engine.evaluate(BASKET, MemberContext("m-1"))

    assert points_of(preview) == {"base": 100, "boost": 0, "gold": 100}
    assert ledger_grants(quote, {counter: 100}) == points_of(preview)


def test_a_member_capped_per_item_bonus_is_not_compounded() -> None:
    stamps = {"id": "stamps", "priority": 10, "effect": {"bonus_points_per_item": 50},
              "caps": {"per_member_per_day": 50}}  # fmt: skip
    engine = compile_doc(program_doc(stamps, GOLD))

    preview = engine.evaluate(BASKET, MemberContext("m-1", counters={"stamps:day:2026-01-07": 50}))

    assert points_of(preview) == {"base": 100, "stamps": 0, "gold": 100}


def test_a_first_purchase_rule_is_not_compounded_as_the_ledger_may_find_another_purchase_number() -> None:
    # Two purchases quoted at once are both quoted as the first; the ledger's write finds the
    # second is purchase 2 and grants `first` nothing. gold must not have doubled it.
    first = {"id": "first", "priority": 10, "when": {"purchase_number": {"equals": 1}}, "effect": {"multiplier": "3"}}
    engine = compile_doc(program_doc(first, GOLD))

    quote = engine.evaluate(BASKET, MemberContext("m-1", purchase_count=0))

    assert points_of(quote) == {"base": 100, "first": 200, "gold": 100}
    assert ledger_grants(quote, {}, ordinal=1) == {"base": 100, "first": 200, "gold": 100}
    assert ledger_grants(quote, {}, ordinal=2) == {"base": 100, "first": 0, "gold": 100}


def test_per_receipt_and_per_line_caps_are_compounded_as_capped() -> None:
    # The engine applies these itself, so what they leave is known when gold is priced.
    receipt = {"id": "boost", "priority": 10, "effect": {"multiplier": "5"}, "caps": {"per_receipt": 100}}
    line = {"id": "extra", "priority": 15, "effect": {"multiplier": "3"}, "caps": {"per_line": 50}}
    engine = compile_doc(program_doc(receipt, line, GOLD))

    quote = engine.evaluate(BASKET, MemberContext("m-1"))

    # Running total before gold: 100 base + 100 boost (of 400) + 50 extra (of 200) = 250.
    assert points_of(quote) == {"base": 100, "boost": 100, "extra": 50, "gold": 250}
    assert ledger_grants(quote, {}) == points_of(quote)


def test_a_compound_rule_ranked_before_the_capped_one_is_unchanged() -> None:
    early_gold = {**GOLD, "priority": 5}
    engine = compile_doc(program_doc(boost({"per_member_per_day": 100}), early_gold))

    preview = engine.evaluate(BASKET, MemberContext("m-1", counters={BOOST_TODAY: 0}))

    assert points_of(preview) == {"base": 100, "gold": 100, "boost": 100}
    assert preview.totals() == {"points": 300}
