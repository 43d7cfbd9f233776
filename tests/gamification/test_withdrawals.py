"""A purchase taken back (fully returned, or its fraud review rejected) takes back the progress
it gave and any award that progress no longer earns, in the store that keeps both: what other
purchases gave the same item stays, a purchase past a challenge's target stands in for a
withdrawn one, and an award earned again after a revocation gets a key of its own (the ledger
posts one key once)."""

from __future__ import annotations

import itertools
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from rules_svc.game_engine import ProgramHistory, PurchaseFact, week_of
from rules_svc.game_store import SCHEMA, GameStore
from rules_svc.program import Program
from tests.rules import load_doc, program_doc

MONDAY = datetime(2026, 1, 5, 12, tzinfo=UTC)
_ids = itertools.count()


def game(**items: list[dict[str, Any]]) -> Program:
    return load_doc(program_doc(gamification=items))


def fact(at: datetime = MONDAY, *, categories: tuple[str, ...] = ("misc",), member: str = "m-1",
         store: str = "HEL-01") -> PurchaseFact:  # fmt: skip
    n = next(_ids)
    return PurchaseFact(f"e{n}", member, f"p{n}", "pos", store, 1000, "EUR", at, categories)


def statuses(store: GameStore, member: str = "m-1") -> dict[str, str]:
    rows = store._db.execute("SELECT reward_key, status FROM game_rewards WHERE member_id=?", (member,)).fetchall()
    return dict(rows)


def as_before_returns(store: GameStore) -> None:
    """Makes the store one written before purchases' progress was kept per purchase."""
    store._db.execute("DROP TABLE game_counted")
    store._db.execute("PRAGMA user_version = 0")


@pytest.fixture
def store(tmp_path: Path) -> GameStore:
    return GameStore(tmp_path / "game.sqlite")


TRIO = {"id": "trio", "name": "Three in January", "starts": "2026-01-01T00:00:00+00:00",
        "ends": "2026-02-01T00:00:00+00:00", "purchases": 3, "reward": {"points": 200}}  # fmt: skip


def test_a_withdrawn_purchase_revokes_the_challenge_it_completed_and_a_new_one_earns_it_anew(
    store: GameStore,
) -> None:
    program = game(challenges=[TRIO])
    bought = [fact(MONDAY + timedelta(days=d)) for d in range(3)]
    for f in bought:
        store.apply_event(program, f)
    (paid_key,) = statuses(store)
    store.settle(paid_key, "PAID", "tx-1")

    revoked = store.withdraw_event(program, "ret-1", "m-1", bought[1].purchase_id)

    assert revoked == [paid_key]
    assert statuses(store) == {paid_key: "REVOKE"}
    assert store.revoking() and store.revoking()[0][1] == "tx-1"  # the transaction to reverse
    trio = store.states("test", "m-1")["trio"]
    assert (trio.count, trio.completions) == (2, 0)
    assert store.withdraw_event(program, "ret-1", "m-1", bought[1].purchase_id) is None  # redelivered

    again = store.apply_event(program, fact(MONDAY + timedelta(days=5)))
    assert [a.item_id for a in again or []] == ["trio"]
    assert statuses(store) == {paid_key: "REVOKE", f"{paid_key}#2": "PENDING"}
    assert [r.key for r in store.pending()] == [f"{paid_key}#2"]


def test_a_purchase_after_the_target_stands_in_for_a_withdrawn_one(store: GameStore) -> None:
    program = game(challenges=[TRIO])
    bought = [fact(MONDAY + timedelta(days=d)) for d in range(4)]
    for f in bought:
        store.apply_event(program, f)

    assert store.withdraw_event(program, "ret-1", "m-1", bought[0].purchase_id) == []
    assert list(statuses(store).values()) == ["PENDING"]
    trio = store.states("test", "m-1")["trio"]
    assert (trio.count, trio.completions) == (3, 1)
    # The stand-in now counts: taking back another leaves two, and the award goes.
    assert store.withdraw_event(program, "ret-2", "m-1", bought[3].purchase_id) != []
    assert store.states("test", "m-1")["trio"].count == 2
    board = store.board("test", "trio", "from-1767225600", 0, 10)
    assert [(r.member_id, r.progress) for r in board] == [("m-1", 2)]


