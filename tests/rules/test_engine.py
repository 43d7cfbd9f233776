"""The points engine, in process: each test builds a small program and hand-computes the points.

Baskets default to two EUR lines of 10.00 and 25.00, i.e. base 10 + 25 = 35 points at the
test program's 1 point per euro. `explain()` returns the points per rule id, so every test
pins the explanation as well as the totals.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest

from pointmesh.guards import Guard
from rules_svc.domain import BadRequest, Basket, Evaluation, Excluded, Line, MemberContext
from rules_svc.engine import CompiledProgram
from rules_svc.program import validate_program
from tests.rules import compile_doc, program_doc

WEDNESDAY_NOON = datetime(2026, 1, 7, 12, 0, tzinfo=UTC)
SATURDAY_NOON = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
NOBODY = MemberContext(member_id="m-1")


def basket(
    *amounts_minor: int,
    currency: str = "EUR",
    store: str = "HEL-01",
    channel: str = "pos",
    at: datetime = WEDNESDAY_NOON,
    category: str = "misc",
    quantity: int = 1,
) -> Basket:
    amounts = amounts_minor or (1000, 2500)
    lines = tuple(Line(f"sku-{i}", category, quantity, a) for i, a in enumerate(amounts))
    return Basket(channel, store, "r-1", currency, sum(amounts), lines, at)


def explain(evaluation: Evaluation) -> dict[str, int]:
    """Points per rule id, after checking the components add up to the totals per unit."""
    per_unit: dict[str, int] = {}
    per_rule: dict[str, int] = {}
    for part in evaluation.components:
        assert part.points >= 0
        assert -1 <= part.line < len(evaluation.earn_amounts_minor)
        per_unit[part.unit] = per_unit.get(part.unit, 0) + part.points
        per_rule[part.rule_id] = per_rule.get(part.rule_id, 0) + part.points
    assert per_unit == evaluation.totals()
    return per_rule


def points(evaluation: Evaluation) -> int:
    explain(evaluation)
    return evaluation.totals().get("points", 0)


def rule(rule_id: str, effect: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"id": rule_id, "effect": effect, **fields}


def double(rule_id: str = "double", **fields: Any) -> dict[str, Any]:
    return rule(rule_id, {"multiplier": "2"}, **fields)


# Time of day, day of week, time zones -----------------------------------------------------


def test_weekend_double_points_on_a_store_local_saturday_and_not_on_a_wednesday() -> None:
    engine = compile_doc(program_doc(double("weekend", when={"days_of_week": ["sat", "sun"]})))

    saturday = engine.evaluate(basket(at=SATURDAY_NOON), NOBODY)
    wednesday = engine.evaluate(basket(at=WEDNESDAY_NOON), NOBODY)

    # Saturday: base 10 + 25 = 35, doubling adds 10 + 25 = 35 -> 70.
    assert explain(saturday) == {"base": 35, "weekend": 35}
    assert saturday.totals() == {"points": 70}
    assert explain(wednesday) == {"base": 35}
    assert wednesday.totals() == {"points": 35}


def test_weekend_is_the_store_local_day_not_the_utc_day() -> None:
    engine = compile_doc(program_doc(double("weekend", when={"days_of_week": ["sat", "sun"]})))
    friday_2230_utc = datetime(2026, 1, 9, 22, 30, tzinfo=UTC)

    helsinki = engine.evaluate(basket(store="HEL-01", at=friday_2230_utc), NOBODY)  # Sat 00:30 EET
    lisbon = engine.evaluate(basket(store="LIS-01", at=friday_2230_utc), NOBODY)  # Fri 22:30 WET

    assert explain(helsinki) == {"base": 35, "weekend": 35}
    assert helsinki.totals() == {"points": 70}
    assert explain(lisbon) == {"base": 35}
    assert lisbon.totals() == {"points": 35}


HAPPY_HOUR = double("happy-hour", when={"channels": ["pos"], "time_window": {"start": "18:00", "end": "20:00"}})


def test_happy_hour_applies_at_1830_in_helsinki_but_not_at_1630_in_lisbon_for_the_same_instant() -> None:
    engine = compile_doc(program_doc(HAPPY_HOUR))
    winter_1630_utc = datetime(2026, 1, 7, 16, 30, tzinfo=UTC)

    helsinki = engine.evaluate(basket(1000, store="HEL-01", at=winter_1630_utc), NOBODY)
    lisbon = engine.evaluate(basket(1000, store="LIS-01", at=winter_1630_utc), NOBODY)

    assert helsinki.local_time.strftime("%H:%M%z") == "18:30+0200"
    assert lisbon.local_time.strftime("%H:%M%z") == "16:30+0000"
    # One 10.00 line: base 10, happy hour doubles it in Helsinki only.
    assert explain(helsinki) == {"base": 10, "happy-hour": 10}
    assert helsinki.totals() == {"points": 20}
    assert explain(lisbon) == {"base": 10}
    assert lisbon.totals() == {"points": 10}


@pytest.mark.parametrize(
    ("store", "at", "local", "expected_points"),
    [
        # Saturday 2026-03-28, still winter time: Helsinki UTC+2, Lisbon UTC+0.
        ("HEL-01", datetime(2026, 3, 28, 15, 30, tzinfo=UTC), "17:30+0200", 10),
        ("LIS-01", datetime(2026, 3, 28, 17, 30, tzinfo=UTC), "17:30+0000", 10),
        # Sunday 2026-03-29, after the 01:00Z switch: Helsinki UTC+3, Lisbon UTC+1.
        ("HEL-01", datetime(2026, 3, 29, 15, 30, tzinfo=UTC), "18:30+0300", 20),
        ("LIS-01", datetime(2026, 3, 29, 15, 30, tzinfo=UTC), "16:30+0100", 10),
        ("LIS-01", datetime(2026, 3, 29, 17, 30, tzinfo=UTC), "18:30+0100", 20),
    ],
)
def test_happy_hour_follows_the_dst_switch_of_each_store(
    store: str, at: datetime, local: str, expected_points: int
) -> None:
    engine = compile_doc(program_doc(HAPPY_HOUR))

    evaluation = engine.evaluate(basket(1000, store=store, at=at), NOBODY)

    assert evaluation.local_time.strftime("%H:%M%z") == local
    assert explain(evaluation) == ({"base": 10, "happy-hour": 10} if expected_points == 20 else {"base": 10})
    assert evaluation.totals() == {"points": expected_points}


def test_time_window_end_is_exclusive_and_a_window_may_wrap_past_midnight() -> None:
    late = double("late", when={"time_window": {"start": "22:00", "end": "02:00"}})
    engine = compile_doc(program_doc(HAPPY_HOUR, late))
    # Helsinki in January is UTC+2.
    at_2000 = engine.evaluate(basket(1000, at=datetime(2026, 1, 7, 18, 0, tzinfo=UTC)), NOBODY)
    at_2330 = engine.evaluate(basket(1000, at=datetime(2026, 1, 7, 21, 30, tzinfo=UTC)), NOBODY)
    at_0130 = engine.evaluate(basket(1000, at=datetime(2026, 1, 7, 23, 30, tzinfo=UTC)), NOBODY)
    at_0200 = engine.evaluate(basket(1000, at=datetime(2026, 1, 8, 0, 0, tzinfo=UTC)), NOBODY)

    assert explain(at_2000) == {"base": 10}
    assert explain(at_2330) == {"base": 10, "late": 10}
    assert explain(at_0130) == {"base": 10, "late": 10}
    assert explain(at_0200) == {"base": 10}
    assert [e.totals()["points"] for e in (at_2000, at_2330, at_0130, at_0200)] == [10, 20, 20, 10]


def test_a_night_window_on_named_days_belongs_to_the_day_it_opened() -> None:
    """ "Friday night 22:00-02:00": Saturday 01:00 is part of Friday's night, Friday 01:00 is not
    (that was Thursday's)."""
    friday_night = double(
        "friday-night", when={"days_of_week": ["fri"], "time_window": {"start": "22:00", "end": "02:00"}}
    )
    engine = compile_doc(program_doc(HAPPY_HOUR, friday_night))
    # Helsinki in January is UTC+2; 2026-01-09 is a Friday.
    local = {
        "fri 01:00": datetime(2026, 1, 8, 23, 0, tzinfo=UTC),
        "fri 23:00": datetime(2026, 1, 9, 21, 0, tzinfo=UTC),
        "sat 01:00": datetime(2026, 1, 9, 23, 0, tzinfo=UTC),
        "sat 23:00": datetime(2026, 1, 10, 21, 0, tzinfo=UTC),
    }
    got = {name: "friday-night" in explain(engine.evaluate(basket(1000, at=at), NOBODY)) for name, at in local.items()}
    assert got == {"fri 01:00": False, "fri 23:00": True, "sat 01:00": True, "sat 23:00": False}


# Stacking and exclusivity --------------------------------------------------------------------


def best_of_program(triple_cap: int) -> dict[str, Any]:
    return program_doc(
        double("double", group="promo", priority=10),
        rule("triple", {"multiplier": "3"}, group="promo", priority=20, caps={"per_receipt": triple_cap}),
        groups=[{"id": "promo", "mode": "best_of"}],
    )


def test_best_of_group_pays_the_rule_that_pays_more_and_lists_the_other_as_excluded() -> None:
    engine = compile_doc(best_of_program(triple_cap=50))

    evaluation = engine.evaluate(basket(), NOBODY)

    # double adds 10 + 25 = 35; triple adds 20 + 50 = 70, capped per receipt to 20 + 30 = 50.
    assert explain(evaluation) == {"base": 35, "triple": 50}
    assert evaluation.totals() == {"points": 85}
    assert evaluation.excluded == (Excluded("double", "group promo is best-of; triple pays more"),)


def test_best_of_group_compares_what_each_rule_pays_after_its_caps() -> None:
    engine = compile_doc(best_of_program(triple_cap=30))

    evaluation = engine.evaluate(basket(), NOBODY)

    # triple is capped to 30 < double's 35, so double wins.
    assert explain(evaluation) == {"base": 35, "double": 35}
    assert evaluation.totals() == {"points": 70}
    assert evaluation.excluded == (Excluded("triple", "group promo is best-of; double pays more"),)


def test_a_compound_contender_is_priced_on_the_running_total_even_when_a_plain_rule_opens_the_group() -> None:
    engine = compile_doc(
        program_doc(
            rule("silver", {"multiplier": "1.25"}, priority=10),
            double("plain", group="promo", priority=20),
            rule("compound", {"multiplier": "2", "compound": True}, group="promo", priority=30),
            groups=[{"id": "promo", "mode": "best_of"}],
        )
    )

    evaluation = engine.evaluate(basket(), NOBODY)

    # silver adds floor(2.5) + floor(6.25) = 2 + 6 = 8, so the running totals are 12 and 31.
    # plain doubles the base: 10 + 25 = 35; compound doubles the running totals: 12 + 31 = 43.
    assert explain(evaluation) == {"base": 35, "silver": 8, "compound": 43}
    assert evaluation.excluded == (Excluded("plain", "group promo is best-of; compound pays more"),)


def test_a_best_of_tie_says_the_winner_ranks_first_not_that_it_pays_more() -> None:
    engine = compile_doc(
        program_doc(
            double("first", group="promo", priority=10),
            double("second", group="promo", priority=20),
            groups=[{"id": "promo", "mode": "best_of"}],
        )
    )

    evaluation = engine.evaluate(basket(), NOBODY)

    assert explain(evaluation) == {"base": 35, "first": 35}
    assert evaluation.excluded == (Excluded("second", "group promo is best-of; first pays the same and ranks first"),)


def test_rules_outside_groups_and_in_additive_groups_all_apply() -> None:
    engine = compile_doc(
        program_doc(
            double("double"),
            rule("bonus", {"bonus_points": 100}),
            rule("stack-a", {"bonus_points": 7}, group="stack"),
            rule("stack-b", {"bonus_points": 3}, group="stack"),
            groups=[{"id": "stack", "mode": "additive"}],
        )
    )

    evaluation = engine.evaluate(basket(), NOBODY)

    # 35 base + 35 doubling + 100 + 7 + 3.
    assert explain(evaluation) == {"base": 35, "double": 35, "bonus": 100, "stack-a": 7, "stack-b": 3}
    assert evaluation.totals() == {"points": 180}
    assert evaluation.excluded == ()


def test_compound_multiplier_multiplies_the_running_total_and_plain_one_the_base() -> None:
    plain = compile_doc(program_doc(double(priority=10), rule("boost", {"multiplier": "1.5"}, priority=20)))
    compound = compile_doc(
        program_doc(double(priority=10), rule("boost", {"multiplier": "1.5", "compound": True}, priority=20))
    )

    plain_eval = plain.evaluate(basket(), NOBODY)
    compound_eval = compound.evaluate(basket(), NOBODY)

    # plain: boost adds floor(10 * 0.5) + floor(25 * 0.5) = 5 + 12 = 17 -> 35 + 35 + 17 = 87.
    assert explain(plain_eval) == {"base": 35, "double": 35, "boost": 17}
    assert plain_eval.totals() == {"points": 87}
    # compound: running totals after double are 20 and 50, so boost adds 10 + 25 = 35 -> 105.
    assert explain(compound_eval) == {"base": 35, "double": 35, "boost": 35}
    assert compound_eval.totals() == {"points": 105}
    assert [(p.line, p.points) for p in compound_eval.components if p.rule_id == "boost"] == [(0, 10), (1, 25)]


def test_basket_scope_multiplier_rounds_once_on_the_sum_of_the_lines() -> None:
    per_line = compile_doc(program_doc(rule("boost", {"multiplier": "1.5"})))
    per_basket = compile_doc(program_doc(rule("boost", {"multiplier": "1.5", "per": "basket"})))

    # Two 1.50 lines: base floor(1.5) = 1 each. Per line 0.5 floors to 0 twice; per basket 2 * 0.5 = 1.
    line_eval = per_line.evaluate(basket(150, 150), NOBODY)
    basket_eval = per_basket.evaluate(basket(150, 150), NOBODY)

    assert explain(line_eval) == {"base": 2, "boost": 0}
    assert line_eval.totals() == {"points": 2}
    assert explain(basket_eval) == {"base": 2, "boost": 1}
    assert basket_eval.totals() == {"points": 3}
    assert [p.line for p in basket_eval.components if p.rule_id == "boost"] == [-1]


def test_bonus_per_item_counts_quantities_of_the_qualifying_lines_only() -> None:
    engine = compile_doc(program_doc(rule("socks", {"bonus_points_per_item": 10}, when={"categories": ["socks"]})))
    socks = Basket(
        "pos", "HEL-01", "r-1", "EUR", 3500,
        (Line("sock", "socks", 3, 1000), Line("coat", "outerwear", 1, 2500)), WEDNESDAY_NOON,
    )  # fmt: skip

    evaluation = engine.evaluate(socks, NOBODY)

    # 35 base + 10 points x 3 pairs on line 0 only.
    assert explain(evaluation) == {"base": 35, "socks": 30}
    assert evaluation.totals() == {"points": 65}
    assert [(p.line, p.points) for p in evaluation.components if p.rule_id == "socks"] == [(0, 30)]


# Caps ---------------------------------------------------------------------------------------------


def test_per_line_cap_limits_each_line_on_its_own() -> None:
    engine = compile_doc(program_doc(rule("five", {"multiplier": "5"}, caps={"per_line": 60})))

    evaluation = engine.evaluate(basket(), NOBODY)

    # x5 adds 4 * 10 = 40 and 4 * 25 = 100 -> capped to 60 -> 35 + 40 + 60 = 135.
    assert explain(evaluation) == {"base": 35, "five": 100}
    assert evaluation.totals() == {"points": 135}
    five = [(p.line, p.points, p.capped) for p in evaluation.components if p.rule_id == "five"]
    assert five == [(0, 40, ""), (1, 60, "per-line cap 60 (from 100)")]


def test_per_receipt_cap_lets_earlier_lines_keep_theirs() -> None:
    engine = compile_doc(program_doc(rule("five", {"multiplier": "5"}, caps={"per_receipt": 50})))

    evaluation = engine.evaluate(basket(), NOBODY)

    # x5 adds 40 then 100; the receipt cap of 50 leaves line 0 its 40 and line 1 the other 10.
    assert explain(evaluation) == {"base": 35, "five": 50}
    assert evaluation.totals() == {"points": 85}
    five = [(p.line, p.points, p.capped) for p in evaluation.components if p.rule_id == "five"]
    assert five == [(0, 40, ""), (1, 10, "per-receipt cap 50 (from 100)")]


DAY_CAPPED = rule("boost", {"multiplier": "3"}, caps={"per_member_per_day": 30})
# 22:30Z on Wednesday 2026-01-07 is already Thursday 00:30 in Helsinki, still Wednesday in Lisbon.
LATE_WEDNESDAY = datetime(2026, 1, 7, 22, 30, tzinfo=UTC)


def test_member_day_cap_is_a_guard_whose_counter_names_the_store_local_date() -> None:
    engine = compile_doc(program_doc(DAY_CAPPED))

    helsinki = engine.evaluate(basket(store="HEL-01", at=LATE_WEDNESDAY), NOBODY)
    lisbon = engine.evaluate(basket(store="LIS-01", at=LATE_WEDNESDAY), NOBODY)

    # Without counters the engine does not cut: x3 adds 20 + 50 = 70; the ledger applies the guard.
    assert explain(helsinki) == {"base": 35, "boost": 70}
    assert helsinki.totals() == {"points": 105}
    assert {p.guard for p in helsinki.components if p.rule_id == "boost"} == {Guard("boost:day:2026-01-08", 30)}
    assert {p.guard for p in lisbon.components if p.rule_id == "boost"} == {Guard("boost:day:2026-01-07", 30)}
    assert {p.guard for p in helsinki.components if p.rule_id == "base"} == {None}


def test_a_night_windows_day_cap_counts_the_night_as_the_day_it_opened() -> None:
    """One Friday night, 22:00-02:00, is one day for its cap: one counter, not two."""
    night = rule("night", {"multiplier": "3"}, when={"time_window": {"start": "22:00", "end": "02:00"}},
                 caps={"per_member_per_day": 30})  # fmt: skip
    engine = compile_doc(program_doc(night))
    before = engine.evaluate(basket(at=datetime(2026, 1, 9, 21, 0, tzinfo=UTC)), NOBODY)  # Fri 23:00 Helsinki
    after = engine.evaluate(basket(at=datetime(2026, 1, 9, 23, 0, tzinfo=UTC)), NOBODY)  # Sat 01:00 Helsinki
    next_night = engine.evaluate(basket(at=datetime(2026, 1, 10, 21, 0, tzinfo=UTC)), NOBODY)  # Sat 23:00
    keys = [
        {p.guard.counter for p in e.components if p.rule_id == "night" and p.guard} for e in (before, after, next_night)
    ]
    assert keys == [{"night:day:2026-01-09"}, {"night:day:2026-01-09"}, {"night:day:2026-01-10"}]


def campaign_capped(date_range: dict[str, str]) -> dict[str, Any]:
    return rule("promo", {"bonus_points": 100}, when={"date_range": date_range}, caps={"per_member_per_campaign": 100})


def test_a_campaign_run_again_with_a_new_start_counts_afresh_under_the_key_it_always_had() -> None:
    """Counters already kept for campaigns with a start keep their exact key."""
    spring = compile_doc(program_doc(campaign_capped({"start": "2026-03-01T00:00:00", "end": "2026-04-01T00:00:00"})))
    autumn = compile_doc(program_doc(campaign_capped({"start": "2026-09-01T00:00:00"})))

    in_spring = spring.evaluate(basket(at=datetime(2026, 3, 10, 12, tzinfo=UTC)), NOBODY)
    in_autumn = autumn.evaluate(basket(at=datetime(2026, 9, 10, 12, tzinfo=UTC)), NOBODY)

    assert {p.guard for p in in_spring.components if p.rule_id == "promo"} == {
        Guard("promo:campaign:2026-03-01T00:00:00", 100)
    }
    assert {p.guard for p in in_autumn.components if p.rule_id == "promo"} == {
        Guard("promo:campaign:2026-09-01T00:00:00", 100)
    }


@pytest.mark.parametrize("stored", [False, True], ids=["published", "read-back"])
def test_a_campaign_without_a_start_keeps_counting_where_it_counted(stored: bool) -> None:
    """Republished (another rule edited, say) or read back, it keeps its members' counter."""
    program = validate_program(program_doc(campaign_capped({"end": "2026-04-01T00:00:00"})), stored=stored)

    evaluation = CompiledProgram(program, 1).evaluate(basket(at=datetime(2026, 3, 10, 12, tzinfo=UTC)), NOBODY)

    assert {p.guard for p in evaluation.components if p.rule_id == "promo"} == {Guard("promo:campaign:always", 100)}


@pytest.mark.parametrize(
    ("counters", "expected_boost", "expected_capped"),
    [
        # Nothing used today: line 0 takes 20, line 1 the remaining 10 of 30.
        ({}, [20, 10], ["", "member cap boost:day:2026-01-08 of 30: 20 already used"]),
        # 25 already used today: 5 left for line 0, nothing for line 1.
        (
            {"boost:day:2026-01-08": 25},
            [5, 0],
            [
                "member cap boost:day:2026-01-08 of 30: 25 already used",
                "member cap boost:day:2026-01-08 of 30: 30 already used",
            ],
        ),
        # Yesterday's (Helsinki) counter is full, which does not touch today's.
        ({"boost:day:2026-01-07": 30}, [20, 10], ["", "member cap boost:day:2026-01-08 of 30: 20 already used"]),
    ],
)
def test_member_day_cap_preview_cuts_components_with_the_counters_given(
    counters: dict[str, int], expected_boost: list[int], expected_capped: list[str]
) -> None:
    engine = compile_doc(program_doc(DAY_CAPPED))

    evaluation = engine.evaluate(basket(at=LATE_WEDNESDAY), MemberContext(counters=counters))

    boost = [p for p in evaluation.components if p.rule_id == "boost"]
    assert [p.points for p in boost] == expected_boost
    assert [p.capped for p in boost] == expected_capped
    assert explain(evaluation) == {"base": 35, "boost": sum(expected_boost)}
    assert evaluation.totals() == {"points": 35 + sum(expected_boost)}


# Currencies and FX ------------------------------------------------------------------------------

EUR_AND_JPY_RATES = [
    {"currency": "EUR", "points": 1, "per_minor": 100},
    {"currency": "JPY", "points": 1, "per_minor": 150},
]


def fx_program(*rates: tuple[str, str], **top: Any) -> dict[str, Any]:
    fx = {"base_currency": "EUR", "rates": [{"currency": c, "per_base": r} for c, r in rates]}
    return program_doc(fx=fx, **top)


def test_kwd_basket_is_converted_to_eur_with_exponent_3_and_floored() -> None:
    engine = compile_doc(fx_program(("KWD", "0.332")))

    evaluation = engine.evaluate(basket(1000, currency="KWD"), NOBODY)

    # 1.000 KWD = 1000 fils -> floor(1000 * 10^2 / (10^3 * 0.332)) = floor(301.2) = 301 cents -> 3 points.
    assert evaluation.currency == "KWD"
    assert evaluation.earn_currency == "EUR"
    assert evaluation.fx_rate == "0.332"
    assert evaluation.earn_amounts_minor == (301,)
    assert explain(evaluation) == {"base": 3}
    assert evaluation.totals() == {"points": 3}
    assert evaluation.components[0].detail == "1 points per 1.00 EUR on 3.01 EUR"
    assert evaluation.base_total == ("EUR", 301)  # what fraud screening compares across currencies


def test_kwd_lines_are_converted_and_floored_one_by_one() -> None:
    engine = compile_doc(fx_program(("KWD", "0.332")))

    evaluation = engine.evaluate(basket(500, 500, currency="KWD"), NOBODY)

    # Each 0.500 KWD -> floor(150.6) = 150 cents -> 1 point; per line, so 2 points, not 3.
    assert evaluation.earn_amounts_minor == (150, 150)
    assert explain(evaluation) == {"base": 2}
    assert evaluation.totals() == {"points": 2}


def test_jpy_with_its_own_base_rate_earns_a_point_per_150_yen_floored() -> None:
    engine = compile_doc(fx_program(("JPY", "161.5"), base_rates=EUR_AND_JPY_RATES))

    evaluation = engine.evaluate(basket(1000, currency="JPY"), NOBODY)

    # A base rate in the basket's currency wins over FX: 1000 / 150 = 6.67 -> 6 points.
    assert evaluation.earn_currency == "JPY"
    assert evaluation.fx_rate == ""
    assert evaluation.earn_amounts_minor == (1000,)
    assert explain(evaluation) == {"base": 6}
    assert evaluation.totals() == {"points": 6}


def test_jpy_without_a_base_rate_is_converted_to_eur_with_exponent_0() -> None:
    engine = compile_doc(fx_program(("JPY", "161.5")))

    evaluation = engine.evaluate(basket(1000, currency="JPY"), NOBODY)

    # 1000 yen -> floor(1000 * 10^2 / (10^0 * 161.5)) = floor(619.19) = 619 cents -> 6 points.
    assert evaluation.earn_currency == "EUR"
    assert evaluation.fx_rate == "161.5"
    assert evaluation.earn_amounts_minor == (619,)
    assert explain(evaluation) == {"base": 6}
    assert evaluation.totals() == {"points": 6}


@pytest.mark.parametrize("currency", ["UYU", "VED"])
def test_the_uruguayan_peso_and_the_digital_bolivar_earn_in_their_own_cents(currency: str) -> None:
    """Both are current ISO 4217 codes of exponent 2 (858 and 926); the table had only their
    neighbours (UYI, UYW, VES), so a program or a basket in them was refused as unknown."""
    engine = compile_doc(program_doc(base_rates=[{"currency": currency, "points": 1, "per_minor": 4000}]))

    evaluation = engine.evaluate(basket(100_000, currency=currency), NOBODY)

    assert evaluation.totals() == {"points": 25}  # 1,000.00 at a point per 40.00
    assert evaluation.components[0].detail == f"1 points per 40.00 {currency} on 1000.00 {currency}"


def test_half_up_policy_rounds_base_points_and_multiplier_extras_half_up() -> None:
    boost = rule("boost", {"multiplier": "1.5"})
    floor = compile_doc(program_doc(boost, base_rates=EUR_AND_JPY_RATES))
    half_up = compile_doc(program_doc(boost, base_rates=EUR_AND_JPY_RATES, policy={"rounding": "half_up"}))

    jpy_floor = floor.evaluate(basket(1000, currency="JPY"), NOBODY)
    jpy_half_up = half_up.evaluate(basket(1000, currency="JPY"), NOBODY)
    eur_floor = floor.evaluate(basket(150, 2500, 149), NOBODY)
    eur_half_up = half_up.evaluate(basket(150, 2500, 149), NOBODY)

    # 1000 yen / 150 = 6.67: floor 6, half_up 7; the 1.5x adds 3 (floor) or 3.5 -> 4 (half_up).
    assert explain(jpy_floor) == {"base": 6, "boost": 3}
    assert jpy_floor.totals() == {"points": 9}
    assert explain(jpy_half_up) == {"base": 7, "boost": 4}
    assert jpy_half_up.totals() == {"points": 11}
    # 1.50, 25.00, 1.49 EUR: floor base 1 + 25 + 1, extras 0 + 12 + 0 -> 39;
    # half_up base 2 + 25 + 1, extras 1 + 12.5->13 + 0.5->1 -> 43.
    assert explain(eur_floor) == {"base": 27, "boost": 12}
    assert eur_floor.totals() == {"points": 39}
    assert explain(eur_half_up) == {"base": 28, "boost": 15}
    assert eur_half_up.totals() == {"points": 43}


def test_basket_total_threshold_in_usd_is_met_by_a_eur_basket_converted_and_floored() -> None:
    big = rule("big", {"bonus_points": 100}, when={"basket_total_at_least": {"currency": "USD", "amount_minor": 10800}})
    engine = compile_doc(fx_program(("USD", "1.08"), rules=[big]))

    exactly = engine.evaluate(basket(10000), NOBODY)
    short = engine.evaluate(basket(9999), NOBODY)

    # 100.00 EUR -> 10000 * 1.08 = 10800 USD cents: met. 99.99 EUR -> floor(10798.92) = 10798: not met.
    assert explain(exactly) == {"base": 100, "big": 100}
    assert exactly.totals() == {"points": 200}
    assert explain(short) == {"base": 99}
    assert short.totals() == {"points": 99}


def test_basket_total_threshold_in_eur_is_met_by_a_usd_basket_converted_and_floored() -> None:
    big = rule("big", {"bonus_points": 100}, when={"basket_total_at_least": {"currency": "EUR", "amount_minor": 10000}})
    engine = compile_doc(fx_program(("USD", "1.08"), rules=[big]))

    exactly = engine.evaluate(basket(10800, currency="USD"), NOBODY)
    short = engine.evaluate(basket(10799, currency="USD"), NOBODY)

    # 108.00 USD -> 10800 / 1.08 = 10000 EUR cents: met. 107.99 USD -> floor(9999.07) = 9999: not met.
    assert exactly.earn_amounts_minor == (10000,)
    assert explain(exactly) == {"base": 100, "big": 100}
    assert exactly.totals() == {"points": 200}
    assert short.earn_amounts_minor == (9999,)
    assert explain(short) == {"base": 99}
    assert short.totals() == {"points": 99}


def test_basket_total_threshold_without_an_fx_path_from_the_basket_currency_does_not_hold() -> None:
    # Like the aurora sample: JPY earns at its own base rate but has no FX rate to EUR.
    big = rule("big", {"bonus_points": 100}, when={"basket_total_at_least": {"currency": "EUR", "amount_minor": 15000}})
    engine = compile_doc(fx_program(("USD", "1.08"), base_rates=EUR_AND_JPY_RATES, rules=[big]))

    evaluation = engine.evaluate(basket(30000, currency="JPY"), NOBODY)

    # 30000 / 150 = 200 base points; the EUR threshold cannot be compared, so no bonus.
    assert explain(evaluation) == {"base": 200}
    assert evaluation.totals() == {"points": 200}


# Member conditions -------------------------------------------------------------------------------


def test_first_purchase_bonus_applies_when_the_member_has_no_purchases_yet() -> None:
    engine = compile_doc(program_doc(rule("first", {"bonus_points": 200}, when={"purchase_number": {"equals": 1}})))

    first = engine.evaluate(basket(), MemberContext(purchase_count=0))
    second = engine.evaluate(basket(), MemberContext(purchase_count=1))

    assert explain(first) == {"base": 35, "first": 200}
    assert first.totals() == {"points": 235}
    assert [p.guard for p in first.components if p.rule_id == "first"] == [Guard(ordinal_equals=1)]
    assert explain(second) == {"base": 35}
    assert second.totals() == {"points": 35}


@pytest.mark.parametrize(("purchase_count", "expected_points"), [(3, 35), (4, 85), (5, 35), (9, 85)])
def test_every_fifth_purchase_bonus_applies_on_the_5th_and_10th(purchase_count: int, expected_points: int) -> None:
    engine = compile_doc(program_doc(rule("fifth", {"bonus_points": 50}, when={"purchase_number": {"every": 5}})))

    evaluation = engine.evaluate(basket(), MemberContext(purchase_count=purchase_count))

    # purchase_count is the purchases before this one: 4 -> this is the 5th.
    assert explain(evaluation) == ({"base": 35, "fifth": 50} if expected_points == 85 else {"base": 35})
    assert evaluation.totals() == {"points": expected_points}


def test_tier_multiplier_applies_only_to_members_of_that_tier() -> None:
    tiers = {
        "levels": [
            {"code": "blue", "threshold": 0},
            {"code": "silver", "threshold": 1000},
            {"code": "gold", "threshold": 5000},
        ]
    }
    engine = compile_doc(
        program_doc(
            rule("silver", {"multiplier": "1.25"}, when={"tiers": ["silver"]}),
            tiers=tiers,
            units=["points", "tier_credits"],
        )
    )

    by_tier = {tier: engine.evaluate(basket(), MemberContext(tier=tier)) for tier in ("silver", "gold", "blue", "")}

    # silver adds floor(10 * 0.25) + floor(25 * 0.25) = 2 + 6 = 8.
    assert explain(by_tier["silver"]) == {"base": 35, "silver": 8}
    assert {tier: e.totals()["points"] for tier, e in by_tier.items()} == {"silver": 43, "gold": 35, "blue": 35, "": 35}
    assert all(explain(by_tier[t]) == {"base": 35} for t in ("gold", "blue", ""))


# Campaign dates ------------------------------------------------------------------------------------


def campaign(start: str, end: str) -> dict[str, Any]:
    return rule("march", {"bonus_points": 100}, when={"date_range": {"start": start, "end": end}})


def test_campaign_dates_without_offset_are_store_local() -> None:
    engine = compile_doc(program_doc(campaign("2026-03-01T00:00:00", "2026-04-01T00:00:00")))
    at = datetime(2026, 2, 28, 22, 30, tzinfo=UTC)

    helsinki = engine.evaluate(basket(store="HEL-01", at=at), NOBODY)  # 2026-03-01 00:30 local
    lisbon = engine.evaluate(basket(store="LIS-01", at=at), NOBODY)  # 2026-02-28 22:30 local

    assert explain(helsinki) == {"base": 35, "march": 100}
    assert helsinki.totals() == {"points": 135}
    assert explain(lisbon) == {"base": 35}
    assert lisbon.totals() == {"points": 35}


@pytest.mark.parametrize(
    ("at", "expected_points"),
    [
        (datetime(2026, 2, 28, 22, 30, tzinfo=UTC), 35),
        (datetime(2026, 3, 1, 0, 30, tzinfo=UTC), 135),
        (datetime(2026, 3, 31, 23, 59, tzinfo=UTC), 135),
        (datetime(2026, 4, 1, 0, 0, tzinfo=UTC), 35),  # the end is exclusive
    ],
)
def test_campaign_dates_with_offset_are_the_same_instants_in_every_store(at: datetime, expected_points: int) -> None:
    engine = compile_doc(program_doc(campaign("2026-03-01T00:00:00+00:00", "2026-04-01T00:00:00+00:00")))

    results = [engine.evaluate(basket(store=store, at=at), NOBODY) for store in ("HEL-01", "LIS-01")]

    for evaluation in results:
        assert explain(evaluation) == ({"base": 35, "march": 100} if expected_points == 135 else {"base": 35})
        assert evaluation.totals() == {"points": expected_points}


def test_campaign_ending_inside_the_repeated_dst_hour_is_decided_per_instant() -> None:
    # Lisbon falls back at 01:00Z on 2026-10-25: 00:30Z and 01:30Z are both 01:30 on the wall.
    engine = compile_doc(program_doc(campaign("2026-10-01T00:00:00+00:00", "2026-10-25T01:00:00+00:00")))

    before = engine.evaluate(basket(store="LIS-01", at=datetime(2026, 10, 25, 0, 30, tzinfo=UTC)), NOBODY)
    after = engine.evaluate(basket(store="LIS-01", at=datetime(2026, 10, 25, 1, 30, tzinfo=UTC)), NOBODY)

    assert before.local_time.replace(tzinfo=None) == after.local_time.replace(tzinfo=None)
    assert explain(before) == {"base": 35, "march": 100}
    assert before.totals() == {"points": 135}
    assert explain(after) == {"base": 35}
    assert after.totals() == {"points": 35}


# Bad baskets ---------------------------------------------------------------------------------------

GOOD = basket()


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (dataclasses.replace(GOOD, channel="kiosk"), "basket.channel"),
        (dataclasses.replace(GOOD, currency="ZZZ"), "basket.currency"),
        (dataclasses.replace(GOOD, currency="USD"), "basket.currency"),  # ISO, but no base or FX rate
        (dataclasses.replace(GOOD, receipt_time=datetime(2026, 1, 7, 12, 0)), "basket.receipt_time"),
        (dataclasses.replace(GOOD, lines=(), total_minor=0), "basket.lines"),
        (dataclasses.replace(GOOD, lines=(GOOD.lines[0], Line("s", "c", -1, 2500))), "basket.lines[1].quantity"),
        (dataclasses.replace(GOOD, lines=(Line("s", "c", 1, -1000), GOOD.lines[1])), "basket.lines[0].amount_minor"),
        (dataclasses.replace(GOOD, total_minor=3600), "basket.total_minor"),
        (dataclasses.replace(GOOD, store_id="OSL-01"), "basket.store_id"),
        (dataclasses.replace(GOOD, receipt_time=datetime(9999, 12, 31, tzinfo=UTC)), "basket.receipt_time"),
    ],
    ids=["channel", "unknown-currency", "currency-without-rate", "naive-time", "no-lines", "negative-quantity",
         "negative-amount", "total-mismatch", "unknown-store", "expiry-past-year-9999"],
)  # fmt: skip
def test_bad_basket_is_refused_naming_the_field(bad: Basket, field: str) -> None:
    engine = compile_doc(program_doc())

    with pytest.raises(BadRequest) as refused:
        engine.evaluate(bad, NOBODY)

    assert refused.value.field == field


