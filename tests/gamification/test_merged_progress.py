"""A person's two accounts merged: gamification goes on as one member, as the ledger's purchase
count, cap counters and tier qualification do (docs/ledger.md, Merge)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from pointmesh.events import BusMessage
from pointmesh.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc, rules_pb2
from rules_svc.game_engine import PurchaseFact, week_of
from rules_svc.game_store import GameStore
from rules_svc.program import Program
from tests.conftest import LedgerUnderTest
from tests.gamification.conftest import Game, handler, write_program
from tests.ledger.helpers import balance, create_member, key
from tests.mesh.helpers import purchase_request
from tests.rules import load_doc, program_doc
from tests.waiting import until

AT = datetime(2026, 1, 7, 12, tzinfo=UTC)
_ids = itertools.count()


async def _buy(game: Game, member: str, channel: str = "pos") -> ledger_pb2.Purchase:
    game.clock.advance(timedelta(hours=2))
    response = await game.ledger.stub.RecordPurchase(purchase_request(member, [("misc", 1000, 1)],
                                                                      at=game.clock.now(), channel=channel))  # fmt: skip
    return response.purchase


def _item(progress: rules_pb2.GetMemberProgressResponse, item_id: str) -> rules_pb2.GameProgress:
    return next(i for i in progress.items if i.item_id == item_id)


async def _rewards(game: Game, member: str) -> list[tuple[str, int]]:
    page = await game.ledger.stub.ListEntries(ledger_pb2.ListEntriesRequest(member_id=member))
    return sorted((e.reference, e.points) for e in page.entries if ": " in e.reference)


async def _counted(game: Game, member: str, item_id: str, progress: int) -> None:
    async def there() -> bool:
        return _item(await game.progress(member), item_id).progress >= progress

    await until(there, 20)


async def _merge(ledger: ledger_pb2_grpc.LedgerServiceStub, source: str, target: str) -> None:
    await ledger.MergeMembers(ledger_pb2.MergeMembersRequest(
        idempotency_key=key(), source_member_id=source, target_member_id=target))  # fmt: skip


async def test_a_merged_persons_achievement_is_not_paid_a_second_time(game: Game) -> None:
    app, card = [(await create_member(game.ledger.stub)).member_id for _ in range(2)]
    await _buy(game, app, channel="app")
    await _counted(game, app, "first-app", 1)
    await _merge(game.ledger.stub, app, card)
    await _buy(game, card, channel="app")

    async def counted() -> bool:  # on top of the merged purchase, or (merge ignored) paid again
        if _item(await game.progress(card), "january-trio").progress >= 2:
            return True
        return any(r.startswith("first-app") for r, _ in await _rewards(game, card))

    await until(counted, 20)

    async def settled() -> bool:
        return (await game.progress(card)).rewards_pending_points == 0

    await until(settled, 20)
    paid = [r for m in (app, card) for r in await _rewards(game, m) if r[0].startswith("first-app")]
    assert paid == [("first-app: First app purchase", 50)], paid  # one person, completed once


async def test_a_merged_persons_challenge_progress_carries_over(game: Game) -> None:
    old, new = [(await create_member(game.ledger.stub)).member_id for _ in range(2)]
    await _buy(game, old)
    await _buy(game, old)
    await _counted(game, old, "january-trio", 2)
    await _merge(game.ledger.stub, old, new)
    await _buy(game, new)
    await _counted(game, new, "january-trio", 3)
    trio = _item(await game.progress(new), "january-trio")
    assert (trio.progress, trio.completions) == (3, 1), (trio.progress, trio.completions)


async def test_progress_of_a_member_that_never_earned_a_point_joins_the_heir(game: Game, tmp_path: Path) -> None:
    """Purchases too small to earn (no welcome bonus in this version) still count for the
    challenge; merging that member, with nothing in any unit to move, still joins its progress."""
    document = yaml.safe_load(write_program(tmp_path).read_text())
    document["rules"] = [r for r in document["rules"] if r["id"] != "welcome"]
    await game.rules.stub.PublishProgram(rules_pb2.PublishProgramRequest(
        idempotency_key=common_pb2.IdempotencyKey(key="no-welcome"), document=yaml.safe_dump(document),
        published_by="ops",
    ))  # fmt: skip
    old, new = [(await create_member(game.ledger.stub)).member_id for _ in range(2)]
    for _ in range(2):
        game.clock.advance(timedelta(hours=2))
        small = purchase_request(old, [("misc", 50, 1)], at=game.clock.now())
        assert not [u for u in (await game.ledger.stub.RecordPurchase(small)).purchase.earned if u.points]
    await _counted(game, old, "january-trio", 2)
    assert (await balance(game.ledger.stub, old, "points")).lifetime_earned_points == 0
    await _merge(game.ledger.stub, old, new)
    await _buy(game, new)
    await _counted(game, new, "january-trio", 3)
    trio = _item(await game.progress(new), "january-trio")
    assert (trio.progress, trio.completions) == (3, 1), (trio.progress, trio.completions)


async def test_a_return_after_the_merge_takes_back_from_the_heir(game: Game) -> None:
    """The return names the member who bought (merged away since): the person's progress, and
    the award it no longer earns, are the heir's."""
    old, new = [(await create_member(game.ledger.stub)).member_id for _ in range(2)]
    bought = [await _buy(game, old) for _ in range(2)]
    await _counted(game, old, "january-trio", 2)
    await _merge(game.ledger.stub, old, new)
    await _buy(game, new)

    async def paid() -> bool:
        return (await game.progress(new)).rewards_paid_points == 200

    await until(paid, 20)
    await game.ledger.stub.RecordReturn(ledger_pb2.RecordReturnRequest(
        idempotency_key=key(), purchase_id=bought[0].purchase_id, channel="pos", store_id="HEL-01",
        lines=[ledger_pb2.ReturnLine(line_index=0, quantity=1)],
    ))  # fmt: skip

    async def taken_back() -> bool:
        trio = _item(await game.progress(new), "january-trio")
        return (trio.progress, trio.completions) == (2, 0) and (await game.progress(new)).rewards_paid_points == 0

    await until(taken_back, 20)
    trio_entries = sorted(p for r, p in await _rewards(game, new) if r.startswith("january-trio"))
    assert trio_entries == [-200, 200], trio_entries