def test_a_withdrawn_value_another_purchase_also_gave_stays(store: GameStore) -> None:
    program = game(achievements=[{"id": "three-cats", "name": "Three categories", "distinct": "category",
                                  "count": 3, "reward": {"points": 75}}])  # fmt: skip
    a = fact(categories=("food", "toys"))
    b = fact(categories=("books",))
    c = fact(categories=("toys",))
    d = fact(categories=("garden",))  # after completion: kept all the same
    for f in (a, b, c, d):
        store.apply_event(program, f)
    assert store.states("test", "m-1")["three-cats"].completions == 1

    assert store.withdraw_event(program, "w-a", "m-1", a.purchase_id) == []  # toys (c) and garden (d) remain
    state = store.states("test", "m-1")["three-cats"]
    assert (sorted(state.seen), state.completions) == (["books", "garden", "toys"], 1)
    assert store.withdraw_event(program, "w-d", "m-1", d.purchase_id) != []
    state = store.states("test", "m-1")["three-cats"]
    assert (sorted(state.seen), state.completions) == (["books", "toys"], 0)


def test_a_streak_whose_only_purchase_in_a_week_goes_back_is_revoked_and_one_that_kept_a_week_is_not(
    store: GameStore,
) -> None:
    program = game(streaks=[{"id": "weekly-3", "name": "Three weeks", "weeks": 3, "reward": {"points": 300}}])
    week1, week2a, week2b, week3 = (fact(MONDAY), fact(MONDAY + timedelta(days=7)),
                                    fact(MONDAY + timedelta(days=8)), fact(MONDAY + timedelta(days=14)))  # fmt: skip
    for f in (week1, week2a, week2b, week3):
        store.apply_event(program, f)
    (key,) = statuses(store)

    assert store.withdraw_event(program, "w-2a", "m-1", week2a.purchase_id) == []  # week 2 still has 2b
    assert store.withdraw_event(program, "w-2b", "m-1", week2b.purchase_id) == [key]
    state = store.states("test", "m-1")["weekly-3"]
    assert (state.completions, state.paid, state.run) == (0, [], 1)


def test_a_purchase_gamification_never_counted_changes_nothing(store: GameStore) -> None:
    program = game(challenges=[TRIO])
    counted = fact()
    store.apply_event(program, counted)
    before = store.states("test", "m-1")

    assert store.withdraw_event(program, "w-x", "m-1", "p-unknown") == []
    assert store.states("test", "m-1") == before
    assert store.counted_receipt("test", "m-1", "p-unknown") is None
    assert store.counted_receipt("test", "m-1", counted.purchase_id) == MONDAY


def test_progress_counted_before_purchases_were_kept_stays_when_a_later_purchase_goes(tmp_path: Path) -> None:
    """A store from before the upgrade: its values and weeks came from purchases no row names,
    and returning a newer purchase that gave the same store and week must not take them."""
    program = game(achievements=[{"id": "stores2", "name": "Two stores", "distinct": "store", "count": 2,
                                  "reward": {"points": 50}}],
                   streaks=[{"id": "w3", "name": "Three weeks", "weeks": 3, "reward": {"points": 300}}])  # fmt: skip
    old = GameStore(tmp_path / "game.sqlite")
    for i, store_id in enumerate(("HEL-01", "LIS-01", "LIS-01")):
        old.apply_event(program, PurchaseFact(f"old{i}", "m-1", f"old{i}", "pos", store_id, 1000, "EUR",
                                              MONDAY + timedelta(weeks=i)))  # fmt: skip
    as_before_returns(old)
    old.close()
    store = GameStore(tmp_path / "game.sqlite")
    assert sorted(statuses(store).values()) == ["PENDING", "PENDING"]
    later = PurchaseFact("new", "m-1", "new", "pos", "LIS-01", 1000, "EUR", MONDAY + timedelta(weeks=2, days=1))
    store.apply_event(program, later)

    assert store.withdraw_event(program, "w-new", "m-1", "new") == []
    states = store.states("test", "m-1")
    assert (sorted(states["stores2"].seen), len(states["w3"].weeks)) == (["HEL-01", "LIS-01"], 3)


