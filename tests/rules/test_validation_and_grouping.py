"""Best-of groups decided where their first-ranked member stands, basket-level rules refusing a
per-line cap, redemption values per currency, units without a base rate, names that
must not end in a newline, and a published version that reads back exactly as it was published.

Baskets are two EUR lines of 10.00 and 25.00 (base 10 + 25 = 35 points) unless a test says so.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from rules_svc.domain import Basket, Evaluation, Line, MemberContext
from rules_svc.engine import CompiledProgram
from rules_svc.program import ProgramInvalid, validate_program
from rules_svc.service import _parse
from tests.rules import compile_doc, load_doc, program_doc

WEDNESDAY_NOON = datetime(2026, 1, 7, 12, 0, tzinfo=UTC)
NOBODY = MemberContext(member_id="m-1")


def basket(*amounts_minor: int, category: str = "misc") -> Basket:
    amounts = amounts_minor or (1000, 2500)
    lines = tuple(Line(f"sku-{i}", category, 1, a) for i, a in enumerate(amounts))
    return Basket("pos", "HEL-01", "r-1", "EUR", sum(amounts), lines, WEDNESDAY_NOON)


def order(evaluation: Evaluation) -> list[tuple[str, int]]:
    """(rule id, points) per rule in the order the rules were applied (base lines merged)."""
    out: list[tuple[str, int]] = []
    for part in evaluation.components:
        if out and out[-1][0] == part.rule_id:
            out[-1] = (part.rule_id, out[-1][1] + part.points)
        else:
            out.append((part.rule_id, part.points))
    return out


def errors_of(doc: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ProgramInvalid) as refused:
        load_doc(doc)
    return refused.value.errors


# Best-of groups: decided at the position of the first-ranked member ------------------------------

NEVER_APPLIES = {
    "categories": {"categories": ["no-such-category"]},
    "skus": {"skus": ["no-such-sku"]},
    "line_amount_at_least": {"line_amount_at_least": {"currency": "EUR", "amount_minor": 100_000}},
}


@pytest.mark.parametrize("failing", sorted(NEVER_APPLIES))
def test_best_of_group_is_decided_at_its_first_members_position_whatever_condition_that_member_fails(
    failing: str,
) -> None:
    engine = compile_doc(
        program_doc(
            {"id": "a", "priority": 10, "group": "g", "when": NEVER_APPLIES[failing], "effect": {"multiplier": "3"}},
            {"id": "c-plain", "priority": 20, "effect": {"multiplier": "2"}},
            {"id": "b-comp", "priority": 30, "group": "g", "effect": {"multiplier": "2", "compound": True}},
            groups=[{"id": "g", "mode": "best_of"}],
        )
    )

    evaluation = engine.evaluate(basket(), NOBODY)

    # The group g stands at priority 10 (a's place): b-comp doubles the running totals as they
    # are there, base only: 10 + 25 = 35. c-plain then doubles the base: another 35.
    assert order(evaluation) == [("base", 35), ("b-comp", 35), ("c-plain", 35)]
    assert evaluation.totals() == {"points": 105}
    assert evaluation.excluded == ()


def test_a_best_of_group_whose_members_all_fail_on_line_conditions_pays_nothing() -> None:
    engine = compile_doc(
        program_doc(
            {"id": "a", "priority": 10, "group": "g", "when": {"categories": ["x"]}, "effect": {"multiplier": "3"}},
            {"id": "b", "priority": 20, "group": "g", "when": {"skus": ["y"]}, "effect": {"bonus_points": 5}},
            {"id": "plain", "priority": 30, "effect": {"multiplier": "2"}},
            groups=[{"id": "g", "mode": "best_of"}],
        )
    )

    evaluation = engine.evaluate(basket(), NOBODY)

    assert order(evaluation) == [("base", 35), ("plain", 35)]
    assert evaluation.excluded == ()


def test_a_best_of_contender_skipped_on_categories_still_wins_where_its_category_is_in_the_basket() -> None:
    engine = compile_doc(
        program_doc(
            {"id": "a", "priority": 10, "group": "g", "when": {"categories": ["socks"]}, "effect": {"multiplier": "3"}},
            {"id": "b", "priority": 20, "group": "g", "effect": {"multiplier": "2"}},
            groups=[{"id": "g", "mode": "best_of"}],
        )
    )

    socks = engine.evaluate(basket(category="socks"), NOBODY)
    misc = engine.evaluate(basket(category="misc"), NOBODY)

    # Socks: a triples (adds 20 + 50 = 70), b doubles (adds 35); misc: only b applies.
    assert order(socks) == [("base", 35), ("a", 70)]
    assert [e.rule_id for e in socks.excluded] == ["b"]
    assert order(misc) == [("base", 35), ("b", 35)]
    assert misc.excluded == ()


# caps.per_line on basket-level rules --------------------------------------------------------------


@pytest.mark.parametrize(
    "effect", [{"multiplier": "2", "per": "basket"}, {"bonus_points": 50}], ids=["basket-multiplier", "bonus"]
)
def test_a_per_line_cap_on_a_basket_level_rule_is_refused_at_its_path(effect: dict[str, Any]) -> None:
    doc = program_doc(
        {"id": "ok", "effect": {"multiplier": "2"}},
        {"id": "also-ok", "effect": {"bonus_points_per_item": 5}, "caps": {"per_line": 10}},
        {"id": "basket-level", "effect": effect, "caps": {"per_line": 10}},
    )

    errors = errors_of(doc)

    assert [path for path, _ in errors] == ["rules[2].caps.per_line"]
    assert "basket" in errors[0][1]


@pytest.mark.parametrize(
    "effect", [{"multiplier": "2"}, {"multiplier": "2", "compound": True}, {"bonus_points_per_item": 5}]
)
def test_a_per_line_cap_on_a_line_level_rule_is_still_accepted(effect: dict[str, Any]) -> None:
    program = load_doc(program_doc({"id": "r", "effect": effect, "caps": {"per_line": 10, "per_receipt": 15}}))

    assert program.rules[0].caps.per_line == 10


def test_a_per_receipt_cap_on_a_basket_level_rule_is_still_accepted() -> None:
    program = load_doc(program_doc({"id": "r", "effect": {"bonus_points": 50}, "caps": {"per_receipt": 10}}))

    assert program.rules[0].caps.per_receipt == 10


# Redemption values: one per currency -------------------------------------------------------------


def test_two_redemption_values_for_one_currency_are_refused_at_the_second() -> None:
    doc = program_doc(
        redemption={
            "values": [
                {"currency": "EUR", "points": 100, "amount_minor": 100},
                {"currency": "SEK", "points": 100, "amount_minor": 1000},
                {"currency": "EUR", "points": 100, "amount_minor": 200},
            ]
        }
    )

    errors = errors_of(doc)

    assert errors == [("redemption.values[2]", "'EUR' is listed twice")]


def test_redemption_values_in_different_currencies_are_accepted() -> None:
    doc = program_doc(
        redemption={
            "values": [
                {"currency": "EUR", "points": 100, "amount_minor": 100},
                {"currency": "SEK", "points": 100, "amount_minor": 1000},
            ]
        }
    )

    program = load_doc(doc)

    assert program.redemption is not None
    assert [v.currency for v in program.redemption.values] == ["EUR", "SEK"]


# Units the earn currency has no base rate for ----------------------------------------------------


@pytest.mark.parametrize("effect", [{"bonus_points": 1}, {"bonus_points_per_item": 1}])
def test_a_bonus_pays_in_its_unit_even_where_no_currency_earns_that_unit_by_base_rate(
    effect: dict[str, Any],
) -> None:
    """A unit earned only by bonuses (a stamp per visit) is a program a retailer runs: a fixed
    bonus does not depend on a base rate, unlike a multiplier."""
    engine = compile_doc(program_doc({"id": "stamp", "unit": "stamps", "effect": effect}, units=["points", "stamps"]))

    evaluation = engine.evaluate(basket(), NOBODY)

    assert evaluation.totals() == {"points": 35, "stamps": 1 if "bonus_points" in effect else 2}


def test_a_multiplier_of_a_unit_the_earn_currency_has_no_base_rate_for_does_not_apply() -> None:
    engine = compile_doc(program_doc({"id": "stamps-x2", "unit": "stamps", "effect": {"multiplier": "2"}},
                                     units=["points", "stamps"]))  # fmt: skip

    evaluation = engine.evaluate(basket(), NOBODY)

    assert order(evaluation) == [("base", 35)]


def test_a_bonus_in_a_unit_with_a_base_rate_still_applies() -> None:
    engine = compile_doc(
        program_doc(
            {"id": "credits", "unit": "tier_credits", "effect": {"bonus_points": 50}},
            units=["points", "tier_credits"],
            base_rates=[
                {"currency": "EUR", "unit": "points", "points": 1, "per_minor": 100},
                {"currency": "EUR", "unit": "tier_credits", "points": 1, "per_minor": 100},
            ],
        )
    )

    evaluation = engine.evaluate(basket(), NOBODY)

    assert evaluation.totals() == {"points": 35, "tier_credits": 35 + 50}


# Names, times and decimals: a trailing newline is not part of a valid value ------------------------


@pytest.mark.parametrize(
    ("top", "path"),
    [
        ({"channels": ["pos\n", "app"]}, "channels[0]"),
        ({"program": "test\n"}, "program"),
        ({"rules": [{"id": "r", "when": {"time_window": {"start": "18:00\n", "end": "20:00"}}, "effect": {"multiplier": "2"}}]},
         "rules[0].when.time_window.start"),
        ({"rules": [{"id": "r", "effect": {"multiplier": "2\n"}}]}, "rules[0].effect.multiplier"),
        ({"fx": {"base_currency": "EUR", "rates": [{"currency": "SEK", "per_base": "11.45\n"}]}},
         "fx.rates[0].per_base"),
    ],
    ids=["channel", "program", "time", "multiplier", "fx-rate"],
)  # fmt: skip
def test_a_value_with_a_trailing_newline_is_refused_at_its_path(top: dict[str, Any], path: str) -> None:
    errors = errors_of(program_doc(**top))

    assert [p for p, _ in errors] == [path]


def test_the_same_values_without_the_newline_are_accepted() -> None:
    program = load_doc(
        program_doc(
            {"id": "r", "when": {"time_window": {"start": "18:00", "end": "20:00"}}, "effect": {"multiplier": "2"}},
            fx={"base_currency": "EUR", "rates": [{"currency": "SEK", "per_base": "11.45"}]},
        )
    )

    assert program.channels == ["pos", "app"]


def test_a_version_published_before_these_checks_still_loads_and_serves() -> None:
    """The two checks above refuse new documents only: a stored version read back (a live
    program published under the looser checks) keeps serving, with the meaning it had."""
    doc = program_doc(
        {"id": "basket-level", "effect": {"bonus_points": 50}, "caps": {"per_line": 10}},
        redemption={"values": [{"currency": "EUR", "points": 100, "amount_minor": 100},
                               {"currency": "EUR", "points": 100, "amount_minor": 200}]},
    )  # fmt: skip
    with pytest.raises(ProgramInvalid):
        validate_program(doc)

    program = validate_program(doc, stored=True)

    assert program.rules[0].caps.per_line == 10
    assert program.redemption is not None
    assert [v.amount_minor for v in program.redemption.values] == [100, 200]


def test_a_stored_version_with_a_final_newline_in_a_value_still_loads_as_it_was_served() -> None:
    doc = program_doc({"id": "double", "effect": {"multiplier": "2\n"}})
    with pytest.raises(ProgramInvalid):
        validate_program(doc)

    program = validate_program(doc, stored=True)

    assert program.rules[0].effect.multiplier == "2"


# Attribute values and free text: what publish accepts, every replica reads back the same ---------


def published_and_read_back(doc: dict[str, Any]) -> tuple[CompiledProgram, CompiledProgram]:
    """The program the publishing leader caches, and the one a restart or a follower builds from
    the stored document."""
    leader, canonical, _sha = _parse(yaml.safe_dump(doc, sort_keys=False), "yaml")
    return leader, CompiledProgram(validate_program(json.loads(canonical), stored=True), 1)


def gold_club(value: str) -> dict[str, Any]:
    return {"id": "vip", "when": {"attributes": {"club": value}}, "effect": {"bonus_points": 500}}


@pytest.mark.parametrize(
    "value", ["gold\n", "gold\r\n", "go\tld", "gold\x1b[0m", "gold\u2028"],
    ids=["final-newline", "crlf", "tab", "escape", "line-separator"],
)  # fmt: skip
def test_an_attribute_value_with_a_line_break_or_control_character_is_refused_at_its_path(value: str) -> None:
    """`club: |` in YAML gives "gold\\n": the leader paid it as written while a reload read "gold"."""
    errors = errors_of(program_doc(gold_club(value)))

    assert [p for p, _ in errors] == ["rules[0].when.attributes.club"]


def test_a_one_line_name_with_a_line_break_is_refused_at_its_path() -> None:
    doc = program_doc({"id": "r", "name": "Double points\n", "effect": {"multiplier": "2"}})

    assert [p for p, _ in errors_of(doc)] == ["rules[0].name"]


def test_a_published_version_reads_back_exactly_as_the_leader_holds_it() -> None:
    """Free text may span lines (a description): reading back keeps its final newline, and the
    member attribute pays on the leader's copy and the reloaded one alike."""
    doc = program_doc(gold_club("gold"), description="Aurora loyalty.\nTerms at aurora.example.\n")

    leader, reloaded = published_and_read_back(doc)

    assert reloaded.program == leader.program
    gold = MemberContext("m-1", attributes={"club": "gold"})
    # 10.00 EUR at 1 point per euro is 10 base points, and the gold club's bonus adds 500.
    assert leader.evaluate(basket(1000), gold).totals() == {"points": 510}
    assert reloaded.evaluate(basket(1000), gold).totals() == {"points": 510}


def test_a_stored_version_with_a_final_newline_in_an_attribute_value_still_loads_and_matches_without_it() -> None:
    """Stored before publishing refused it: read as every reload has read it since 2026-12-05."""
    program = validate_program(program_doc(gold_club("gold\n")), stored=True)

    evaluation = CompiledProgram(program, 1).evaluate(basket(1000), MemberContext("m-1", attributes={"club": "gold"}))

    assert evaluation.totals() == {"points": 510}


def test_a_stored_version_keeps_a_name_with_a_line_break_as_it_was_published() -> None:
    doc = program_doc({"id": "r", "name": "Double points\n", "effect": {"multiplier": "2"}})

    assert validate_program(doc, stored=True).rules[0].name == "Double points\n"
