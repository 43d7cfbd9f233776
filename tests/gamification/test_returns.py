"""Returning goods takes back the gamification rewards they earned, through real services: the
ledger's purchase_returned event reaches rules_svc's consumer group over Redis Streams, the
progress goes back, and the ledger reverses the reward it posted. Buy three, finish the January
challenge, return one: the 200 points go; buy once more and they are earned again, once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pointmesh.v1 import ledger_pb2
from rules_svc.game_engine import PurchaseFact
from rules_svc.game_store import GameStore
from rules_svc.game_worker import GameWorker
from rules_svc.program import Program
from tests.conftest import LedgerUnderTest
from tests.gamification.conftest import Game, handler, rejected_review
from tests.ledger.helpers import balance, create_member, key
from tests.mesh.helpers import purchase_request
from tests.rules import load_doc, program_doc
from tests.waiting import until

AT = datetime(2026, 1, 7, 12, tzinfo=UTC)

TRIO = "january-trio: Three purchases in January"


async def _buy(game: Game, member: str, lines: list[tuple[str, int, int]] | None = None) -> ledger_pb2.Purchase:
    game.clock.advance(timedelta(hours=2))
    response = await game.ledger.stub.RecordPurchase(
        purchase_request(member, lines or [("misc", 1000, 1)], at=game.clock.now())
    )
    return response.purchase


async def _return(game: Game, purchase_id: str, lines: list[tuple[int, int]]) -> int:
    """Returns the points the return itself took back."""
    response = await game.ledger.stub.RecordReturn(ledger_pb2.RecordReturnRequest(
        idempotency_key=key(), purchase_id=purchase_id, channel="pos", store_id="HEL-01",
        lines=[ledger_pb2.ReturnLine(line_index=i, quantity=q) for i, q in lines],
    ))  # fmt: skip
    return sum(u.points for u in response.reversed if u.unit == "points")


async def _trio(game: Game, member: str) -> tuple[int, int]:
    item = next(i for i in (await game.progress(member)).items if i.item_id == "january-trio")
    return item.progress, item.completions


async def _trio_entries(game: Game, member: str) -> list[int]:
    page = await game.ledger.stub.ListEntries(ledger_pb2.ListEntriesRequest(member_id=member))
    return sorted(e.points for e in page.entries if e.reference.startswith("january-trio"))


async def _until_trio_entries(game: Game, member: str, expected: list[int]) -> None:
    async def there() -> bool:
        return await _trio_entries(game, member) == expected

    await until(there, 20)


async def test_a_full_return_takes_back_the_challenge_reward_and_buying_again_earns_it_once_more(game: Game) -> None:
    member = (await create_member(game.ledger.stub)).member_id
    bought = [await _buy(game, member) for _ in range(3)]
    await _until_trio_entries(game, member, [200])
    before = (await balance(game.ledger.stub, member)).balance_points

    returned = await _return(game, bought[1].purchase_id, [(0, 1)])
    assert returned > 0

    async def taken_back() -> bool:
        return await _trio(game, member) == (2, 0) and (await game.progress(member)).rewards_paid_points == 0

    await until(taken_back, 20)
    reversal = next(
        e
        for e in (await game.ledger.stub.ListEntries(ledger_pb2.ListEntriesRequest(member_id=member))).entries
        if "the purchase that earned it was taken back" in e.reference
    )
    assert reversal.points == -200
    await until(lambda: _balance_is(game, member, before - returned - 200), 20)

    again = await _buy(game, member)  # completes the trio again
    earned = sum(u.points for u in again.earned if u.unit == "points")
    await until(lambda: _balance_is(game, member, before - returned + earned), 20)
    assert await _trio(game, member) == (3, 1)
    assert (await game.progress(member)).rewards_paid_points == 200


async def test_a_partial_return_leaves_the_purchase_counted(game: Game) -> None:
    member = (await create_member(game.ledger.stub)).member_id
    bought = [await _buy(game, member, [("misc", 1000, 1), ("food", 500, 1)]) for _ in range(3)]
    await _until_trio_entries(game, member, [200])

    await _return(game, bought[0].purchase_id, [(1, 1)])  # the food line back, the misc line kept
    await _return(game, bought[2].purchase_id, [(0, 1), (1, 1)])  # everything back

    # One member's events are handled in order: once the full return has shown, so has the partial.
    async def revoked() -> bool:
        return (await _trio(game, member))[1] == 0

    await until(revoked, 20)
    assert await _trio(game, member) == (2, 0)
    await _until_trio_entries(game, member, [-200, 200])


async def _balance_is(game: Game, member: str, points: int) -> bool:
    return (await balance(game.ledger.stub, member)).balance_points == points


def _trio_program() -> Program:
    return load_doc(program_doc(gamification={"challenges": [{
        "id": "trio", "name": "Three in January", "starts": "2026-01-01T00:00:00+00:00",
        "ends": "2026-02-01T00:00:00+00:00", "purchases": 3, "reward": {"points": 200},
    }]}))  # fmt: skip


def _bought(store: GameStore, program: Program, member: str, purchases: int = 3) -> None:
    """`purchases` of the member an hour apart from AT, counted (p0, p1, ...)."""
    for i in range(purchases):
        store.apply_event(program, PurchaseFact(f"e{i}", member, f"p{i}", "pos", "HEL-01", 1000, "EUR",
                                                AT + timedelta(hours=i)))  # fmt: skip


@pytest.mark.parametrize("ops_reversed_it_first", [False, True])
async def test_a_rejected_fraud_review_revokes_the_reward_its_purchase_completed(
    tmp_path: Path, ledger: LedgerUnderTest, ops_reversed_it_first: bool
) -> None:
    """The worker against a real ledger, fed the review_decided event by hand (a rejection needs
    fraud_svc to hold the purchase first; the ledger's side of that is tested with reviews)."""
    program = _trio_program()
    store = GameStore(tmp_path / "game.sqlite")
    member = (await create_member(ledger.stub)).member_id
    _bought(store, program, member)
    worker = handler(store, program, ledger)
    assert await worker.pay() == 1
    paid = (await balance(ledger.stub, member)).balance_points
    assert paid == 200
    if ops_reversed_it_first:
        page = await ledger.stub.ListEntries(ledger_pb2.ListEntriesRequest(member_id=member))
        await ledger.stub.Reverse(ledger_pb2.ReverseRequest(
            idempotency_key=key(), transaction_id=page.entries[0].transaction_id, full=True, reason="ops"))  # fmt: skip

    await worker.handle(rejected_review("ev-r", member, "p1"))
    await worker.handle(rejected_review("ev-r", member, "p1"))  # delivered twice: taken back once

    assert (await balance(ledger.stub, member)).balance_points == 0
    assert store.revoking() == []  # settled, not retried for ever
    assert store.states(program.program, member)["trio"].count == 2
    entries = (await ledger.stub.ListEntries(ledger_pb2.ListEntriesRequest(member_id=member))).entries
    assert sorted(e.points for e in entries) == [-200, 200]


async def test_rewards_with_ids_past_the_ledgers_key_length_are_paid_and_taken_back(
    tmp_path: Path, ledger: LedgerUnderTest
) -> None:
    """A 60-character program id and a 60-character challenge id give a reward key past the
    ledger's 128 characters: it goes to the ledger as its digest, paid, revoked and paid again."""
    program = load_doc(program_doc(program="p" * 60, gamification={"challenges": [{
        "id": "c" * 60, "name": "Three in January", "starts": "2026-01-01T00:00:00+00:00",
        "ends": "2026-02-01T00:00:00+00:00", "purchases": 3, "reward": {"points": 200},
    }]}))  # fmt: skip
    store = GameStore(tmp_path / "game.sqlite")
    member = (await create_member(ledger.stub)).member_id
    _bought(store, program, member, 4)
    assert len(store.pending()[0].key) > 128
    worker = handler(store, program, ledger)
    assert await worker.pay() == 1

    await worker.handle(rejected_review("ev-r1", member, "p1"))  # the fourth stands in: kept
    await worker.handle(rejected_review("ev-r2", member, "p2"))  # two left: revoked
    assert (await balance(ledger.stub, member)).balance_points == 0
    assert store.revoking() == []
    store.apply_event(program, PurchaseFact("e9", member, "p9", "pos", "HEL-01", 1000, "EUR", AT + timedelta(days=1)))
    assert await worker.pay() == 1
    assert (await balance(ledger.stub, member)).balance_points == 200


async def test_a_reward_of_a_member_merged_away_before_it_was_paid_goes_to_the_member_it_went_to(
    tmp_path: Path, ledger: LedgerUnderTest
) -> None:
    """And is taken back from there when the purchase that earned it is rejected."""
    store, worker, source, target = await _merged_away_reward(tmp_path, ledger)

    assert await worker.pay() == 1
    assert store.pending() == []
    assert (await balance(ledger.stub, target)).balance_points == 200

    await worker.handle(rejected_review("ev-r", source, "p1"))

    assert store.revoking() == []
    assert (await balance(ledger.stub, target)).balance_points == 0


async def _merged_away_reward(tmp_path: Path, ledger: LedgerUnderTest) -> tuple[GameStore, GameWorker, str, str]:
    """A completed trio of a member then merged into another, its reward not yet paid."""
    program = _trio_program()
    store = GameStore(tmp_path / "game.sqlite")
    source, target = [(await create_member(ledger.stub)).member_id for _ in range(2)]
    _bought(store, program, source)
    await ledger.stub.MergeMembers(ledger_pb2.MergeMembersRequest(
        idempotency_key=key(), source_member_id=source, target_member_id=target))  # fmt: skip
    return store, handler(store, program, ledger), source, target


@pytest.mark.parametrize("then", ["paid", "revoked"])
async def test_a_reward_posted_to_the_heir_before_a_crash_is_settled_or_taken_back_after_it(
    tmp_path: Path, ledger: LedgerUnderTest, then: str
) -> None:
    """The worker posted it to the member merged into and died before marking it: the next
    attempt must find that posting (asked of the first member, its key conflicts), not give up."""
    store, worker, source, target = await _merged_away_reward(tmp_path, ledger)
    (reward,) = store.pending()
    await worker._post(reward)  # then killed
    if then == "paid":
        assert await worker.pay() == 1
        assert store.pending() == [] and (await balance(ledger.stub, target)).balance_points == 200
    else:
        await worker.handle(rejected_review("ev-r", source, "p1"))
        assert store.revoking() == [] and (await balance(ledger.stub, target)).balance_points == 0


async def test_a_reward_of_a_member_merged_then_erased_goes_to_the_member_it_went_to(
    tmp_path: Path, ledger: LedgerUnderTest
) -> None:
    _store, worker, source, target = await _merged_away_reward(tmp_path, ledger)
    await ledger.stub.EraseMember(ledger_pb2.EraseMemberRequest(idempotency_key=key(), member_id=source))

    assert await worker.pay() == 1
    assert (await balance(ledger.stub, target)).balance_points == 200


async def test_a_reward_of_an_erased_member_is_refused_for_good_not_retried(
    tmp_path: Path, ledger: LedgerUnderTest
) -> None:
    program = _trio_program()
    store = GameStore(tmp_path / "game.sqlite")
    member = (await create_member(ledger.stub)).member_id
    _bought(store, program, member)
    await ledger.stub.EraseMember(ledger_pb2.EraseMemberRequest(idempotency_key=key(), member_id=member))
    worker = handler(store, program, ledger)

    assert await worker.pay() == 0
    assert store.pending() == []
    assert store.reward_totals(program.program, member) == {"REFUSED:ERASED": 200}