def test_a_long_streak_keeps_its_award_for_weeks_forgotten_past_the_lateness_horizon(store: GameStore) -> None:
    program = load_doc(program_doc(policy={"max_lateness_days": 0}, gamification={
        "streaks": [{"id": "s5", "name": "Five weeks", "weeks": 5, "reward": {"points": 500}}]}))  # fmt: skip
    weeks = [fact(MONDAY + timedelta(weeks=w)) for w in range(13)]
    for f in weeks:
        store.apply_event(program, f)
    assert len(store.states("test", "m-1")["s5"].weeks) < 13  # the oldest are forgotten

    assert store.withdraw_event(program, "w-9", "m-1", weeks[9].purchase_id) == []  # weeks 0..8 still a run
    assert store.states("test", "m-1")["s5"].completions == 1


def test_a_return_counts_against_a_challenge_whose_start_was_corrected(store: GameStore) -> None:
    def trio(starts: str) -> Program:
        return game(challenges=[{**TRIO, "starts": starts}])

    later, earlier = trio("2026-01-10T00:00:00+00:00"), trio("2026-01-01T00:00:00+00:00")
    history = ProgramHistory.of([later, earlier])
    first, second, third = (fact(datetime(2026, 1, d, 12, tzinfo=UTC)) for d in (11, 12, 13))
    store.apply_event(later, first, history)
    store.apply_event(later, second, history)
    assert store.apply_event(earlier, third, history)  # completes, under the corrected window

    assert store.withdraw_event(later, "w-1", "m-1", first.purchase_id, history) != []
    trio_state = store.states("test", "m-1")["trio"]
    assert (trio_state.count, trio_state.completions) == (2, 0)


def test_two_streak_awards_joined_by_a_late_week_go_one_by_one(store: GameStore) -> None:
    program = game(streaks=[{"id": "w3", "name": "Three weeks", "weeks": 3, "reward": {"points": 300}}])
    week = {w: fact(MONDAY + timedelta(weeks=w)) for w in (1, 2, 3, 5, 6, 7, 4)}  # 4 arrives late, joins them
    for f in week.values():
        store.apply_event(program, f)
    first_run, second_run = sorted(statuses(store))
    assert store.states("test", "m-1")["w3"].completions == 2

    # Weeks 3-7 still hold one run: the award whose run began at week 1 goes.
    assert store.withdraw_event(program, "w-2", "m-1", week[2].purchase_id) == [first_run]
    assert store.withdraw_event(program, "w-6", "m-1", week[6].purchase_id) == []  # 3-5 is still a run
    assert store.states("test", "m-1")["w3"].completions == 1
    assert store.withdraw_event(program, "w-4", "m-1", week[4].purchase_id) == [second_run]
    assert store.states("test", "m-1")["w3"].completions == 0


def test_the_leaderboard_shows_when_the_target_is_reached_now(store: GameStore) -> None:
    program = game(challenges=[TRIO])
    mine = [fact(MONDAY + timedelta(days=d)) for d in range(4)]
    theirs = [fact(MONDAY + timedelta(days=d, hours=12), member="m-2") for d in range(3)]  # done half a day later
    for f in mine + theirs:
        store.apply_event(program, f)
    assert [r.member_id for r in store.board("test", "trio", "from-1767225600", 0, 10)] == ["m-1", "m-2"]

    store.withdraw_event(program, "w-3", "m-1", mine[2].purchase_id)  # the fourth (a day later) takes its place

    board = store.board("test", "trio", "from-1767225600", 0, 10)
    assert [(r.member_id, r.progress) for r in board] == [("m-2", 3), ("m-1", 3)]
    assert board[1].completed_us == int(mine[3].receipt_time.timestamp()) * 1_000_000


