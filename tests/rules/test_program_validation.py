"""Program documents are refused with every problem named by the path of the bad field."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pytest
import yaml

from rules_svc.domain import ProgramRejected
from rules_svc.engine import CompiledProgram
from rules_svc.program import ProgramInvalid, load_program, validate_program
from rules_svc.service import _parse
from tests.rules import load_doc, program_doc

AURORA = Path(__file__).resolve().parents[2] / "rules_svc" / "programs" / "aurora.yaml"


def bonus(rule_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": rule_id, "effect": {"bonus_points": 10}, **fields}


def errors_of(doc: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ProgramInvalid) as refused:
        load_doc(doc)
    return refused.value.errors


def paths_of(doc: dict[str, Any]) -> list[str]:
    return [path for path, _ in errors_of(doc)]


def test_aurora_sample_loads_and_compiles() -> None:
    program = load_program(AURORA.read_text())

    assert program.program == "aurora"
    assert [s.id for s in program.stores] == ["HEL-01", "HEL-02", "LIS-01", "LIS-02"]
    assert len(program.rules) == 9
    assert program.tiers is not None and [t.code for t in program.tiers.levels] == ["blue", "silver", "gold"]
    assert CompiledProgram(program, 1).version == 1


def test_same_document_as_json_loads() -> None:
    program = load_program(json.dumps(program_doc(bonus("a"))), fmt="json")

    assert [r.id for r in program.rules] == ["a"]


def test_bad_time_of_day_is_reported_at_rules_3_when_time_window_start() -> None:
    late = bonus("d", when={"time_window": {"start": "24:00", "end": "02:00"}})
    errors = errors_of(program_doc(bonus("a"), bonus("b"), bonus("c"), late))

    assert errors == [("rules[3].when.time_window.start", "'24:00' is not a time of day HH:MM (00:00..23:59)")]


def test_empty_time_window_is_refused() -> None:
    same = bonus("a", when={"time_window": {"start": "18:00", "end": "18:00"}})

    assert paths_of(program_doc(same)) == ["rules[0].when.time_window"]


def test_rule_in_an_undeclared_group_is_refused() -> None:
    errors = errors_of(program_doc(bonus("a", group="weekend"), groups=[{"id": "promo", "mode": "best_of"}]))

    assert errors == [("rules[0].group", "'weekend' is not a declared group")]


def test_rule_earning_an_undeclared_unit_is_refused() -> None:
    errors = errors_of(program_doc(bonus("a"), bonus("b", unit="miles")))

    assert errors == [("rules[1].unit", "'miles' is not one of units ['points']")]


def test_duplicated_rule_id_is_refused_at_its_second_occurrence() -> None:
    errors = errors_of(program_doc(bonus("a"), bonus("b"), bonus("a")))

    assert errors == [("rules[2]", "'a' is listed twice")]


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        (program_doc({"id": "a", "effect": {"multiplier": 1.5}}), "rules[0].effect.multiplier"),
        (
            program_doc(fx={"base_currency": "EUR", "rates": [{"currency": "USD", "per_base": 1.08}]}),
            "fx.rates[0].per_base",
        ),
    ],
    ids=["multiplier", "fx-rate"],
)
def test_floats_are_refused_so_rates_stay_exact(doc: dict[str, Any], path: str) -> None:
    errors = errors_of(doc)

    assert [p for p, _ in errors] == [path]
    assert "quoted string" in errors[0][1]


def test_yes_and_true_are_refused_where_a_whole_number_of_points_is_meant() -> None:
    doc = program_doc(
        {"id": "a", "effect": {"bonus_points": True}},
        {"id": "b", "priority": True, "effect": {"bonus_points": 5}, "caps": {"per_receipt": True}},
        base_rates=[{"currency": "EUR", "unit": "points", "points": True, "per_minor": True}],
        gamification={"achievements": [{"id": "x", "name": "X", "reward": {"points": True}}]},
    )

    errors = errors_of(doc)

    assert sorted(p for p, _ in errors) == [
        "base_rates[0].per_minor", "base_rates[0].points", "gamification.achievements[0].reward.points",
        "rules[0].effect.bonus_points", "rules[1].caps.per_receipt", "rules[1].priority",
    ]  # fmt: skip
    assert all("whole number, got True" in message for _, message in errors)


def test_a_gamification_id_used_twice_is_named_at_its_own_section() -> None:
    game = {
        "achievements": [{"id": "a", "name": "A", "reward": {"points": 5}}],
        "streaks": [{"id": "s", "name": "S", "weeks": 2, "reward": {"points": 5}},
                    {"id": "a", "name": "A again", "weeks": 3, "reward": {"points": 5}}],
    }  # fmt: skip

    errors = errors_of(program_doc(gamification=game))

    assert errors == [("gamification.streaks[1].id", "'a' is already the id of gamification.achievements[0]")]


def test_quoted_and_integer_multipliers_are_exact_fractions() -> None:
    program = load_doc(
        program_doc({"id": "a", "effect": {"multiplier": "1.25"}}, {"id": "b", "effect": {"multiplier": 3}})
    )

    assert [r.effect.multiplier for r in program.rules] == ["1.25", "3"]


def test_multiplier_of_one_or_less_is_refused() -> None:
    assert paths_of(program_doc({"id": "a", "effect": {"multiplier": "1"}})) == ["rules[0].effect"]


def test_unknown_time_zones_are_refused_where_they_are_written() -> None:
    doc = program_doc(default_timezone="Europe/Atlantis")
    doc["stores"][1]["timezone"] = "Mars/Olympus"

    assert paths_of(doc) == ["default_timezone", "stores[1].timezone"]


def test_zone_names_that_mean_the_hosts_own_zone_are_refused() -> None:
    """They load on a Debian host, and a program priced by them moves with the machine."""
    doc = program_doc(default_timezone="localtime")
    doc["stores"][0]["timezone"] = "posixrules"

    assert paths_of(doc) == ["default_timezone", "stores[0].timezone"]


def test_the_right_and_posix_copies_of_a_zone_are_refused_naming_the_zone_to_write() -> None:
    """`right/` zones count leap seconds, so zoneinfo switches their DST 27 s after the real one;
    `posix/` duplicates the plain names; and both trees exist on some hosts only."""
    doc = program_doc(default_timezone="posix/Europe/Helsinki")
    doc["stores"][1]["timezone"] = "right/Europe/Lisbon"

    copy_of = "is a copy of a zone only some hosts have; write"
    assert errors_of(doc) == [
        ("default_timezone", f"'posix/Europe/Helsinki' {copy_of} 'Europe/Helsinki'"),
        ("stores[1].timezone", f"'right/Europe/Lisbon' {copy_of} 'Europe/Lisbon'"),
    ]


def test_a_version_stored_with_a_right_zone_keeps_loading_where_the_host_has_it() -> None:
    try:
        ZoneInfo("right/Europe/Lisbon")
    except (ZoneInfoNotFoundError, ValueError):
        pytest.skip("this host has no right/ zones")
    doc = program_doc()
    doc["stores"][1]["timezone"] = "right/Europe/Lisbon"

    assert validate_program(doc, stored=True).stores[1].timezone == "right/Europe/Lisbon"


BINARY = "is a YAML !!binary value; write it as plain text"


def with_binary(path: tuple[str | int, ...], value: bytes, *rules: dict[str, Any]) -> dict[str, Any]:
    """program_doc() with `value` at `path`; yaml.safe_dump writes bytes as a `!!binary` scalar."""
    doc = copy.deepcopy(program_doc(*rules))
    at: Any = doc
    for part in path[:-1]:
        at = at[part]
    at[path[-1]] = value
    return doc


WINDOW = bonus("r", when={"time_window": {"start": "09:00", "end": "10:00"}})
CAMPAIGN = bonus("r", when={"date_range": {"start": "2026-03-01T00:00:00"}}, effect={"multiplier": "2"})


@pytest.mark.parametrize(
    ("path", "value", "rules"),
    [
        (("stores", 1, "timezone"), b"Nowhere/City", ()),  # compiled, ZoneInfoNotFoundError
        (("base_rates", 0, "currency"), b"XYZ", ()),  # compiled, KeyError
        (("rules", 0, "when", "time_window", "start"), b"25:99", (WINDOW,)),  # compiled, ValueError
        (("rules", 0, "id"), b"a b c", (WINDOW,)),
        (("base_rates", 0, "points"), b"5", ()),
        (("rules", 0, "when", "date_range", "start"), b"2026-03-01T00:00:00", (CAMPAIGN,)),
        (("rules", 0, "effect", "compound"), b"true", (CAMPAIGN,)),
    ],
    ids=["timezone", "currency", "time-of-day", "name", "whole-number", "date", "flag"],
)
def test_a_yaml_binary_value_is_refused_at_its_path(
    path: tuple[str | int, ...], value: bytes, rules: tuple[dict[str, Any], ...]
) -> None:
    """Lax pydantic decoded the bytes after the checks meant for text had let them by, and
    publishing crashed compiling them (UNKNOWN) or took them as the text they spell."""
    text = yaml.safe_dump(with_binary(path, value, *rules), sort_keys=False)
    assert "!!binary" in text

    with pytest.raises(ProgramRejected) as refused:
        _parse(text, "yaml")

    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    assert refused.value.violations == [(where, BINARY)]
    assert refused.value.field == where


@pytest.mark.parametrize(
    ("path", "value", "rules"),
    [
        (("stores", 1, "timezone"), b"Nowhere/City", ()),
        (("default_timezone",), b"Europe/Helsinki", ()),
        (("base_rates", 0, "currency"), b"EUR", ()),
        (("rules", 0, "when", "time_window", "start"), b"09:00", (WINDOW,)),
        (("rules", 0, "id"), b"r", (WINDOW,)),
        (("stores", 1, "region"), b"PT", ()),
        (("stores", 1, "name"), b"Lisboa", ()),
        (("rules", 0, "when", "attributes", "club"), b"gold", (bonus("r", when={"attributes": {"club": "x"}}),)),
    ],
    ids=["timezone", "default-timezone", "currency", "time-of-day", "name", "optional-name", "label", "attribute"],
)
def test_a_field_checked_as_text_refuses_bytes_handed_to_validate_program(
    path: tuple[str | int, ...], value: bytes, rules: tuple[dict[str, Any], ...]
) -> None:
    """The same guard in the fields themselves, for a mapping that never went through YAML."""
    with pytest.raises(ProgramInvalid) as refused:
        validate_program(with_binary(path, value, *rules))

    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    assert refused.value.errors == [(where, "must be text, got bytes")]


def test_tier_thresholds_that_do_not_increase_are_refused() -> None:
    levels = [
        {"code": "blue", "threshold": 0},
        {"code": "silver", "threshold": 1000},
        {"code": "gold", "threshold": 1000},
    ]
    doc = program_doc(units=["points", "tier_credits"], tiers={"levels": levels})

    assert errors_of(doc) == [("tiers.levels[2].threshold", "thresholds must increase level by level")]


def test_entry_tier_must_start_at_zero() -> None:
    doc = program_doc(units=["points", "tier_credits"], tiers={"levels": [{"code": "blue", "threshold": 10}]})

    assert paths_of(doc) == ["tiers.levels[0].threshold"]


def test_yaml_syntax_error_reports_its_line() -> None:
    text = yaml.safe_dump(program_doc(), sort_keys=False) + "rules: [ {id: a\nbroken: here\n"

    with pytest.raises(ProgramInvalid) as refused:
        load_program(text)

    line = len(text.splitlines())  # the parser gives up on the last line
    [(path, message)] = refused.value.errors
    assert path == ""
    assert message.startswith("not valid YAML at line ")
    assert f"line {line} " in message


def test_json_syntax_error_reports_its_line() -> None:
    with pytest.raises(ProgramInvalid) as refused:
        load_program('{"program": "x",\n "channels": [pos]}', fmt="json")

    assert refused.value.errors == [("", "not valid JSON: Expecting value at line 2 column 15")]


def test_a_key_repeated_in_one_mapping_is_refused_not_overwritten() -> None:
    """PyYAML and json keep the last of two equal keys: a second `effect:` pasted under a rule
    made a x2 rule pay x20, and a second `rules:` block dropped the first without a word."""
    good = yaml.safe_dump(program_doc(bonus("weekend")), sort_keys=False)
    assert len(load_program(good).rules) == 1
    twice = good.replace("  effect:\n", "  effect:\n    bonus_points: 99\n  effect:\n", 1)
    with pytest.raises(ProgramInvalid) as refused:
        load_program(twice)
    [(path, message)] = refused.value.errors
    line = twice.splitlines().index("  effect:", twice.splitlines().index("  effect:") + 1) + 1
    assert (path, message) == ("", f"not valid YAML at line {line} column 3: key 'effect' appears twice in one mapping")

    doc = json.dumps(program_doc(bonus("a")))
    twice_json = doc.replace('"bonus_points": 10', '"bonus_points": 10, "bonus_points": 50')
    with pytest.raises(ProgramInvalid) as refused:
        load_program(twice_json, fmt="json")
    assert refused.value.errors == [("", "not valid JSON: key 'bonus_points' appears twice in one object")]


def test_a_yaml_merge_key_may_still_override_what_it_brings_in() -> None:
    head = yaml.safe_dump(program_doc(bonus("x")), sort_keys=False).partition("rules:\n")[0]
    text = head + "rules:\n- &base {id: base, effect: {bonus_points: 5}}\n- <<: *base\n  id: own\n"
    assert [r.id for r in load_program(text).rules] == ["base", "own"]
    twice = head + "rules:\n- &a {id: a, effect: {bonus_points: 5}}\n- {<<: *a, <<: *a, id: b}\n"
    with pytest.raises(ProgramInvalid, match="key '<<' appears twice in one mapping"):
        load_program(twice)


def test_document_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(ProgramInvalid) as refused:
        load_program("- just\n- a list\n")

    assert [path for path, _ in refused.value.errors] == [""]


def test_every_problem_is_reported_at_once() -> None:
    doc = program_doc(bonus("a", unit="miles"), bonus("a", group="nope"))

    assert paths_of(doc) == ["rules[0].unit", "rules[1]", "rules[1].group"]  # in document order


def test_conditions_naming_undeclared_channels_stores_and_tiers_are_refused() -> None:
    when = {"channels": ["pos", "kiosk"], "stores": ["OSL-01"], "tiers": ["gold"]}

    assert paths_of(program_doc(bonus("a", when=when))) == [
        "rules[0].when.channels[1]",
        "rules[0].when.stores[0]",
        "rules[0].when.tiers[0]",
    ]


def test_threshold_in_a_currency_without_any_rate_is_refused() -> None:
    when = {"basket_total_at_least": {"currency": "USD", "amount_minor": 5000}}

    assert paths_of(program_doc(bonus("a", when=when))) == ["rules[0].when.basket_total_at_least.currency"]


def test_campaign_cap_needs_a_date_range() -> None:
    doc = program_doc(bonus("a", caps={"per_member_per_campaign": 500}))

    assert paths_of(doc) == ["rules[0].caps.per_member_per_campaign"]


def test_a_campaign_cap_with_an_end_and_no_start_is_published() -> None:
    """Its counter is `<id>:campaign:always`: refusing it would make a running campaign, edited
    and republished, take a start and so a new counter, its members' caps reset mid-campaign."""
    rule = bonus("a", when={"date_range": {"end": "2026-04-01T00:00:00"}}, caps={"per_member_per_campaign": 100})

    program = validate_program(program_doc(rule))

    assert program.rules[0].caps.per_member_per_campaign == 100


