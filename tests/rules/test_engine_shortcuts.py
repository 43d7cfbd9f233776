"""What the engine works out once and reuses (the rules a basket's lines could satisfy, a
basket's reached thresholds, base explanations per line amount) gives the same answer as
working it out every time."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from rules_svc import engine
from rules_svc.domain import Basket, Line, MemberContext
from tests.rules import compile_doc, program_doc

NOON = datetime(2026, 1, 7, 12, 0, tzinfo=UTC)
NOBODY = MemberContext(member_id="m-1")


def basket(*lines: Line, currency: str = "EUR") -> Basket:
    return Basket("pos", "HEL-01", "r-1", currency, sum(ln.amount_minor for ln in lines), lines, NOON)


def test_a_rule_on_skus_and_categories_needs_both_on_one_line_not_one_each_on_two_lines() -> None:
    compiled = compile_doc(
        program_doc(
            {"id": "x", "when": {"skus": ["s1"], "categories": ["shoes"]}, "effect": {"bonus_points_per_item": 7}}
        )
    )
    apart = compiled.evaluate(basket(Line("s1", "socks", 1, 1000), Line("s2", "shoes", 1, 1000)), NOBODY)
    together = compiled.evaluate(basket(Line("s2", "socks", 1, 1000), Line("s1", "shoes", 3, 1000)), NOBODY)

    assert [p.rule_id for p in apart.components] == ["base", "base"]
    assert [(p.rule_id, p.line, p.points) for p in together.components if p.rule_id == "x"] == [("x", 1, 21)]


def test_a_best_of_contender_no_line_can_satisfy_is_not_priced_and_the_group_still_pays_its_best() -> None:
    compiled = compile_doc(
        program_doc(
            {
                "id": "shoes",
                "priority": 1,
                "group": "g",
                "when": {"categories": ["shoes"]},
                "effect": {"bonus_points": 50},
            },
            {"id": "any", "priority": 2, "group": "g", "effect": {"bonus_points": 5}},
            groups=[{"id": "g", "mode": "best_of"}],
        )
    )
    without = compiled.evaluate(basket(Line("s1", "socks", 1, 1000)), NOBODY)
    with_shoes = compiled.evaluate(basket(Line("s1", "socks", 1, 1000), Line("s2", "shoes", 1, 1000)), NOBODY)

    assert [p.rule_id for p in without.components if p.rule_id != "base"] == ["any"]
    assert without.excluded == ()
    assert [p.rule_id for p in with_shoes.components if p.rule_id != "base"] == ["shoes"]
    assert [e.rule_id for e in with_shoes.excluded] == ["any"]


def test_rules_sharing_a_basket_threshold_each_carry_it_in_the_basket_currency() -> None:
    at_least = {"basket_total_at_least": {"currency": "EUR", "amount_minor": 5000}}
    compiled = compile_doc(
        program_doc(
            {"id": "a", "when": at_least, "effect": {"bonus_points": 10}},
            {"id": "b", "when": at_least, "effect": {"bonus_points": 20}},
            fx={"base_currency": "EUR", "rates": [{"currency": "SEK", "per_base": "11.45"}]},
        )
    )
    reached = compiled.evaluate(basket(Line("s1", "misc", 1, 57250), currency="SEK"), NOBODY)
    short = compiled.evaluate(basket(Line("s1", "misc", 1, 57249), currency="SEK"), NOBODY)

    assert [(p.rule_id, p.points, p.threshold_minor) for p in reached.components if p.rule_id != "base"] == [
        ("a", 10, 57250),
        ("b", 20, 57250),
    ]
    assert [p.rule_id for p in short.components] == ["base"]


@pytest.mark.parametrize("cache_size", [1, 50_000])
def test_base_explanations_name_each_lines_own_amount_however_full_the_cache(
    monkeypatch: pytest.MonkeyPatch, cache_size: int
) -> None:
    monkeypatch.setattr(engine, "_BASE_TEXT_CACHE_MAX", cache_size)
    compiled = compile_doc(program_doc(policy={"rounding": "half_up"}))
    amounts = [(1000, 250, 1000), (250, 1000, 99), (99, 99, 1250)]
    for line_amounts in amounts:
        got = compiled.evaluate(basket(*(Line(f"s{i}", "misc", 1, a) for i, a in enumerate(line_amounts))), NOBODY)
        assert [(p.line, p.points, p.detail) for p in got.components] == [
            (i, (a + 50) // 100, f"1 points per 1.00 EUR on {a // 100}.{a % 100:02d} EUR")
            for i, a in enumerate(line_amounts)
        ]