def test_an_item_id_counted_as_another_kind_of_item_then_is_left_alone(store: GameStore) -> None:
    was = game(achievements=[{"id": "x", "name": "Two stores", "distinct": "store", "count": 2,
                              "reward": {"points": 50}}])  # fmt: skip
    now = game(streaks=[{"id": "x", "name": "Three weeks", "weeks": 3, "reward": {"points": 300}}])
    bought = fact()
    store.apply_event(was, bought)

    assert store.withdraw_event(now, "w", "m-1", bought.purchase_id) == []


def test_an_award_counted_under_a_window_later_corrected_is_revoked_under_its_own_key(store: GameStore) -> None:
    """Completed under the window from 10 January; a correction to 1 January moves the member's
    progress to the corrected window; returns must still find the award keyed by the first."""

    def trio(starts: str) -> Program:
        return game(challenges=[{**TRIO, "starts": starts}])

    later, earlier = trio("2026-01-10T00:00:00+00:00"), trio("2026-01-01T00:00:00+00:00")
    history = ProgramHistory.of([later, earlier])
    bought = [fact(datetime(2026, 1, d, 12, tzinfo=UTC)) for d in (11, 12, 13)]
    for f in bought:
        store.apply_event(later, f, history)
    (paid,) = statuses(store)
    store.apply_event(earlier, fact(datetime(2026, 1, 20, 12, tzinfo=UTC)), history)  # a stand-in, corrected window

    store.withdraw_event(later, "w-1", "m-1", bought[0].purchase_id, history)
    assert store.withdraw_event(later, "w-2", "m-1", bought[1].purchase_id, history) == [paid]
    again = store.apply_event(earlier, fact(datetime(2026, 1, 25, 12, tzinfo=UTC)), history)
    assert again and [s for s in statuses(store).values()].count("PENDING") == 1  # one live award, not two


def test_a_week_taken_back_earlier_is_not_counted_as_forgotten(store: GameStore) -> None:
    program = game(streaks=[{"id": "w3", "name": "Three weeks", "weeks": 3, "reward": {"points": 300}}])
    week = {w: fact(MONDAY + timedelta(weeks=w)) for w in range(1, 7)}
    for f in week.values():
        store.apply_event(program, f)
    (key,) = statuses(store)

    assert store.withdraw_event(program, "w-1", "m-1", week[1].purchase_id) == []  # 2-6 still a run
    assert store.withdraw_event(program, "w-4", "m-1", week[4].purchase_id) == [key]  # 2,3 and 5,6 are not


def test_a_streak_stored_before_its_weeks_were_kept_keeps_them_through_the_upgrade(tmp_path: Path) -> None:
    program = game(streaks=[{"id": "w3", "name": "Three weeks", "weeks": 3, "reward": {"points": 300}}])
    old = GameStore(tmp_path / "game.sqlite")
    for w in range(3):
        old.apply_event(program, fact(MONDAY + timedelta(weeks=w)))
    as_before_returns(old)
    body = json.loads(old._db.execute("SELECT state FROM game_state").fetchone()[0])
    old._db.execute("UPDATE game_state SET state=?", (json.dumps({k: v for k, v in body.items() if k != "weeks"}),))
    old.close()
    store = GameStore(tmp_path / "game.sqlite")
    late = fact(MONDAY + timedelta(weeks=2, days=1))  # another purchase in the run's last week
    store.apply_event(program, late)

    assert store.withdraw_event(program, "w", "m-1", late.purchase_id) == []
    assert store.states("test", "m-1")["w3"].completions == 1


def test_an_upgrade_interrupted_before_it_committed_is_done_on_the_next_open(tmp_path: Path) -> None:
    program = game(achievements=[{"id": "stores2", "name": "Two stores", "distinct": "store", "count": 2,
                                  "reward": {"points": 50}}])  # fmt: skip
    old = GameStore(tmp_path / "game.sqlite")
    old.apply_event(program, fact(store="HEL-01"))
    old.apply_event(program, fact(store="LIS-01"))
    as_before_returns(old)
    old._db.executescript(SCHEMA)  # the new table made, the old progress not yet kept: then killed
    old.close()
    store = GameStore(tmp_path / "game.sqlite")
    later = fact(store="LIS-01")
    store.apply_event(program, later)

    assert store.withdraw_event(program, "w", "m-1", later.purchase_id) == []
    assert sorted(store.states("test", "m-1")["stores2"].seen) == ["HEL-01", "LIS-01"]


