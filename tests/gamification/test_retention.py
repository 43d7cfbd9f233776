"""Retention: the gamification store forgets what no event can still need, on event time.

A purchase taken back later than `final_after_days` after its receipt keeps its progress; event
ids older than retention are forgotten, and events from before then are refused rather than
counted a second time; what a purchase gave is forgotten once it is final and no accepted event
can take it back, keeping what a later withdrawal still reads (an achievement's values, a
streak's recent weeks, the places of a challenge whose windows still run).
"""

from __future__ import annotations

import itertools
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pointmesh.events import BusMessage
from pointmesh.v1 import ledger_pb2
from rules_svc.game_engine import ProgramHistory, PurchaseFact
from rules_svc.game_store import Forgotten, GameStore, PastRetention
from rules_svc.game_worker import GameWorker
from rules_svc.program import Program, ProgramInvalid
from tests.conftest import LedgerUnderTest
from tests.gamification.conftest import handler, rejected_review
from tests.ledger.helpers import balance, create_member
from tests.rules import load_doc, program_doc

AT = datetime(2026, 1, 7, 12, tzinfo=UTC)
RETENTION = timedelta(days=35)
_ids = itertools.count()


def _program(final_after_days: int = 30, **items: list[dict[str, Any]]) -> Program:
    return load_doc(program_doc(gamification={**items, "final_after_days": final_after_days}))


TRIO = {"id": "trio", "name": "Three in January", "starts": "2026-01-01T00:00:00+00:00",
        "ends": "2026-02-01T00:00:00+00:00", "purchases": 3, "reward": {"points": 200}}  # fmt: skip


def _fact(member: str, at: datetime, store: str = "HEL-01") -> PurchaseFact:
    n = next(_ids)
    return PurchaseFact(f"e{n}", member, f"p{n}", "pos", store, 1000, "EUR", at)


def _worker(store: GameStore, program: Program, ledger: LedgerUnderTest | None = None) -> GameWorker:
    return handler(store, program, ledger, RETENTION)