NEW_YORK = {"id": "NYC-01", "timezone": "America/New_York"}
NIGHT_DAY_CAP = rule("night", {"multiplier": "3"}, when={"time_window": {"start": "22:00", "end": "02:00"}},
                     caps={"per_member_per_day": 30})  # fmt: skip
ROLLING_TIERS = {
    "units": ["points", "tier_credits"],
    "tiers": {"window": "rolling_12_months", "downgrade_grace_days": 30,
              "levels": [{"code": "blue", "threshold": 0}, {"code": "gold", "threshold": 1000}]},
}  # fmt: skip


@pytest.mark.parametrize(
    ("doc", "store", "at"),
    [
        # Year 0 in New York: turning the instant into store-local time overflowed.
        (program_doc(stores=[NEW_YORK]), "NYC-01", datetime(1, 1, 1, 0, 30, tzinfo=UTC)),
        # 01:39 local in Helsinki (its zone's mean time then), inside a night window: its day cap
        # counts the night as the day before, which is year 0.
        (program_doc(NIGHT_DAY_CAP), "HEL-01", datetime(1, 1, 1, 0, 0, tzinfo=UTC)),
        # The tier in effect looks back over the 30-day grace, to year 0.
        (program_doc(**ROLLING_TIERS), "HEL-01", datetime(1, 1, 20, 12, 0, tzinfo=UTC)),
    ],
    ids=["local-time", "night-day-cap", "tier-grace"],
)
def test_a_receipt_too_early_to_price_is_refused_naming_the_receipt_time(
    doc: dict[str, Any], store: str, at: datetime
) -> None:
    """Each raised OverflowError, which failed a whole Simulate or batch instead of one item."""
    engine = compile_doc(doc)

    with pytest.raises(BadRequest) as refused:
        engine.evaluate(basket(store=store, at=at), NOBODY)

    assert refused.value.field == "basket.receipt_time"
    assert "too early" in refused.value.message