def test_weeks_an_id_counted_as_a_streak_are_not_distinct_values_when_it_is_an_achievement(store: GameStore) -> None:
    was = game(streaks=[{"id": "x", "name": "Three weeks", "weeks": 3, "reward": {"points": 300}}])
    now = game(achievements=[{"id": "x", "name": "Two stores", "distinct": "store", "count": 2,
                              "reward": {"points": 50}}])  # fmt: skip
    store.apply_event(was, fact(MONDAY - timedelta(weeks=1)))
    first, second = fact(store="HEL-01"), fact(store="LIS-01")
    store.apply_event(now, first)
    (key,) = [a.key("test", "m-1") for a in store.apply_event(now, second) or []]

    assert store.withdraw_event(now, "w", "m-1", second.purchase_id) == [key]


def test_an_achievement_keeps_no_more_values_than_its_count_after_a_return_and_still_revokes_on_time(
    store: GameStore,
) -> None:
    """A member with 60 purchases returns one: "five purchases" keeps five ids in its progress,
    not 59 (rewritten on every event), and still takes its award back exactly when fewer than
    five purchases remain, since what remains is read from the purchases kept, not the progress."""
    program = game(achievements=[{"id": "five", "name": "Five purchases", "count": 5, "reward": {"points": 50}}])
    bought = [fact(MONDAY + timedelta(hours=h)) for h in range(60)]
    for f in bought:
        store.apply_event(program, f)

    assert store.withdraw_event(program, "w-0", "m-1", bought[1].purchase_id) == []
    body = store._db.execute("SELECT state FROM game_state WHERE item_id='five'").fetchone()[0]
    assert (len(json.loads(body)["seen"]), store.states("test", "m-1")["five"].completions) == (5, 1)

    for n, f in enumerate(bought[2:56]):  # 55 returned in all: five remain, the award stays
        assert store.withdraw_event(program, f"w-{n + 1}", "m-1", f.purchase_id) == []
    state = store.states("test", "m-1")["five"]
    remaining = [f.purchase_id for f in (bought[0], *bought[56:])]
    assert (sorted(state.seen), state.completions) == (sorted(remaining), 1)
    assert store.withdraw_event(program, "w-last", "m-1", bought[0].purchase_id) != []  # four left: revoked
    assert store.states("test", "m-1")["five"].completions == 0


def _live(store: GameStore, member: str = "m-1") -> list[str]:
    """The member's award periods not taken back (`run-<week>` for a streak)."""
    keys = [k for k, status in statuses(store, member).items() if status not in ("REVOKE", "REVOKED")]
    return sorted(k.removeprefix(f"test:w3:{member}:") for k in keys)


def test_a_week_returned_from_the_middle_of_a_paid_streak_leaves_two_streaks_paid_as_if_never_bought(
    store: GameStore,
) -> None:
    """Weeks 1-7 are one streak of three weeks, paid once. Returning week 4 leaves 1-3 and 5-7:
    two streaks, as m-2's weeks 1-3 and 5-8, never with a week 4, are. The first keeps its award,
    the second is paid under its own key, and buying week 8 pays nothing more; returning week 6
    then takes back the second streak's award only."""
    program = game(streaks=[{"id": "w3", "name": "Three weeks", "weeks": 3, "reward": {"points": 300}}])
    when = {w: MONDAY + timedelta(weeks=w - 1) for w in range(1, 9)}
    run = {w: f"run-{week_of(when[w].date())}" for w in when}
    for w in (1, 2, 3, 5, 6, 7, 8):
        store.apply_event(program, fact(when[w], member="m-2"))
    assert _live(store, "m-2") == [run[1], run[5]]
    bought = {w: fact(when[w]) for w in when}
    for w in range(1, 8):
        store.apply_event(program, bought[w])
    assert _live(store) == [run[1]]

    assert store.withdraw_event(program, "w-4", "m-1", bought[4].purchase_id) == []
    assert store.apply_event(program, bought[8]) == []
    assert _live(store) == _live(store, "m-2") == [run[1], run[5]]
    assert store.states("test", "m-1")["w3"].completions == 2
    assert {r.key.removeprefix("test:w3:m-1:") for r in store.pending("m-1")} == {run[1], run[5]}

    assert store.withdraw_event(program, "w-6", "m-1", bought[6].purchase_id) == [f"test:w3:m-1:{run[5]}"]
    assert _live(store) == [run[1]]
    assert store.states("test", "m-1")["w3"].completions == 1