def _program(**items: list[dict[str, object]]) -> Program:
    return load_doc(program_doc(gamification=items))


FIVE = {"id": "five", "name": "Five in January", "starts": "2026-01-01T00:00:00+00:00",
        "ends": "2026-02-01T00:00:00+00:00", "purchases": 5, "reward": {"points": 500}}  # fmt: skip
TRIO = {**FIVE, "id": "trio", "name": "Three in January", "purchases": 3, "reward": {"points": 200}}


def _fact(member: str, at: datetime = AT) -> PurchaseFact:
    n = next(_ids)
    return PurchaseFact(f"e{n}", member, f"p{n}", "pos", "HEL-01", 1000, "EUR", at)


def _merged(source: str, target: str, on: str, event_id: str) -> BusMessage:
    """The ledger's members_merged event, as announced on member `on` (the source or the target)."""
    event = ledger_pb2.LedgerEvent(event_id=event_id, member_id=on, members_merged=ledger_pb2.MembersMerged(
        source_member_id=source, target_member_id=target))  # fmt: skip
    event.occurred_at.FromDatetime(AT + timedelta(days=1))
    return BusMessage("1-0", on, event_id, "members_merged", event.SerializeToString())


async def test_a_merge_announced_on_both_members_and_delivered_again_counts_once(tmp_path: Path) -> None:
    """And a purchase of the member merged away handled after the merge (the two members' events
    are not ordered) counts for the heir."""
    program = _program(challenges=[FIVE])
    store = GameStore(tmp_path / "game.sqlite")
    worker = handler(store, program)
    late = _fact("a", AT + timedelta(hours=2))
    for f in (_fact("a"), _fact("a", AT + timedelta(hours=1)), _fact("b")):
        store.apply_event(program, f)

    for n, on in enumerate(["b", "a", "a", "b", "b"]):  # each side, per unit, and again
        await worker.handle(_merged("a", "b", on, f"ev-m{n}"))
    assert store.states("test", "b")["five"].count == 3
    assert store.states("test", "a") == {}

    store.apply_event(program, late)
    assert store.states("test", "b")["five"].count == 4
    assert store.counted_receipt("test", "a", late.purchase_id) == late.receipt_time  # a return of it finds it