def test_rule_with_both_a_day_and_a_campaign_member_cap_is_refused() -> None:
    # A component carries one guard with one counter; the campaign cap used to be silently dropped.
    rule = bonus("a", caps={"per_member_per_day": 100, "per_member_per_campaign": 500})
    rule["when"] = {"date_range": {"start": "2026-03-01T00:00:00", "end": "2026-04-01T00:00:00"}}

    assert errors_of(program_doc(rule)) == [
        ("rules[0].caps", "set at most one of per_member_per_day and per_member_per_campaign")
    ]


def test_campaign_bounds_with_seconds_are_refused() -> None:
    # Place-and-time conditions are decided once per minute, so a bound inside a minute would be
    # decided by whichever receipt of that minute came first.
    rule = bonus("a", when={"date_range": {"start": "2026-03-01T10:00:00", "end": "2026-03-31T23:59:59"}})

    assert paths_of(program_doc(rule)) == ["rules[0].when.date_range.end"]


def test_campaign_bounds_must_agree_on_having_an_offset_and_be_ordered() -> None:
    mixed = bonus("a", when={"date_range": {"start": "2026-03-01T00:00:00", "end": "2026-04-01T00:00:00+00:00"}})
    backwards = bonus("b", when={"date_range": {"start": "2026-04-01T00:00:00", "end": "2026-03-01T00:00:00"}})

    assert paths_of(program_doc(mixed, backwards)) == ["rules[0].when.date_range", "rules[1].when.date_range"]