def test_a_run_whose_first_week_went_back_keeps_its_award_and_a_later_return_still_finds_it(
    store: GameStore,
) -> None:
    """Weeks 1-9 paid under run-1; week 1 goes back: 2-9 keep that award (nothing new is paid).
    Week 5 going back then splits 2-4 and 6-9: the award stays with 2-4 and 6-9 is paid; week 3
    going back after that takes the old award back, the one 6-9 earned stays."""
    program = game(streaks=[{"id": "w3", "name": "Three weeks", "weeks": 3, "reward": {"points": 300}}])
    bought = {w: fact(MONDAY + timedelta(weeks=w - 1)) for w in range(1, 10)}
    run = {w: f"run-{week_of(f.receipt_time.date())}" for w, f in bought.items()}
    for f in bought.values():
        store.apply_event(program, f)

    assert store.withdraw_event(program, "w-1", "m-1", bought[1].purchase_id) == []
    assert _live(store) == [run[1]]
    assert store.withdraw_event(program, "w-5", "m-1", bought[5].purchase_id) == []
    assert _live(store) == [run[1], run[6]]
    assert store.withdraw_event(program, "w-3", "m-1", bought[3].purchase_id) == [f"test:w3:m-1:{run[1]}"]
    assert _live(store) == [run[6]]
    assert store.states("test", "m-1")["w3"].completions == 1


def _runs_of(weeks: set[int], length: int) -> int:
    """How many separate runs of at least `length` consecutive weeks `weeks` holds."""
    return sum(1 for w in weeks if w - 1 not in weeks and all(w + i in weeks for i in range(length)))


def test_a_streak_holds_one_award_per_run_the_remaining_purchases_make_on_seeded_random_returns(
    tmp_path: Path,
) -> None:
    """Purchases week after week (none, one or two a week), some taken back at random in between:
    after every step the live awards are as many as the runs of the weeks still bought (each
    such run is paid once), and `completions` says the same; nothing is forgotten (the lateness
    covers every week)."""
    for seed in range(40):
        rnd = random.Random(seed)
        length = rnd.choice([2, 3, 4])
        program = load_doc(program_doc(policy={"max_lateness_days": 400}, gamification={"streaks": [
            {"id": "w3", "name": "A run", "weeks": length, "reward": {"points": 10}}]}))  # fmt: skip
        store = GameStore(tmp_path / f"game-{seed}.sqlite")
        week_of_purchase: dict[str, int] = {}
        for w in range(20):
            for _ in range(rnd.choice([0, 1, 1, 1, 2])):
                bought = fact(MONDAY + timedelta(weeks=w, hours=rnd.randrange(100)))
                store.apply_event(program, bought)
                week_of_purchase[bought.purchase_id] = w
            while week_of_purchase and rnd.random() < 0.4:
                returned = rnd.choice(sorted(week_of_purchase))
                store.withdraw_event(program, f"return-{returned}", "m-1", returned)
                del week_of_purchase[returned]
            runs = _runs_of(set(week_of_purchase.values()), length)
            state = store.states("test", "m-1").get("w3")
            assert (len(_live(store)), state.completions if state else 0) == (runs, runs), (seed, w)
        store.close()