def _rows(store: GameStore, table: str, where: str = "1", args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    return store._db.execute(f"SELECT * FROM {table} WHERE {where}", args).fetchall()


@pytest.mark.parametrize(("days_later", "revoked"), [(29, True), (31, False)])
async def test_a_purchase_taken_back_after_final_after_days_keeps_its_progress_and_reward(
    tmp_path: Path, ledger: LedgerUnderTest, days_later: int, revoked: bool
) -> None:
    """The rejection's own time decides, against the receipt: a replay decides the same."""
    program = _program(30, challenges=[TRIO])
    store = GameStore(tmp_path / "game.sqlite")
    member = (await create_member(ledger.stub)).member_id
    bought = [_fact(member, AT + timedelta(hours=i)) for i in range(3)]
    for f in bought:
        store.apply_event(program, f, occurred_at=f.receipt_time)
    worker = _worker(store, program, ledger)
    assert await worker.pay() == 1

    taken_back = bought[1].receipt_time + timedelta(days=days_later)
    await worker.handle(rejected_review("ev-r", member, bought[1].purchase_id, taken_back))

    assert store.states(program.program, member)["trio"].count == (2 if revoked else 3)
    assert (await balance(ledger.stub, member)).balance_points == (0 if revoked else 200)


async def test_an_event_from_before_what_retention_forgot_is_refused_not_counted_again(tmp_path: Path) -> None:
    program = _program(30, challenges=[{**TRIO, "purchases": 10, "ends": "2027-01-01T00:00:00+00:00"}])
    store = GameStore(tmp_path / "game.sqlite")
    old, recent, newest = _fact("m-1", AT), _fact("m-1", AT + timedelta(days=20)), _fact("m-1", AT + timedelta(days=40))
    for f in (old, recent, newest):
        assert store.apply_event(program, f, occurred_at=f.receipt_time) == []

    forgotten = await _worker(store, program).forget()  # what the consumer runs hourly

    assert forgotten.events == 1  # the newest event is day 40: day 0 is past 35 days, day 20 is not
    assert [r[0] for r in _rows(store, "game_events")] == sorted([recent.event_id, newest.event_id])
    with pytest.raises(PastRetention):
        store.apply_event(program, old, occurred_at=old.receipt_time)
    assert store.apply_event(program, recent, occurred_at=recent.receipt_time) is None  # still known: a duplicate
    assert store.states(program.program, "m-1")["trio"].count == 3
    # The consumer logs it and goes on (acknowledged: handling it again cannot tell more).
    event = ledger_pb2.LedgerEvent(event_id=old.event_id, member_id="m-1", purchase_recorded=ledger_pb2.PurchaseRecorded(
        purchase_id=old.purchase_id, channel="pos", store_id="HEL-01"))  # fmt: skip
    event.purchase_recorded.receipt_time.FromDatetime(old.receipt_time)
    event.purchase_recorded.total.amount_minor, event.purchase_recorded.total.currency = 1000, "EUR"
    event.occurred_at.FromDatetime(old.receipt_time)
    await _worker(store, program).handle(
        BusMessage("1-0", "m-1", old.event_id, "purchase_recorded", event.SerializeToString())
    )
    assert store.states(program.program, "m-1")["trio"].count == 3


def test_a_value_another_final_purchase_gave_still_stands_after_its_rows_are_forgotten(tmp_path: Path) -> None:
    """Two stores: day 0 at HEL, day 100 at LIS (completed), day 101 at HEL. Once day 0 is final
    and forgotten, returning day 101 leaves HEL given (by no purchase now), so the award stays;
    returning day 100 then revokes it."""
    program = _program(30, achievements=[{"id": "stores2", "name": "Two stores", "distinct": "store", "count": 2,
                                          "reward": {"points": 50}}])  # fmt: skip
    store = GameStore(tmp_path / "game.sqlite")
    first = _fact("m-1", AT)
    second = _fact("m-1", AT + timedelta(days=100), "LIS-01")
    third = _fact("m-1", AT + timedelta(days=101))
    for f in (first, second, third):
        store.apply_event(program, f, occurred_at=f.receipt_time)

    forgotten = store.forget(program.program, ProgramHistory.of([program]), RETENTION)
    again = store.forget(program.program, ProgramHistory.of([program]), RETENTION)  # the hour after

    assert (forgotten.counted, again.counted) == (1, 0)
    assert _rows(store, "game_counted", "purchase_id=?", (first.purchase_id,)) == []
    assert [r[2:5] for r in _rows(store, "game_counted", "purchase_id=''")] == [("", "stores2", "HEL-01")]
    assert store.withdraw_event(program, "w1", "m-1", third.purchase_id) == []
    assert store.states(program.program, "m-1")["stores2"].completions == 1
    assert store.withdraw_event(program, "w2", "m-1", second.purchase_id) == ["test:stores2:m-1:once"]


def test_retention_forgets_places_once_their_challenge_run_ended_and_keeps_an_achievements_count_at_most(
    tmp_path: Path,
) -> None:
    """January's places go once January is past final and retention; the places of a year-long
    challenge stay while it runs (a withdrawal there reads them, stand-ins included). A distinct-
    day achievement of two keeps two of its final days, not one per day ever bought; experiment
    purchases of final purchases go."""
    year = {**TRIO, "id": "year", "name": "A year of it", "ends": "2027-01-01T00:00:00+00:00", "purchases": 50}
    days2 = {"id": "days2", "name": "Two days", "distinct": "day", "count": 2, "reward": {"points": 5}}
    program = _program(30, challenges=[TRIO, year], achievements=[days2])
    store = GameStore(tmp_path / "game.sqlite")
    january = [_fact("m-1", AT + timedelta(days=i)) for i in range(5)]
    for f in january:
        store.apply_event(program, f, occurred_at=f.receipt_time)
    store._db.execute("INSERT INTO experiment_purchases VALUES ('test','m-1',?,'x','s','a',10,?)",
                      (january[0].purchase_id, int(AT.timestamp() * 1_000_000)))  # fmt: skip
    late = _fact("m-1", AT + timedelta(days=150))  # newest event: day 150
    store.apply_event(program, late, occurred_at=late.receipt_time)

    store.forget(program.program, ProgramHistory.of([program]), RETENTION)

    items = {(r[3], r[2] == "") for r in _rows(store, "game_counted")}
    assert ("trio", False) not in items  # January's run ended before day 150 - 65
    kept_year = [r for r in _rows(store, "game_counted", "item_id='year'")]
    assert {r[2] for r in kept_year} == {f.purchase_id for f in (*january, late)}
    assert len(_rows(store, "game_counted", "item_id='days2' AND purchase_id=''")) == 2
    assert _rows(store, "experiment_purchases") == []


def test_a_streaks_final_weeks_are_kept_only_while_a_purchase_that_can_be_taken_back_shares_them(
    tmp_path: Path,
) -> None:
    program = _program(30, streaks=[{"id": "w3", "name": "Three weeks", "weeks": 3, "reward": {"points": 300}}])
    store = GameStore(tmp_path / "game.sqlite")
    weekly = [_fact("m-1", AT + timedelta(weeks=i)) for i in range(20)]
    for f in weekly:
        store.apply_event(program, f, occurred_at=f.receipt_time)

    store.forget(program.program, ProgramHistory.of([program]), RETENTION)

    # Newest is day 133: final before day 133 - 65 = day 68, a Monday. The ten purchases from day
    # 70 on can still be taken back; of the final ones only the week before day 68's is kept (as
    # given by no purchase: the margin for the program's zone), older weeks go.
    folded = sorted(int(r[4]) for r in _rows(store, "game_counted", "purchase_id=''"))
    kept = sorted(int(r[4]) for r in _rows(store, "game_counted", "purchase_id!=''"))
    assert len(kept) == 10
    assert folded == [kept[0] - 1]


def test_an_event_dated_past_this_clock_does_not_have_every_later_event_refused(tmp_path: Path) -> None:
    """A ledger clock gone wrong once (2099) must not make retention's "now" 2099; and with no
    version to say how long purchases stay open, their rows stay."""
    program = _program(30, achievements=[{"id": "stores2", "name": "Two stores", "distinct": "store", "count": 2,
                                          "reward": {"points": 50}}])  # fmt: skip
    store = GameStore(tmp_path / "game.sqlite")
    today = datetime.now(UTC)
    for days in (100, 10):
        f = _fact("m-1", today - timedelta(days=days))
        store.apply_event(program, f, occurred_at=f.receipt_time)
    wrong = _fact("m-1", datetime(2099, 1, 1, tzinfo=UTC))
    store.apply_event(program, wrong, occurred_at=wrong.receipt_time)

    # The event 100 days old is forgotten (35 days' retention from this clock, plus a day's
    # tolerance); no purchase's row goes without a version saying when purchases are final.
    assert store.forget(program.program, ProgramHistory.of([]), RETENTION) == Forgotten(1, 0, 0)

    later = _fact("m-1", today - timedelta(days=5))
    assert store.apply_event(program, later, occurred_at=later.receipt_time) == []  # counted, not refused
    assert len(_rows(store, "game_events")) == 3
    assert len(_rows(store, "game_counted")) == 4


def test_event_ids_of_a_store_from_before_retention_are_dated_at_the_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "game.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE game_events (event_id TEXT PRIMARY KEY, member_id TEXT NOT NULL) WITHOUT ROWID")
    db.execute("INSERT INTO game_events VALUES ('e-old', 'm-1')")
    db.commit()
    db.close()
    before = datetime.now(UTC)

    store = GameStore(path)

    (occurred_us,) = store._db.execute("SELECT occurred_us FROM game_events WHERE event_id='e-old'").fetchone()
    assert before.timestamp() * 1_000_000 <= occurred_us <= datetime.now(UTC).timestamp() * 1_000_000
    program = _program(30, challenges=[TRIO])
    store.forget(program.program, ProgramHistory.of([program]), RETENTION)
    redelivered = PurchaseFact("e-old", "m-1", "p-old", "pos", "HEL-01", 1000, "EUR", AT)
    assert store.apply_event(program, redelivered, occurred_at=AT) is None  # known, not refused


@pytest.mark.parametrize("days", [0, 3661, True])
def test_final_after_days_out_of_range_is_refused_by_its_path(days: object) -> None:
    with pytest.raises(ProgramInvalid) as refused:
        load_doc(program_doc(gamification={"final_after_days": days}))
    assert "gamification.final_after_days" in str(refused.value)