def test_purchase_number_needs_exactly_one_of_equals_or_every() -> None:
    rule = bonus("a", when={"purchase_number": {"equals": 1, "every": 5}})

    assert paths_of(program_doc(rule)) == ["rules[0].when.purchase_number"]


def test_unknown_field_is_refused_at_its_path() -> None:
    assert paths_of(program_doc(bonus("a", when={"weekday": ["sat"]}))) == ["rules[0].when.weekday"]


def test_an_empty_condition_list_is_refused_rather_than_never_matching() -> None:
    doc = program_doc(bonus("b", when={"channels": []}))
    assert paths_of(doc) == ["rules[0].when.channels"]


def test_a_document_of_nested_yaml_aliases_is_refused_before_it_expands() -> None:
    """Nine levels of ten aliases stand for a billion values: refused, not walked."""
    lines = ['a0: &a0 ["x"]'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb = "\n".join(["program: shop", *lines, "channels: *a9"])
    with pytest.raises(ProgramInvalid) as refused:
        load_program(bomb)
    assert refused.value.errors == [("", "uses 91 YAML aliases; at most 64 are allowed")]  # 9 x 10, and channels


def test_a_few_anchors_for_reuse_are_still_fine() -> None:
    reused = """
program: shop
default_timezone: Europe/Helsinki
channels: &everywhere [pos, app]
stores: [{id: HEL-01, timezone: Europe/Helsinki}]
base_rates: [{currency: EUR, points: 1, per_minor: 100}]
rules:
  - {id: weekend, when: {channels: *everywhere, days_of_week: [sat, sun]}, effect: {multiplier: '2'}}
"""
    program = load_program(reused)
    assert program.rules[0].when.channels == ["pos", "app"]


@pytest.mark.parametrize(
    ("achievement", "why"),
    [
        ({"id": "omni", "name": "Four channels", "distinct": "channel", "count": 4, "reward": {"points": 50}},
         "3 channels"),
        ({"id": "omni", "name": "Four of two", "distinct": "channel", "count": 3,
          "match": {"channels": ["pos", "app"]}, "reward": {"points": 50}}, "2 channels"),
        ({"id": "duo", "name": "Three of two", "distinct": "category", "count": 3,
          "match": {"categories": ["shoes", "bags"]}, "reward": {"points": 50}}, "2 categories"),
    ],
)  # fmt: skip
def test_an_achievement_no_member_can_complete_is_refused_naming_its_count(
    achievement: dict[str, Any], why: str
) -> None:
    doc = program_doc(channels=["pos", "app", "web"], gamification={"achievements": [achievement]})
    with pytest.raises(ProgramInvalid) as refused:
        load_program(yaml.safe_dump(doc))
    found = dict(refused.value.errors)
    assert "gamification.achievements[0].count" in found, found
    assert why in found["gamification.achievements[0].count"]


def test_a_best_of_group_mixing_units_is_refused_naming_the_odd_rule() -> None:
    """Best-of compares what its rules pay: double points against double tier credits (10 per
    euro) was won by 350 tier credits over 35 points, a comparison with no meaning."""
    doc = program_doc(
        {"id": "double-points", "effect": {"multiplier": "2"}, "group": "promo", "priority": 10},
        {"id": "double-credits", "effect": {"multiplier": "2"}, "group": "promo", "priority": 20,
         "unit": "tier_credits"},
        {"id": "outside", "effect": {"bonus_points": 5}, "unit": "tier_credits"},
        units=["points", "tier_credits"],
        base_rates=[{"currency": "EUR", "unit": "points", "points": 1, "per_minor": 100},
                    {"currency": "EUR", "unit": "tier_credits", "points": 10, "per_minor": 100}],
        groups=[{"id": "promo", "mode": "best_of"}],
    )  # fmt: skip
    with pytest.raises(ProgramInvalid) as refused:
        load_program(yaml.safe_dump(doc))
    found = dict(refused.value.errors)
    assert list(found) == ["rules[1].unit"], found
    assert "rules[0] earns 'points'" in found["rules[1].unit"]
    doc["groups"] = [{"id": "promo", "mode": "additive"}]  # adding them up is meaningful per unit
    load_program(yaml.safe_dump(doc))