KIND_STREAK = {"streaks": [{"id": "x", "name": "Three weeks", "weeks": 3, "reward": {"points": 300}}]}
KIND_ACHIEVEMENT = {"achievements": [{"id": "x", "name": "First purchase", "reward": {"points": 50}}]}
KIND_CHALLENGE = {"challenges": [{"id": "x", "name": "Two in January", "starts": "2026-01-01T00:00:00+00:00",
                             "ends": "2026-02-01T00:00:00+00:00", "purchases": 2, "reward": {"points": 200}}]}  # fmt: skip
KIND_TWO_STORES = {"achievements": [{"id": "x", "name": "Two stores", "distinct": "store", "count": 2,
                                "reward": {"points": 50}}]}  # fmt: skip
# 2026-01-05 (MONDAY) and the days before it are inside CHALLENGE's January window.
KIND_FIRST_WEEK = datetime(2026, 1, 2, 12, tzinfo=UTC)


@pytest.mark.parametrize(("was", "was_purchases", "now", "now_purchases", "points"), [
    # a streak completed under v1; v2 makes "x" an achievement: two stores
    (KIND_STREAK, [MONDAY - timedelta(weeks=w) for w in (3, 2, 1)], KIND_TWO_STORES, 2, 50),
    # an achievement completed on 2 January under v1; v2 makes "x" January's challenge of two
    (KIND_ACHIEVEMENT, [KIND_FIRST_WEEK], KIND_CHALLENGE, 2, 200),
    # January's challenge completed under v1; v2 makes "x" an achievement: two stores
    (KIND_CHALLENGE, [KIND_FIRST_WEEK, KIND_FIRST_WEEK + timedelta(hours=1)], KIND_TWO_STORES, 2, 50),
])  # fmt: skip
def test_an_id_a_later_version_gives_another_kind_of_item_is_earned_like_a_new_item(
    store: GameStore, was: dict[str, Any], was_purchases: list[datetime], now: dict[str, Any], now_purchases: int,
    points: int,
) -> None:  # fmt: skip
    """m-1 completed "x" as v1 had it (and was paid); v2 makes "x" another kind of item. m-1 and
    m-2 (who never bought under v1) then do the same: what v2's item asks. Both must be paid
    v2's reward: what m-1 completed was another item (its withdrawals already treat it so:
    test_withdrawals.py, "an item id counted as another kind of item")."""
    v1, v2 = game(**was), game(**now)
    for when in was_purchases:
        store.apply_event(v1, fact(when))
    assert store.states("test", "m-1")["x"].completions == 1  # v1's item done and paid
    got: dict[str, list[int]] = {"m-1": [], "m-2": []}
    for i in range(now_purchases):
        for member in got:
            bought = fact(MONDAY + timedelta(hours=i), member=member, store=("HEL-01", "LIS-01")[i % 2])
            got[member] += [a.points for a in store.apply_event(v2, bought) or []]
    assert got["m-2"] == [points]
    assert got["m-1"] == [points]  # v1's completion was taken for v2's item's, which paid nothing


def test_a_late_receipt_under_the_version_where_the_id_was_another_kind_leaves_the_current_item_alone(
    store: GameStore,
) -> None:
    """v1 (January) has "x" as an achievement, v2 (from February) as a three-week streak, paid.
    A late January receipt is counted under v1: it must neither wipe the streak's progress (an
    unbroken six-week run was then paid twice) nor pay the old item."""
    v1 = game(achievements=[{"id": "x", "name": "First purchase", "reward": {"points": 50}}])
    v2 = game(streaks=[{"id": "x", "name": "Three weeks", "weeks": 3, "reward": {"points": 300}}])
    history = ProgramHistory.of([v1, v2])
    feb2 = datetime(2026, 2, 2, 12, tzinfo=UTC)  # a Monday
    paid: list[int] = []
    for w in range(3):
        paid += [a.points for a in store.apply_event(v2, fact(feb2 + timedelta(weeks=w)), history) or []]
    assert paid == [300]
    late = store.apply_event(v1, fact(datetime(2026, 1, 30, 12, tzinfo=UTC)), history)
    assert late == []
    for w in range(3, 6):
        paid += [a.points for a in store.apply_event(v2, fact(feb2 + timedelta(weeks=w)), history) or []]
    assert paid == [300]  # one unbroken run of six weeks: paid once
