"""Challenges and streaks when a later program version changes them: a start corrected, a
window cut short and its id reused, the lateness policy tightened.

In process, as rules_svc wires them: the version store and rules service, the game store and
service, and the gamification worker fed the ledger's purchase events, paying rewards through a
real ledger (real SQLite, a real redis-server behind the ledger's outbox).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from pointmesh.clock import ManualClock
from pointmesh.events import BusMessage
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import common_pb2, ledger_pb2
from rules_svc.game_service import GameService
from rules_svc.game_store import GameStore
from rules_svc.game_worker import GameWorker
from rules_svc.service import RulesService
from rules_svc.versions import VersionStore
from tests.conftest import LedgerUnderTest
from tests.ledger.helpers import create_member
from tests.rules import program_doc

_ids = itertools.count()
DECEMBER = datetime(2025, 12, 1, tzinfo=UTC)  # the first version's start


def at(month: int, day: int) -> datetime:
    return datetime(2026, month, day, 12, tzinfo=UTC)


@dataclass
class Versions:
    """Publishes versions of program "test" and counts purchases the way the consumer does."""

    clock: ManualClock
    rules: RulesService
    game: GameService
    worker: GameWorker
    ledger: LedgerUnderTest

    async def publish(self, doc: dict[str, Any], effective_from: datetime) -> None:
        await self.rules.publish("test", f"v-{next(_ids)}", yaml.safe_dump(doc, sort_keys=False), "yaml",
                                 effective_from, "test", backdated=True)  # fmt: skip

    async def member(self) -> str:
        return (await create_member(self.ledger.stub)).member_id

    async def buy(self, member_id: str, receipt_time: datetime) -> None:
        n = next(_ids)
        event = ledger_pb2.LedgerEvent(
            event_id=f"ev-{n}", member_id=member_id,
            purchase_recorded=ledger_pb2.PurchaseRecorded(
                purchase_id=f"p-{n}", channel="pos", store_id="HEL-01", receipt_time=to_timestamp(receipt_time),
                total=common_pb2.Money(currency="EUR", amount_minor=1000),
            ),
        )  # fmt: skip
        await self.worker.handle(BusMessage(f"{n}-0", member_id, f"ev-{n}", "purchase_recorded",
                                            event.SerializeToString()))  # fmt: skip

    def rewards(self, member_id: str) -> dict[str, int]:
        """Reward points by status (PAID once the ledger posted them)."""
        return self.game.store.reward_totals("test", member_id)

    async def balance(self, member_id: str) -> int:
        found = await self.ledger.stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=member_id))
        return found.balance.balance_points


@pytest.fixture
async def versions(tmp_path: Path, ledger: LedgerUnderTest) -> AsyncIterator[Versions]:
    clock = ManualClock(DECEMBER)
    rules = RulesService(VersionStore(tmp_path / "programs.db"), clock)
    game = GameService(rules, GameStore(tmp_path / "gamification.db"), clock)
    worker = GameWorker(game.store, game.program_at, "test", bus=None,  # type: ignore[arg-type]
                        ledger=ledger.stub, consumer="test")  # fmt: skip
    yield Versions(clock, rules, game, worker, ledger)
    game.store.close()
    rules.versions.close()


def monthly(starts: str, ends: str) -> dict[str, Any]:
    return program_doc(channels=["pos", "app", "web"], gamification={"challenges": [{
        "id": "monthly", "name": "Three this month", "starts": starts, "ends": ends,
        "purchases": 3, "reward": {"points": 200}}]})  # fmt: skip


async def test_members_counted_before_a_start_was_corrected_stay_on_the_leaderboard(versions: Versions) -> None:
    """v2 corrects January's start from the 1st to the 2nd: the same challenge, so alice and bob,
    counted under v1, rank with carol, counted under v2."""
    await versions.publish(monthly("2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00"), DECEMBER)
    alice, bob, carol = [await versions.member() for _ in range(3)]
    for day in (3, 4):
        await versions.buy(alice, at(1, day))
        await versions.buy(bob, at(1, day))
    await versions.publish(monthly("2026-01-02T00:00:00+00:00", "2026-02-01T00:00:00+00:00"),
                           datetime(2026, 1, 5, tzinfo=UTC))  # fmt: skip
    await versions.buy(carol, at(1, 6))
    await versions.buy(alice, at(1, 6))  # her third: completes it, still under the window she began in
    versions.clock.set(at(1, 7))

    board = await versions.game.leaderboard("test", "monthly", 10)

    assert [(rank, row.member_id, row.progress) for rank, row in board] == [(1, alice, 3), (2, bob, 2), (3, carol, 1)]
    assert board[0][1].completed_us is not None
    assert await versions.balance(alice) == 200


async def test_a_streak_forgotten_under_a_shorter_lateness_is_not_paid_again_by_a_late_receipt(
    versions: Versions,
) -> None:
    """Weekly purchases from 5 January to 9 February are one unbroken six-week streak. A version
    effective in March cuts max_lateness_days from 60 to 7; the receipt of 26 January, uploaded on
    9 March, is handled under the 60 days in effect on 26 January and joins the run already paid."""

    def weekly(lateness_days: int) -> dict[str, Any]:
        doc = program_doc(channels=["pos", "app", "web"], gamification={"streaks": [
            {"id": "weekly-3", "name": "Three weeks in a row", "weeks": 3, "reward": {"points": 300}}]})  # fmt: skip
        doc["policy"] = {"max_lateness_days": lateness_days}
        return doc

    await versions.publish(weekly(60), DECEMBER)
    await versions.publish(weekly(7), datetime(2026, 3, 1, tzinfo=UTC))
    member = await versions.member()
    for month, day in ((1, 5), (1, 12), (1, 19), (2, 2), (2, 9), (3, 9)):  # Mondays; 26 January at an offline till
        await versions.buy(member, at(month, day))

    await versions.buy(member, at(1, 26))

    assert versions.rewards(member) == {"PAID": 300}
    assert await versions.balance(member) == 300


async def test_a_challenge_cut_short_then_its_id_reused_pays_each_month_once(versions: Versions) -> None:
    """v1: 1 January - 15 February; v2 cuts it to end on 1 February; v3 reuses the id for
    February. The member bought nothing under v2, yet February is a new challenge, not January's
    corrected: it starts at zero and pays again."""
    await versions.publish(monthly("2026-01-01T00:00:00+00:00", "2026-02-15T00:00:00+00:00"), DECEMBER)
    await versions.publish(monthly("2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00"),
                           datetime(2026, 1, 20, tzinfo=UTC))  # fmt: skip
    await versions.publish(monthly("2026-02-01T00:00:00+00:00", "2026-03-01T00:00:00+00:00"),
                           datetime(2026, 2, 1, tzinfo=UTC))  # fmt: skip
    member = await versions.member()
    for day in (5, 6, 7):
        await versions.buy(member, at(1, day))
    versions.clock.set(at(2, 1))

    on_first_of_february = await versions.game.progress("test", member)
    for day in (2, 3, 4):
        await versions.buy(member, at(2, day))
    await versions.buy(member, at(1, 8))  # January's, late: the member has moved on to February

    assert [(i.progress, i.completions) for i in on_first_of_february.items] == [(0, 0)]
    assert versions.rewards(member) == {"PAID": 400}  # January's and February's, 200 each
    assert await versions.balance(member) == 400
    assert [(row.member_id, row.progress) for _, row in await versions.game.leaderboard("test", "monthly", 10)] == [
        (member, 3)
    ]


def opt_in_monthly(starts: str, ends: str) -> dict[str, Any]:
    doc = monthly(starts, ends)
    doc["gamification"]["challenges"][0] |= {"opt_in": True, "purchases": 2}
    return doc


async def test_a_join_made_before_a_start_was_corrected_later_still_counts(versions: Versions) -> None:
    """The member joins January's opt-in challenge under v1 (from the 1st); v2 corrects its start
    to the 2nd. The windows overlap, so it is the same challenge and the join stands: her
    purchases count, it pays, and her progress shows her joined. v3 reuses the id for February,
    a window that overlaps neither: a new challenge she has not joined."""
    await versions.publish(opt_in_monthly("2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00"), DECEMBER)
    member = await versions.member()
    versions.clock.set(at(1, 1))
    await versions.game.join("test", "monthly", member)
    await versions.publish(opt_in_monthly("2026-01-02T00:00:00+00:00", "2026-02-01T00:00:00+00:00"),
                           datetime(2026, 1, 5, tzinfo=UTC))  # fmt: skip
    for day in (6, 7):
        await versions.buy(member, at(1, day))
    versions.clock.set(at(1, 8))

    in_january = await versions.game.progress("test", member)

    assert [(i.joined, i.progress, i.completions) for i in in_january.items] == [(True, 2, 1)]
    assert versions.rewards(member) == {"PAID": 200}
    assert await versions.balance(member) == 200

    await versions.publish(opt_in_monthly("2026-02-01T00:00:00+00:00", "2026-03-01T00:00:00+00:00"),
                           datetime(2026, 2, 1, tzinfo=UTC))  # fmt: skip
    for day in (2, 3):
        await versions.buy(member, at(2, day))
    versions.clock.set(at(2, 4))

    in_february = await versions.game.progress("test", member)

    assert [(i.joined, i.progress, i.completions) for i in in_february.items] == [(False, 0, 0)]
    assert versions.rewards(member) == {"PAID": 200}


def _challenge(purchases: int, **more: Any) -> dict[str, Any]:
    return program_doc(channels=["pos", "app", "web"], gamification={"challenges": [{
        "id": "monthly", "name": "Purchases this month", "starts": "2026-01-01T00:00:00+00:00",
        "ends": "2026-02-01T00:00:00+00:00", "purchases": purchases, "reward": {"points": 200}, **more}]})  # fmt: skip


async def _full_return(v: Versions, member_id: str, purchase_id: str, event_id: str, when: datetime) -> None:
    event = ledger_pb2.LedgerEvent(event_id=event_id, member_id=member_id, purchase_returned=ledger_pb2.PurchaseReturned(
        purchase_id=purchase_id, return_key=event_id, fully_returned=True))  # fmt: skip
    event.occurred_at.FromDatetime(when)
    await v.worker.handle(BusMessage("1-0", member_id, event_id, "purchase_returned", event.SerializeToString()))


def _purchases(v: Versions, member_id: str) -> list[str]:
    rows = v.game.store._db.execute(
        "SELECT DISTINCT purchase_id FROM game_counted WHERE member_id=? ORDER BY receipt_us", (member_id,)
    )
    return [r[0] for r in rows]


async def test_a_return_judges_the_award_by_the_target_it_was_earned_under(versions: Versions) -> None:
    """v1 asks for three January purchases; v2 (effective 10 January) lowers it to two. Alice
    and Bob buy on 5, 12 and 13 January: the 12th completes it under v2, the 13th stands in.
    Alice returns the purchase of the 5th, Bob the one of the 12th: both keep two January
    purchases, what the award was earned for. Alice's return was judged by v1's three (the
    version at its receipt) and took her 200 points back."""
    await versions.publish(_challenge(3), DECEMBER)
    await versions.publish(_challenge(2), datetime(2026, 1, 10, tzinfo=UTC))
    alice, bob = await versions.member(), await versions.member()
    for member in (alice, bob):
        for day in (5, 12, 13):
            await versions.buy(member, at(1, day))
        assert versions.rewards(member) == {"PAID": 200}

    await _full_return(versions, alice, _purchases(versions, alice)[0], "ret-alice", at(1, 14))
    await _full_return(versions, bob, _purchases(versions, bob)[1], "ret-bob", at(1, 14))

    assert versions.rewards(bob) == {"PAID": 200}
    assert versions.rewards(alice) == {"PAID": 200}
    assert await versions.balance(alice) == 200


async def test_a_return_still_revokes_an_award_what_remains_falls_short_of(versions: Versions) -> None:
    """The same two versions; a member buys on the 12th and 13th only (completed under v2's two)
    and returns one: one purchase is left, short of the two it was earned for."""
    await versions.publish(_challenge(3), DECEMBER)
    await versions.publish(_challenge(2), datetime(2026, 1, 10, tzinfo=UTC))
    alice = await versions.member()
    for day in (12, 13):
        await versions.buy(alice, at(1, day))
    assert versions.rewards(alice) == {"PAID": 200}
    await _full_return(versions, alice, _purchases(versions, alice)[0], "ret-alice", at(1, 14))
    assert versions.rewards(alice) == {"REVOKED": 200}
    assert await versions.balance(alice) == 0


async def test_an_opt_in_purchase_made_before_joining_does_not_count_when_its_receipt_arrives_late(
    versions: Versions,
) -> None:
    """Alice and Bob both buy on 5 January, join on the 6th and buy on the 7th. Alice's till
    sends the receipt of the 5th at once; Bob's is offline and sends it on the 8th (within the
    lateness policy). Made before joining, it counts for neither: it counted for Bob, whose
    join was looked at when the receipt arrived, and paid him 120 points."""
    await versions.publish(_challenge(2, opt_in=True), DECEMBER)
    alice, bob = await versions.member(), await versions.member()

    versions.clock.set(at(1, 5))
    await versions.buy(alice, at(1, 5))
    versions.clock.set(at(1, 6))
    await versions.game.join("test", "monthly", alice)
    await versions.game.join("test", "monthly", bob)
    versions.clock.set(at(1, 7))
    await versions.buy(alice, at(1, 7))
    await versions.buy(bob, at(1, 7))
    versions.clock.set(at(1, 8))
    await versions.buy(bob, at(1, 5))  # the purchase of the 5th, sent late

    for member in (alice, bob):
        item = (await versions.game.progress("test", member)).items[0]
        assert (member, item.progress, item.completions, item.joined) == (member, 1, 0, True)
        assert versions.rewards(member) == {}