def test_a_streak_only_the_two_accounts_make_together_pays_once(tmp_path: Path) -> None:
    program = _program(streaks=[{"id": "three", "name": "Three weeks", "weeks": 3, "reward": {"points": 300}}])
    store = GameStore(tmp_path / "game.sqlite")
    for member, week in (("a", 0), ("a", 1), ("b", 2)):
        store.apply_event(program, _fact(member, AT + timedelta(weeks=week)))

    awards = store.merge(program, "a", "b", at=AT + timedelta(weeks=3))

    assert [(a.item_id, a.period) for a in awards or []] == [("three", f"run-{week_of(AT.date())}")]
    assert store.merge(program, "a", "b") is None
    assert [r.member_id for r in store.pending()] == ["b"]
    assert store.states("test", "b")["three"].completions == 1


def test_what_either_account_completed_stays_completed_and_pays_nothing_more(tmp_path: Path) -> None:
    program = _program(challenges=[TRIO])
    store = GameStore(tmp_path / "game.sqlite")
    for i in range(3):
        store.apply_event(program, _fact("a", AT + timedelta(hours=i)))
    store.apply_event(program, _fact("b"))

    assert store.merge(program, "a", "b") == []
    trio = store.states("test", "b")["trio"]
    assert (trio.count, trio.completions) == (4, 1)
    assert [r.member_id for r in store.pending("b")] == ["a"]  # the person's: paid where the ledger pays a's


async def test_an_award_pending_when_its_member_is_merged_away_is_paid_once_to_the_heir(
    tmp_path: Path, ledger: LedgerUnderTest
) -> None:
    program = _program(challenges=[TRIO])
    store = GameStore(tmp_path / "game.sqlite")
    worker = handler(store, program, ledger)
    source, target = [(await create_member(ledger.stub)).member_id for _ in range(2)]
    for i in range(3):
        store.apply_event(program, _fact(source, AT + timedelta(hours=i)))
    await _merge(ledger.stub, source, target)

    await worker.handle(_merged(source, target, target, "ev-m1"))
    await worker.handle(_merged(source, target, source, "ev-m2"))
    store.apply_event(program, _fact(target, AT + timedelta(hours=5)))
    await worker.pay()

    assert store.pending() == []
    assert (await balance(ledger.stub, target)).balance_points == 200


def test_goods_returned_after_a_merge_take_back_what_they_would_have_before_it(tmp_path: Path) -> None:
    """A person's accounts a and b each complete January's three-purchase challenge and are each
    paid; b returns all three of its purchases. Returned before the merge, b's reward goes and
    one stays. Returned after it, the same: a's purchases, which hold a's own reward, must not
    hold b's too (both rewards stayed: 400 points kept for three purchases)."""
    program = _program(challenges=[{
        "id": "trio", "name": "Three in January", "starts": "2026-01-01T00:00:00+00:00",
        "ends": "2026-02-01T00:00:00+00:00", "purchases": 3, "reward": {"points": 200}}])  # fmt: skip
    kept = {}
    for order in ("return, then merge", "merge, then return"):
        store = GameStore(tmp_path / f"{order}.sqlite")
        bought: dict[str, list[str]] = {"a": [], "b": []}
        for member, hour in itertools.product(bought, (12, 13, 14)):
            fact = _fact(member, datetime(2026, 1, 7, hour, tzinfo=UTC))
            bought[member].append(fact.purchase_id)
            store.apply_event(program, fact)
        for reward in store.pending():
            store.settle(reward.key, "PAID", f"tx-{reward.key}")
        if order == "merge, then return":
            assert store.merge(program, "a", "b", at=datetime(2026, 1, 20, tzinfo=UTC)) == []
            assert store.states("test", "b")["trio"].completions == 2
        for n, purchase_id in enumerate(bought["b"]):
            store.withdraw_event(program, f"ret-{n}", "b", purchase_id)
        if order == "return, then merge":
            store.merge(program, "a", "b", at=datetime(2026, 1, 20, tzinfo=UTC))
        kept[order] = (store.reward_totals("test", "b").get("PAID", 0), store.states("test", "b")["trio"].completions)
        store.close()

    assert kept == {"return, then merge": (200, 1), "merge, then return": (200, 1)}
