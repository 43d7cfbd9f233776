"""Achievements, streaks, challenges and leaderboards driven by real purchases.

Every purchase goes through ledger_svc (RecordPurchase -> rules_svc Evaluate); its event
reaches rules_svc's consumer group over Redis Streams; rewards come back as ledger Earns.
Reward figures are the program's (tests/gamification/conftest.py); purchase points are the
mesh program's (1 point per EUR, a 100-point welcome on the first purchase).
"""

from __future__ import annotations

from datetime import timedelta

import grpc

from pointmesh.v1 import ledger_pb2, rules_pb2
from tests.gamification.conftest import Game
from tests.ledger.helpers import create_member, rpc_error
from tests.mesh.helpers import purchase_request
from tests.waiting import until


async def _buy(game: Game, member: str, *, after_days: float = 0, channel: str = "pos", category: str = "misc") -> None:
    """A 10 EUR purchase now, after moving the shared clock on by `after_days`."""
    game.clock.advance(timedelta(days=after_days))
    await game.ledger.stub.RecordPurchase(
        purchase_request(member, [(category, 1000, 1)], at=game.clock.now(), channel=channel)
    )


def _item(progress: rules_pb2.GetMemberProgressResponse, item_id: str) -> rules_pb2.GameProgress:
    return next(i for i in progress.items if i.item_id == item_id)


async def _settled(game: Game, member: str, paid: int) -> rules_pb2.GetMemberProgressResponse:
    """Waits until the rewards paid reach `paid` and nothing is pending."""
    found: list[rules_pb2.GetMemberProgressResponse] = []

    async def done() -> bool:
        found.append(await game.progress(member))
        return found[-1].rewards_paid_points == paid and found[-1].rewards_pending_points == 0

    await until(done, 20)
    return found[-1]


async def _reward_entries(game: Game, member: str) -> list[tuple[str, int]]:
    page = await game.ledger.stub.ListEntries(ledger_pb2.ListEntriesRequest(member_id=member))
    return sorted((e.reference, e.points) for e in page.entries if ": " in e.reference)


async def test_a_challenge_pays_once_and_an_expired_one_pays_nothing(game: Game) -> None:
    member = (await create_member(game.ledger.stub)).member_id
    for day in range(4):  # four January purchases: the third completes the trio
        await _buy(game, member, after_days=min(day, 1))
    progress = await _settled(game, member, 200)
    trio = _item(progress, "january-trio")
    assert (trio.progress, trio.goal, trio.completions) == (3, 3, 1)
    assert _item(progress, "december-pair").completions == 0  # ended before these receipts
    assert await _reward_entries(game, member) == [("january-trio: Three purchases in January", 200)]


async def test_a_streak_pays_after_three_consecutive_weeks_and_breaks_on_a_missed_week(game: Game) -> None:
    member = (await create_member(game.ledger.stub)).member_id
    await _buy(game, member)  # week 1 (Monday 5 January)
    await _buy(game, member, after_days=7)  # week 2
    await until(lambda: _progress_of(game, member, "weekly-3", 2), 20)
    game.clock.advance(timedelta(days=14))  # week 3 passes without a purchase
    assert _item(await game.progress(member), "weekly-3").progress == 0
    await _buy(game, member)  # week 4: a new run (and the third January purchase)
    await _buy(game, member, after_days=7)  # week 5
    await _buy(game, member, after_days=7)  # week 6: three in a row
    progress = await _settled(game, member, 200 + 300)
    streak = _item(progress, "weekly-3")
    assert (streak.progress, streak.completions) == (3, 1)
    assert await _reward_entries(game, member) == [
        ("january-trio: Three purchases in January", 200), ("weekly-3: Three weeks in a row", 300),
    ]  # fmt: skip


async def test_achievements_by_channel_and_distinct_categories(game: Game) -> None:
    member = (await create_member(game.ledger.stub)).member_id
    for category in ("food", "toys", "food", "books", "garden"):
        await _buy(game, member, category=category)
    await until(lambda: _progress_of(game, member, "winter-ten", 5), 20)  # all five counted
    assert _item(await game.progress(member), "explorer").progress == 4  # food counted once
    await _buy(game, member, category="tools", channel="app")
    progress = await _settled(game, member, 75 + 50 + 200)
    assert [_item(progress, i).completions for i in ("explorer", "first-app")] == [1, 1]


async def test_leaderboard_orders_by_progress_then_who_finished_first(game: Game) -> None:
    a, b, c = [(await create_member(game.ledger.stub)).member_id for _ in range(3)]
    for member in (b, a, c):
        await _buy(game, member)
    game.clock.advance(timedelta(days=1))
    for member in (a, c):
        await _buy(game, member)
    await _buy(game, c, after_days=1)  # c completes the trio first
    await _buy(game, b, after_days=1)
    await _buy(game, b, after_days=1)  # b completes it a day later
    await _settled(game, b, 200)
    await _settled(game, c, 200)
    board = await game.rules.stub.GetLeaderboard(
        rules_pb2.GetLeaderboardRequest(program="meshmart", challenge_id="january-trio", limit=3)
    )
    assert [(e.rank, e.member_id, e.progress) for e in board.entries] == [(1, c, 3), (2, b, 3), (3, a, 2)]
    assert board.entries[0].completed_at.ToDatetime() < board.entries[1].completed_at.ToDatetime()


async def test_an_opt_in_challenge_counts_only_after_joining(game: Game) -> None:
    member = (await create_member(game.ledger.stub)).member_id
    await _buy(game, member)
    await until(lambda: _progress_of(game, member, "january-trio", 1), 20)
    joined = await game.rules.stub.JoinChallenge(
        rules_pb2.JoinChallengeRequest(program="meshmart", challenge_id="vip-sprint", member_id=member)
    )
    assert joined.joined
    await _buy(game, member, after_days=1)
    await _buy(game, member, after_days=1)
    progress = await _settled(game, member, 120 + 200)
    vip = _item(progress, "vip-sprint")
    assert (vip.joined, vip.progress, vip.completions) == (True, 2, 1)  # the purchase before joining did not count
    refused = await rpc_error(
        game.rules.stub.JoinChallenge(
            rules_pb2.JoinChallengeRequest(program="meshmart", challenge_id="january-trio", member_id=member)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "nothing to join" in (refused.details() or "")


async def _progress_of(game: Game, member: str, item_id: str, at_least: int) -> bool:
    return _item(await game.progress(member), item_id).progress >= at_least
