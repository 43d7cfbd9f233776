"""apply_guards: the member-state part of an earn, shared by the ledger and the rules preview."""

from __future__ import annotations

import pytest

from pointmesh.guards import Granted, Guard, apply_guards

DAY = Guard(counter="boost:day:2026-01-08", limit=100)


def test_components_sharing_a_counter_draw_from_it_in_order() -> None:
    granted, used = apply_guards([(DAY, 60), (DAY, 60), (None, 10)], {}, ordinal=1)

    assert granted == [
        Granted(60, ""),
        Granted(40, "member cap boost:day:2026-01-08 of 100: 60 already used"),
        Granted(10, ""),
    ]
    assert used == {"boost:day:2026-01-08": 100}


def test_counter_already_used_leaves_only_the_rest_of_the_limit() -> None:
    granted, used = apply_guards([(DAY, 30), (DAY, 30)], {"boost:day:2026-01-08": 90}, ordinal=1)

    assert [g.points for g in granted] == [10, 0]
    assert used == {"boost:day:2026-01-08": 10}


def test_exhausted_counter_grants_nothing_and_reports_no_increment() -> None:
    granted, used = apply_guards([(DAY, 30)], {"boost:day:2026-01-08": 100}, ordinal=1)

    assert granted == [Granted(0, "member cap boost:day:2026-01-08 of 100: 100 already used")]
    assert used == {}


def test_counters_of_other_days_do_not_limit_this_one() -> None:
    other_day = Guard(counter="boost:day:2026-01-07", limit=100)

    granted, used = apply_guards([(DAY, 80), (other_day, 80)], {"boost:day:2026-01-07": 50}, ordinal=1)

    assert [g.points for g in granted] == [80, 50]
    assert used == {"boost:day:2026-01-08": 80, "boost:day:2026-01-07": 50}


@pytest.mark.parametrize(("ordinal", "expected_points"), [(1, 200), (2, 0), (6, 0)])
def test_ordinal_equals_pays_only_on_that_purchase(ordinal: int, expected_points: int) -> None:
    first = Guard(ordinal_equals=1)

    granted, used = apply_guards([(first, 200)], {}, ordinal=ordinal)

    assert [g.points for g in granted] == [expected_points]
    assert granted[0].note == ("" if expected_points else f"purchase number {ordinal} does not qualify")
    assert used == {}


@pytest.mark.parametrize(("ordinal", "holds"), [(1, False), (4, False), (5, True), (6, False), (10, True)])
def test_ordinal_every_pays_on_each_multiple(ordinal: int, holds: bool) -> None:
    every_fifth = Guard(ordinal_every=5)

    granted, _ = apply_guards([(every_fifth, 50)], {}, ordinal=ordinal)

    assert every_fifth.holds_for(ordinal) is holds
    assert granted[0].points == (50 if holds else 0)


def test_ordinal_that_does_not_qualify_does_not_draw_from_the_counter() -> None:
    capped_fifth = Guard(counter="fifth:campaign", limit=80, ordinal_every=5)

    on_fourth, used_fourth = apply_guards([(capped_fifth, 50)], {}, ordinal=4)
    on_fifth, used_fifth = apply_guards([(capped_fifth, 50), (capped_fifth, 50)], {}, ordinal=5)

    assert [g.points for g in on_fourth] == [0]
    assert used_fourth == {}
    assert [g.points for g in on_fifth] == [50, 30]
    assert used_fifth == {"fifth:campaign": 80}


def test_guard_without_counter_or_ordinal_grants_everything() -> None:
    granted, used = apply_guards([(Guard(), 70)], {"anything": 5}, ordinal=3)

    assert granted == [Granted(70, "")]
    assert used == {}