def test_the_earliest_receipts_that_can_be_priced_still_are() -> None:
    """The refusal is no wider than it needs to be: two days after the first instant, New York
    (no tiers) and a Helsinki night window's day cap price as any other day."""
    engine = compile_doc(program_doc(NIGHT_DAY_CAP, stores=[NEW_YORK, {"id": "HEL-01", "timezone": "Europe/Helsinki"}]))

    new_york = engine.evaluate(basket(store="NYC-01", at=datetime(1, 1, 3, tzinfo=UTC)), NOBODY)
    helsinki = engine.evaluate(basket(store="HEL-01", at=datetime(1, 1, 3, tzinfo=UTC)), NOBODY)

    assert new_york.local_time.isoformat().startswith("0001-01-02T19:")  # the zone's mean time then, UTC-4:56
    assert explain(new_york) == {"base": 35}
    # 01:39 on 3 January in Helsinki is the night that opened on the 2nd: x3 adds 70.
    assert explain(helsinki) == {"base": 35, "night": 70}
    assert {p.guard.counter for p in helsinki.components if p.guard} == {"night:day:0001-01-02"}


def test_basket_without_a_store_uses_the_program_default_time_zone() -> None:
    engine = compile_doc(program_doc(HAPPY_HOUR))

    evaluation = engine.evaluate(basket(1000, store="", at=datetime(2026, 1, 7, 16, 30, tzinfo=UTC)), NOBODY)

    # default_timezone is Europe/Helsinki: 16:30Z is 18:30 local, inside the happy hour.
    assert evaluation.local_time.strftime("%H:%M%z") == "18:30+0200"
    assert explain(evaluation) == {"base": 10, "happy-hour": 10}
    assert evaluation.totals() == {"points": 20}
