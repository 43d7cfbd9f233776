"""The reward retry loop against a real ledger: one member the ledger refuses must not keep
every other member's reward unpaid."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pointmesh.consumers import Poison
from pointmesh.events import BusMessage
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import ledger_pb2
from rules_svc import game_worker
from rules_svc.game_engine import PurchaseFact
from rules_svc.game_store import GameStore
from rules_svc.game_worker import GameWorker
from rules_svc.program import Program
from tests.conftest import LedgerUnderTest, RulesUnderTest
from tests.ledger.helpers import create_member, key
from tests.rules import load_doc, program_doc

AT = datetime(2026, 1, 7, 12, tzinfo=UTC)


def first_purchase_pays_50() -> Program:
    return load_doc(program_doc(gamification={
        "achievements": [{"id": "first", "name": "First purchase", "reward": {"points": 50}}],
    }))  # fmt: skip


async def test_a_blocked_members_reward_stays_pending_and_the_others_are_paid(
    tmp_path: Path, ledger: LedgerUnderTest
) -> None:
    program = first_purchase_pays_50()
    store = GameStore(tmp_path / "game.sqlite")
    members = [(await create_member(ledger.stub)).member_id for _ in range(3)]
    for i, member_id in enumerate(members):
        store.apply_event(program, PurchaseFact(f"e{i}", member_id, f"p{i}", "pos", "HEL-01", 1000, "EUR", AT))
    # The blocked member's reward sorts first, so a pass that stopped at it would pay nobody.
    blocked = min(members, key=lambda m: next(r.key for r in store.pending(m)))
    await ledger.stub.BlockMember(ledger_pb2.BlockMemberRequest(idempotency_key=key(), member_id=blocked,
                                                                reason="chargeback"))  # fmt: skip
    worker = GameWorker(store, lambda _p, _t: program, program.program, bus=None,  # type: ignore[arg-type]
                        ledger=ledger.stub, consumer="test")  # fmt: skip

    paid = await worker.pay()

    assert paid == 2
    assert [r.member_id for r in store.pending()] == [blocked]
    for member_id in members:
        balance = await ledger.stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=member_id))
        assert balance.balance.balance_points == (0 if member_id == blocked else 50), member_id

    await ledger.stub.UnblockMember(ledger_pb2.UnblockMemberRequest(idempotency_key=key(), member_id=blocked))
    assert await worker.pay() == 1
    assert store.pending() == []


async def test_a_purchase_with_no_program_version_in_effect_is_poison_not_retried_for_ever(
    rules: RulesUnderTest,
) -> None:
    game = rules.app.game  # an empty version store: no program "meshmart" at any time
    worker = GameWorker(game.store, game.program_at, "meshmart", bus=None,  # type: ignore[arg-type]
                        ledger=None, consumer="test")  # type: ignore[arg-type]  # fmt: skip
    event = ledger_pb2.LedgerEvent(
        event_id="ev-1", member_id="m-1",
        purchase_recorded=ledger_pb2.PurchaseRecorded(purchase_id="p-1", channel="pos", receipt_time=to_timestamp(AT)),
    )  # fmt: skip
    message = BusMessage("1-0", "m-1", "ev-1", "purchase_recorded", event.SerializeToString())

    with pytest.raises(Poison, match="no program meshmart to count purchase p-1 under"):
        await worker.handle(message)


async def test_a_page_full_of_rewards_refused_for_now_does_not_hold_back_the_ones_after_it(
    tmp_path: Path, ledger: LedgerUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocked members' rewards stay pending and sort first; with pages of two, a pass that only
    read the first page would never reach the member after them."""
    monkeypatch.setattr(game_worker, "PAGE", 2)
    program = first_purchase_pays_50()
    store = GameStore(tmp_path / "game.sqlite")
    members = [(await create_member(ledger.stub)).member_id for _ in range(5)]
    for i, member_id in enumerate(members):
        store.apply_event(program, PurchaseFact(f"e{i}", member_id, f"p{i}", "pos", "HEL-01", 1000, "EUR", AT))
    by_key = sorted(members, key=lambda m: store.pending(m)[0].key)
    blocked, last = by_key[:4], by_key[4]
    for member_id in blocked:
        await ledger.stub.BlockMember(ledger_pb2.BlockMemberRequest(idempotency_key=key(), member_id=member_id,
                                                                    reason="chargeback"))  # fmt: skip
    worker = GameWorker(store, lambda _p, _t: program, program.program, bus=None,  # type: ignore[arg-type]
                        ledger=ledger.stub, consumer="test")  # fmt: skip

    assert await worker.pay() == 1
    assert sorted(r.member_id for r in store.pending()) == sorted(blocked)
    balance = await ledger.stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=last))
    assert balance.balance.balance_points == 50


async def test_two_payers_of_one_reward_post_it_once_and_count_it_once(tmp_path: Path, ledger: LedgerUnderTest) -> None:
    """The event handler pays the member's rewards while the retry loop pays everyone's: both
    may send the same reward. The ledger posts it once (its key) and only one payer counts it."""
    program = first_purchase_pays_50()
    store = GameStore(tmp_path / "game.sqlite")
    member_id = (await create_member(ledger.stub)).member_id
    store.apply_event(program, PurchaseFact("e0", member_id, "p0", "pos", "HEL-01", 1000, "EUR", AT))
    worker = GameWorker(store, lambda _p, _t: program, program.program, bus=None,  # type: ignore[arg-type]
                        ledger=ledger.stub, consumer="test")  # fmt: skip
    counted = game_worker.REWARD_POINTS.labels("points")._value.get()

    paid = await asyncio.gather(worker.pay(member_id), worker.pay())

    assert sorted(paid) == [0, 1]
    assert game_worker.REWARD_POINTS.labels("points")._value.get() - counted == 50
    balance = await ledger.stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=member_id))
    assert balance.balance.balance_points == 50
