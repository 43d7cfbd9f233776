"""Gamification arithmetic in process: which purchases count, how late receipts and reused
challenge ids are handled. Each test replays purchase facts through `apply` and the store."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rules_svc.game_engine import Award, ItemState, PurchaseFact, apply, has_joined, join_key, week_of
from rules_svc.game_store import GameStore
from rules_svc.program import Program
from tests.rules import load_doc, program_doc

WEDNESDAY = datetime(2026, 1, 7, 12, tzinfo=UTC)
_ids = itertools.count()


def fact(at: datetime = WEDNESDAY, *, store: str = "HEL-01", channel: str = "pos", categories: tuple[str, ...] = (),
         total: int = 1000, currency: str = "EUR") -> PurchaseFact:  # fmt: skip
    n = next(_ids)
    return PurchaseFact(f"e{n}", "m-1", f"p{n}", channel, store, total, currency, at, categories)


def game(**items: list[dict[str, Any]]) -> Program:
    return load_doc(program_doc(gamification=items, channels=["pos", "app", "web"]))


def replay(program: Program, *facts: PurchaseFact, states: dict[str, ItemState] | None = None) -> list[Award]:
    states = {} if states is None else states
    return [award for f in facts for award in apply(program, states, set(), f)]


def test_distinct_categories_count_only_the_categories_the_achievement_names() -> None:
    program = game(
        achievements=[
            {
                "id": "trio",
                "name": "Shoes, bags, hats",
                "distinct": "category",
                "count": 3,
                "match": {"categories": ["shoes", "bags", "hats"]},
                "reward": {"points": 50},
            }
        ]
    )
    states: dict[str, ItemState] = {}

    first = replay(program, fact(categories=("shoes", "groceries", "dairy")), states=states)
    rest = replay(program, fact(categories=("bags",)), fact(categories=("hats", "dairy")), states=states)

    assert first == []
    assert states["trio"].seen == ["shoes", "bags", "hats"]
    assert [a.item_id for a in rest] == ["trio"]


def test_web_purchases_without_a_store_do_not_count_as_a_store_visited() -> None:
    program = game(achievements=[{"id": "stores", "name": "Two stores", "distinct": "store", "count": 2,
                                  "reward": {"points": 50}}])  # fmt: skip
    states: dict[str, ItemState] = {}

    awards = replay(program, fact(store="HEL-01"), fact(store="", channel="web"), states=states)

    assert awards == []
    assert states["stores"].seen == ["HEL-01"]
    assert [a.item_id for a in replay(program, fact(store="LIS-01"), states=states)] == ["stores"]


def test_distinct_days_are_the_stores_local_days() -> None:
    program = game(achievements=[{"id": "days", "name": "Two days", "distinct": "day", "count": 2,
                                  "reward": {"points": 50}}])  # fmt: skip
    states: dict[str, ItemState] = {}

    # 21:30 and 22:30 in Lisbon on 7 January; the second is already 8 January in Helsinki.
    evening = replay(program, fact(datetime(2026, 1, 7, 21, 30, tzinfo=UTC), store="LIS-01"),
                     fact(datetime(2026, 1, 7, 22, 30, tzinfo=UTC), store="LIS-01"), states=states)  # fmt: skip

    assert evening == []
    assert states["days"].seen == ["2026-01-07"]


def test_a_minimum_total_in_euros_is_met_by_a_swedish_basket_converted() -> None:
    doc = program_doc(
        fx={"base_currency": "EUR", "rates": [{"currency": "SEK", "per_base": "11.5"}]},
        gamification={"achievements": [{"id": "big", "name": "A 50 EUR basket", "reward": {"points": 100},
                                        "match": {"min_total": {"currency": "EUR", "amount_minor": 5000}}}]},
    )  # fmt: skip
    program = load_doc(doc)

    # 574.99 SEK is 49.99 EUR (floored); 575.00 SEK is 50.00 EUR.
    assert replay(program, fact(total=57499, currency="SEK")) == []
    assert [a.item_id for a in replay(program, fact(total=57500, currency="SEK"))] == ["big"]


STREAK = {"id": "three", "name": "Three weeks", "weeks": 3, "reward": {"points": 300}}


def week(n: int) -> datetime:
    return WEDNESDAY + timedelta(weeks=n)


def test_a_late_receipt_that_fills_the_gap_completes_the_streak_once() -> None:
    program = game(streaks=[STREAK])
    states: dict[str, ItemState] = {}

    before = replay(program, fact(week(2)), fact(week(4)), states=states)
    late = replay(program, fact(week(3)), states=states)
    again = replay(program, fact(week(5)), fact(week(3) + timedelta(days=1)), states=states)

    assert before == []
    assert [(a.item_id, a.points) for a in late] == [("three", 300)]
    assert again == []  # the same streak going on, and a second receipt of a week already counted
    assert states["three"].completions == 1


def test_a_late_week_in_front_of_a_paid_streak_does_not_pay_it_again() -> None:
    program = game(streaks=[STREAK])
    states: dict[str, ItemState] = {}

    paid = replay(program, fact(week(1)), fact(week(2)), fact(week(3)), states=states)
    late = replay(program, fact(week(0)), states=states)
    broke_then_new = replay(program, fact(week(5)), fact(week(6)), fact(week(7)), states=states)

    assert len(paid) == 1
    assert late == []
    assert len(broke_then_new) == 1 and broke_then_new[0].period != paid[0].period


def test_a_streak_stored_before_weeks_were_kept_carries_on() -> None:
    program = game(streaks=[STREAK])
    now = week_of(WEDNESDAY.date())
    states = {"three": ItemState(completions=1, last_week=now, run=3)}  # paid, the three weeks up to now

    assert replay(program, fact(week(1)), states=states) == []  # the paid run goes on
    assert (states["three"].run, states["three"].paid) == (4, [[now - 2, now + 1]])
    assert replay(program, fact(week(3)), fact(week(4)), fact(week(5)), states=states) != []  # broke, new run


def test_a_streak_made_shorter_pays_a_run_already_long_enough_on_the_next_purchase_that_week() -> None:
    four_weeks = game(streaks=[{**STREAK, "weeks": 4}])
    three_weeks = game(streaks=[STREAK])
    states: dict[str, ItemState] = {}

    before = replay(four_weeks, fact(week(1)), fact(week(2)), fact(week(3)), states=states)
    same_week = replay(three_weeks, fact(week(3) + timedelta(days=1)), states=states)
    again = replay(three_weeks, fact(week(3) + timedelta(days=2)), fact(week(4)), states=states)

    assert before == []
    assert [(a.item_id, a.points) for a in same_week] == [("three", 300)]
    assert again == []  # the run paid goes on
    assert states["three"].completions == 1


def challenge(starts: str, ends: str) -> Program:
    return game(challenges=[{"id": "monthly", "name": "Three this month", "starts": starts, "ends": ends,
                             "purchases": 3, "reward": {"points": 200}}])  # fmt: skip


def test_a_challenge_id_reused_for_a_new_month_counts_afresh_and_pays_again(tmp_path: Path) -> None:
    january = challenge("2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00")
    february = challenge("2026-02-01T00:00:00+00:00", "2026-03-01T00:00:00+00:00")
    store = GameStore(tmp_path / "game.sqlite")
    jan_paid = [store.apply_event(january, fact(datetime(2026, 1, d, 12, tzinfo=UTC))) for d in (10, 11, 12)]
    feb_first = store.apply_event(february, fact(datetime(2026, 2, 2, 12, tzinfo=UTC)))

    assert [a.item_id for a in jan_paid[2] or []] == ["monthly"]
    assert feb_first == []
    assert [r.progress for r in store.board("test", "monthly", "from-1769904000", 1769904000 * 10**6, 10)] == [
        1
    ]  # 2026-02-01
    late_january = store.apply_event(january, fact(datetime(2026, 1, 31, 12, tzinfo=UTC)))  # an offline till
    feb_rest = [store.apply_event(february, fact(datetime(2026, 2, d, 12, tzinfo=UTC))) for d in (3, 4)]
    assert late_january == []
    awards = [a for got in (*jan_paid, feb_first, *feb_rest) for a in got or []]
    assert [a.key("test", "m-1") for a in awards] == [
        "test:monthly:m-1:from-1767225600", "test:monthly:m-1:from-1769904000",
    ]  # fmt: skip


def test_a_challenge_completed_before_windows_were_kept_is_not_taken_for_the_next_window() -> None:
    february = challenge("2026-02-01T00:00:00+00:00", "2026-03-01T00:00:00+00:00")
    january_done = int(datetime(2026, 1, 12, 12, tzinfo=UTC).timestamp() * 1_000_000)
    states = {"monthly": ItemState(count=3, completions=1, last_completed_us=january_done)}  # no period: old row

    awards = replay(february, *(fact(datetime(2026, 2, d, 12, tzinfo=UTC)) for d in (2, 3, 4)), states=states)

    assert [a.period for a in awards] == ["from-1769904000"]
    assert (states["monthly"].count, states["monthly"].period) == (3, "from-1769904000")


def test_joining_an_opt_in_challenge_counts_for_its_window_only(tmp_path: Path) -> None:
    def opt_in(starts: str, ends: str) -> Program:
        return game(challenges=[{"id": "vip", "name": "Two for members who joined", "starts": starts, "ends": ends,
                                 "purchases": 2, "opt_in": True, "reward": {"points": 120}}])  # fmt: skip

    january = opt_in("2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00")
    february = opt_in("2026-02-01T00:00:00+00:00", "2026-03-01T00:00:00+00:00")
    store = GameStore(tmp_path / "game.sqlite")
    store.join("test", join_key(january.gamification.challenges[0]), "m-1", datetime(2026, 1, 1, tzinfo=UTC))

    in_january = [store.apply_event(january, fact(datetime(2026, 1, d, 12, tzinfo=UTC))) for d in (10, 11)]
    in_february = [store.apply_event(february, fact(datetime(2026, 2, d, 12, tzinfo=UTC))) for d in (10, 11)]

    assert [len(got or []) for got in in_january] == [0, 1]
    assert [len(got or []) for got in in_february] == [0, 0]  # not joined this month


def test_a_running_challenge_moved_to_start_earlier_keeps_what_it_counted() -> None:
    """A correction that moves `starts` earlier (v2 from Jan 1 instead of Jan 5) is the same
    window grown, not a window the id moved on from: the purchases it counted stay counted,
    later ones go on counting, and a receipt before the old start still counts too."""
    first = challenge("2026-01-05T00:00:00+00:00", "2026-02-01T00:00:00+00:00")
    corrected = challenge("2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00")
    states: dict[str, ItemState] = {}

    assert replay(first, *(fact(datetime(2026, 1, d, 12, tzinfo=UTC)) for d in (6, 7)), states=states) == []
    awards = replay(corrected, fact(datetime(2026, 1, 10, 12, tzinfo=UTC)), states=states)

    assert [a.period for a in awards] == ["from-1767225600"]  # the third purchase completes it
    assert (states["monthly"].count, states["monthly"].period) == (3, "from-1767225600")
    assert replay(corrected, fact(datetime(2026, 1, 11, 12, tzinfo=UTC)), states=states) == []  # paid once

    fresh: dict[str, ItemState] = {}
    replay(first, fact(datetime(2026, 1, 6, 12, tzinfo=UTC)), states=fresh)
    replay(corrected, fact(datetime(2026, 1, 2, 12, tzinfo=UTC)), states=fresh)  # before the old start
    assert (fresh["monthly"].count, fresh["monthly"].period) == (2, "from-1767225600")


def test_a_join_stands_when_the_challenge_start_is_corrected_earlier_but_not_for_a_reused_id() -> None:
    def opt_in(starts: str, ends: str) -> Program:
        return game(challenges=[{"id": "vip", "name": "Two for members who joined", "starts": starts, "ends": ends,
                                 "purchases": 2, "opt_in": True, "reward": {"points": 120}}])  # fmt: skip

    first = opt_in("2026-01-05T00:00:00+00:00", "2026-02-01T00:00:00+00:00")
    corrected = opt_in("2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00")
    february = opt_in("2026-02-01T00:00:00+00:00", "2026-03-01T00:00:00+00:00")
    joined = {join_key(first.gamification.challenges[0]): 0}

    assert has_joined(joined, corrected.gamification.challenges[0])
    assert not has_joined(joined, february.gamification.challenges[0])
    states: dict[str, ItemState] = {}
    awards = [a for d in (10, 11) for a in apply(corrected, states, joined, fact(datetime(2026, 1, d, 12, tzinfo=UTC)))]
    assert [a.item_id for a in awards] == ["vip"]


def test_late_receipts_counted_under_the_version_before_a_correction_neither_pay_again_nor_undo_progress(
    tmp_path: Path,
) -> None:
    """Receipts are counted under the version in effect at their receipt time, so a late one
    from before the correction meets the old window. The overlapping windows are one challenge:
    it pays once, under the window it completed in, and its progress stays."""
    first = challenge("2026-01-05T00:00:00+00:00", "2026-02-01T00:00:00+00:00")
    corrected = challenge("2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00")
    store = GameStore(tmp_path / "game.sqlite")
    day = {d: datetime(2026, 1, d, 12, tzinfo=UTC) for d in range(1, 32)}

    got = [store.apply_event(first, fact(day[6]))]
    got += [store.apply_event(corrected, fact(day[d])) for d in (10, 11)]  # completes it
    got += [store.apply_event(first, fact(day[d])) for d in (7, 8, 9)]  # yesterday's legacy file

    awards = [a.key("test", "m-1") for found in got for a in found or []]
    assert awards == ["test:monthly:m-1:from-1767225600"]
    state = store.states("test", "m-1")["monthly"]
    assert (state.completions, state.period) == (1, "from-1767225600")
    assert [r.progress for r in store.board("test", "monthly", "from-1767225600", 0, 10)] == [3]
