"""RecordReturn: points come back from the purchase's own breakdown, never a re-evaluation."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from ledger_svc.store.base import StoreClosed
from pointmesh.v1 import common_pb2, ledger_pb2, rules_pb2
from tests.ledger.helpers import balance, error_field, key, redeem, rpc_error
from tests.mesh.conftest import PROGRAM, Mesh
from tests.mesh.helpers import (
    buy,
    by_rule,
    exact,
    money,
    new_member,
    points,
    return_lines,
    reversed_points,
    welcomed_member,
)  # fmt: skip


async def test_partial_returns_add_up_to_the_earn_and_never_more(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    bought = await buy(mesh, member, [("misc", 3000, 3), ("misc", 1000, 1)])
    pid = bought.purchase.purchase_id
    assert exact(bought.purchase)["points"] == 40
    first = await return_lines(mesh, pid, [(0, 1)])
    second = await return_lines(mesh, pid, [(0, 2)])
    third = await return_lines(mesh, pid, [(1, 1)])
    assert [reversed_points(r) for r in (first, second, third)] == [10, 20, 10]
    assert [reversed_points(r, "tier_credits") for r in (first, second, third)] == [10, 20, 10]
    error = await rpc_error(return_lines(mesh, pid, [(0, 1)]), grpc.StatusCode.FAILED_PRECONDITION)
    assert "4 of line 0" in error.details() and "3 were bought" in error.details()
    assert await points(mesh, member) == 100
    assert list(third.purchase.returned_quantities) == [3, 1]
    assert sum(p.returned_points for p in third.purchase.parts if p.part.unit == "points") == 40


async def test_a_return_after_partial_redemption_records_the_spent_part_as_debt(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    bought = await buy(mesh, member, [("misc", 5000, 1)])
    await redeem(mesh.ledger.stub, member, 140)  # 150 -> 10 points left
    back = await return_lines(mesh, bought.purchase.purchase_id, [(0, 1)])
    assert reversed_points(back) == 50
    assert back.debt_points == 40
    after = await balance(mesh.ledger.stub, member, "points")
    assert (after.balance_points, after.debt_points) == (0, 40)
    # Later earnings pay the debt first.
    await buy(mesh, member, [("misc", 6000, 1)])
    after = await balance(mesh.ledger.stub, member, "points")
    assert (after.balance_points, after.debt_points) == (20, 0)


async def test_a_return_after_the_program_changed_reverses_at_the_original_rules(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    saturday = datetime(2026, 1, 10, 10, 0, tzinfo=UTC)
    mesh.clock.set(saturday + timedelta(minutes=1))
    bought = await buy(mesh, member, [("misc", 2000, 2)], at=saturday)
    assert by_rule(bought.purchase) == {"base": 20, "weekend-double": 20}
    # The weekend multiplier becomes 5x, effective now.
    changed = PROGRAM.read_text().replace(
        'weekend-double\n    priority: 20\n    group: weekend\n    when: {days_of_week: [sat, sun]}\n    effect: {multiplier: "2"}',
        'weekend-double\n    priority: 20\n    group: weekend\n    when: {days_of_week: [sat, sun]}\n    effect: {multiplier: "5"}',
    )
    assert changed != PROGRAM.read_text()
    await mesh.rules.stub.PublishProgram(
        rules_pb2.PublishProgramRequest(idempotency_key=common_pb2.IdempotencyKey(key="x5"), document=changed)
    )
    back = await return_lines(mesh, bought.purchase.purchase_id, [(0, 1)])
    assert reversed_points(back) == 20  # half of 20 base + half of 20 weekend, not half of 5x
    assert back.purchase.program_version == 1
    assert await points(mesh, member) == 100 + 40 - 20


async def test_bought_online_returned_in_a_store(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    bought = await buy(mesh, member, [("misc", 4500, 1)], channel="web", store="")
    back = await return_lines(mesh, bought.purchase.purchase_id, [(0, 1)], channel="pos", store="LIS-01")
    assert reversed_points(back) == 45
    assert await points(mesh, member) == 100


async def test_a_return_found_by_the_original_receipt(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    await buy(mesh, member, [("misc", 3000, 1)], channel="web", store="", receipt="WEB-77")
    back = await mesh.ledger.stub.RecordReturn(
        ledger_pb2.RecordReturnRequest(
            idempotency_key=key(), member_id=member, original_channel="web", original_receipt_id="WEB-77",
            channel="pos", store_id="HEL-01", lines=[ledger_pb2.ReturnLine(line_index=0, quantity=1)],
        )
    )  # fmt: skip
    assert reversed_points(back) == 30


async def test_a_partial_return_under_the_basket_threshold_claws_back_the_bonus(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    bought = await buy(mesh, member, [("misc", 6000, 1), ("misc", 6000, 1)])
    assert by_rule(bought.purchase) == {"base": 120, "big-basket": 20}
    back = await return_lines(mesh, bought.purchase.purchase_id, [(1, 1)])
    assert reversed_points(back) == 60 + 20  # 60 left is under the 100 EUR threshold
    assert await points(mesh, member) == 100 + 60


async def test_points_paid_as_tender_are_recredited_in_proportion_to_the_refund(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    paid = (await redeem(mesh.ledger.stub, member, 80)).transaction.transaction_id
    bought = await buy(mesh, member, [("misc", 4000, 1)], tender=paid)
    assert bought.purchase.tender_points == 80
    back = await mesh.ledger.stub.RecordReturn(
        ledger_pb2.RecordReturnRequest(
            idempotency_key=key(), purchase_id=bought.purchase.purchase_id, channel="pos", store_id="HEL-01",
            refund=common_pb2.Money(amount_minor=2000, currency="EUR"),
        )
    )  # fmt: skip
    assert (reversed_points(back), back.tender_recredited_points) == (20, 40)
    assert await points(mesh, member) == 100 - 80 + 40 + 40 - 20


async def test_a_return_replayed_with_its_key_reverses_once(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    bought = await buy(mesh, member, [("misc", 2000, 2)])
    request = ledger_pb2.RecordReturnRequest(
        idempotency_key=key(), purchase_id=bought.purchase.purchase_id, channel="pos", store_id="HEL-01",
        lines=[ledger_pb2.ReturnLine(line_index=0, quantity=1)],
    )  # fmt: skip
    first = await mesh.ledger.stub.RecordReturn(request)
    again = await mesh.ledger.stub.RecordReturn(request)
    assert reversed_points(first) == reversed_points(again) == 10
    assert await points(mesh, member) == 110


async def test_a_refused_return_leaves_its_key_free_for_the_corrected_return(mesh: Mesh) -> None:
    """A till refunding more than was paid is refused and posts nothing; the clerk corrects the
    amount and the till sends it again under the same key (decision 0004)."""
    member = await welcomed_member(mesh)
    bought = await buy(mesh, member, [("misc", 4000, 1)])
    returning = key()

    def refund(minor: int) -> ledger_pb2.RecordReturnRequest:
        return ledger_pb2.RecordReturnRequest(
            idempotency_key=returning, purchase_id=bought.purchase.purchase_id, channel="pos", store_id="HEL-01",
            refund=common_pb2.Money(amount_minor=minor, currency="EUR"),
        )  # fmt: skip

    error = await rpc_error(mesh.ledger.stub.RecordReturn(refund(8000)), grpc.StatusCode.FAILED_PRECONDITION)
    assert "more than the purchase" in error.details()
    back = await mesh.ledger.stub.RecordReturn(refund(2000))
    assert reversed_points(back) == 20
    assert reversed_points(await mesh.ledger.stub.RecordReturn(refund(2000))) == 20  # a replay, not a second return
    assert await points(mesh, member) == 100 + 40 - 20


async def test_copies_of_one_return_sent_at_once_all_answer_with_its_one_result(mesh: Mesh) -> None:
    """A vendor's webhook retried in a burst: one copy returns the lines, the others are the same
    request and answer with its result. None may be refused for lines "already returned" by its
    twin (a legacy feed would quarantine a record that is only a duplicate)."""
    member = await welcomed_member(mesh)
    for _ in range(4):
        bought = await buy(mesh, member, [("misc", 2000, 2)])
        request = ledger_pb2.RecordReturnRequest(
            idempotency_key=key(), purchase_id=bought.purchase.purchase_id, channel="pos", store_id="HEL-01",
            lines=[ledger_pb2.ReturnLine(line_index=0, quantity=2)],
        )  # fmt: skip
        copies = await asyncio.gather(*(mesh.ledger.stub.RecordReturn(request) for _ in range(8)))
        assert {reversed_points(c) for c in copies} == {20}
        assert sorted(c.replayed for c in copies) == [False] + [True] * 7
    assert await points(mesh, member) == 100


async def test_bad_returns_are_refused_with_the_field(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    bought = await buy(mesh, member, [("misc", 2000, 2)])
    pid = bought.purchase.purchase_id
    error = await rpc_error(return_lines(mesh, pid, [(5, 1)]), grpc.StatusCode.INVALID_ARGUMENT)
    assert "lines[0].line_index" in error.details()
    error = await rpc_error(return_lines(mesh, pid, [(0, 0)]), grpc.StatusCode.INVALID_ARGUMENT)
    assert "lines[0].quantity" in error.details()
    error = await rpc_error(return_lines(mesh, "pu_" + "0" * 28, [(0, 1)]), grpc.StatusCode.NOT_FOUND)
    assert await points(mesh, member) == 120


async def test_a_fixed_bonus_stays_on_a_partial_return_and_goes_with_the_full_return(mesh: Mesh) -> None:
    member = (
        await mesh.ledger.stub.CreateMember(ledger_pb2.CreateMemberRequest(idempotency_key=key()))
    ).member.member_id
    bought = await buy(mesh, member, [("misc", 2000, 1), ("misc", 3000, 1)])
    assert by_rule(bought.purchase) == {"base": 50, "welcome": 100}
    part = await return_lines(mesh, bought.purchase.purchase_id, [(0, 1)])
    assert reversed_points(part) == 20
    rest = await return_lines(mesh, bought.purchase.purchase_id, [(1, 1)])
    assert reversed_points(rest) == 30 + 100
    assert await points(mesh, member) == 0


async def test_a_redemption_named_as_tender_by_several_purchases_gives_back_what_it_took_once(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    paid = (await redeem(mesh.ledger.stub, member, 80)).transaction.transaction_id
    bought = [await buy(mesh, member, [("misc", 1000, 1)], tender=paid) for _ in range(3)]
    assert [b.purchase.tender_points for b in bought] == [80, 80, 80]
    backs = [await return_lines(mesh, b.purchase.purchase_id, [(0, 1)]) for b in bought]
    assert [b.tender_recredited_points for b in backs] == [80, 0, 0]
    assert await points(mesh, member) == 100  # 100 - 80 redeemed + 3 x 10 earned - 3 x 10 returned + 80
    totals = await mesh.ledger.stub.GetTotals(ledger_pb2.GetTotalsRequest(fresh=True))
    assert totals.differences == 0


async def test_a_zero_total_purchase_is_returned_with_its_fixed_bonus(mesh: Mesh) -> None:
    member = await new_member(mesh)
    free = await buy(mesh, member, [("misc", 0, 1)])  # a free item, and the first purchase: the welcome
    assert exact(free.purchase) == {"points": 100}
    back = await return_lines(mesh, free.purchase.purchase_id, [(0, 1)])
    assert reversed_points(back) == 100
    assert await points(mesh, member) == 0


async def test_a_return_after_ops_reversed_the_earn_still_gives_back_the_tender(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    paid = (await redeem(mesh.ledger.stub, member, 50)).transaction.transaction_id
    bought = await buy(mesh, member, [("misc", 3000, 1)], tender=paid)
    await mesh.ledger.stub.Reverse(
        ledger_pb2.ReverseRequest(
            idempotency_key=key(), transaction_id=bought.purchase.earn_transactions["points"], full=True
        )
    )
    assert await points(mesh, member) == 50
    back = await return_lines(mesh, bought.purchase.purchase_id, [(0, 1)])
    assert (reversed_points(back), back.tender_recredited_points, back.debt_points) == (0, 50, 0)
    assert await points(mesh, member) == 100


async def _merge(mesh: Mesh, source: str, target: str) -> int:
    """Merges `source` into `target`; the target's points after it."""
    await mesh.ledger.stub.MergeMembers(
        ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=source, target_member_id=target)
    )
    return await points(mesh, target)


def _whole_return(purchase_id: str) -> ledger_pb2.RecordReturnRequest:
    """The return of line 0 (quantity 1) at HEL-01, under a fresh key."""
    return ledger_pb2.RecordReturnRequest(
        idempotency_key=key(), purchase_id=purchase_id, channel="pos", store_id="HEL-01",
        lines=[ledger_pb2.ReturnLine(line_index=0, quantity=1)],
    )  # fmt: skip


@pytest.mark.parametrize("same_shard", [False, True])
async def test_a_return_after_the_member_was_merged_takes_the_points_from_where_they_went(
    mesh: Mesh, same_shard: bool
) -> None:
    svc = mesh.ledger.app.service
    source = await welcomed_member(mesh)
    target = await new_member(mesh)
    while (svc.shard_of(target) == svc.shard_of(source)) != same_shard:
        target = await new_member(mesh)
    paid = (await redeem(mesh.ledger.stub, source, 30)).transaction.transaction_id
    bought = await buy(mesh, source, [("misc", 4000, 1)], tender=paid)
    merged = await _merge(mesh, source, target)
    request = _whole_return(bought.purchase.purchase_id)
    back = await mesh.ledger.stub.RecordReturn(request)
    assert (reversed_points(back), back.tender_recredited_points, back.debt_points) == (40, 30, 0)
    assert await points(mesh, target) == merged - 40 + 30
    assert (await balance(mesh.ledger.stub, source)).balance_points == 0
    again = await mesh.ledger.stub.RecordReturn(request)  # a replay changes nothing
    assert (reversed_points(again), again.tender_recredited_points) == (40, 30)
    assert await points(mesh, target) == merged - 40 + 30
    totals = await mesh.ledger.stub.GetTotals(ledger_pb2.GetTotalsRequest(fresh=True))
    assert totals.differences == 0


async def test_part_of_a_zero_total_purchase_is_returned_by_its_lines(mesh: Mesh) -> None:
    member = await new_member(mesh)
    free = await buy(mesh, member, [("misc", 0, 2)])  # two free items; the welcome bonus is fixed
    first = await return_lines(mesh, free.purchase.purchase_id, [(0, 1)])
    assert reversed_points(first) == 0  # a fixed bonus stays until everything is back
    last = await return_lines(mesh, free.purchase.purchase_id, [(0, 1)])
    assert reversed_points(last) == 100
    assert await points(mesh, member) == 0


async def test_a_merged_away_members_tender_follows_the_merge_even_with_no_earn_left_to_reverse(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = mesh.ledger.app.service
    source, target = await welcomed_member(mesh), await new_member(mesh)
    paid = (await redeem(mesh.ledger.stub, source, 30)).transaction.transaction_id
    bought = await buy(mesh, source, [("misc", 4000, 1)], tender=paid)
    for earn_tx in bought.purchase.earn_transactions.values():
        await mesh.ledger.stub.Reverse(
            ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=earn_tx, full=True)
        )
    merged = await _merge(mesh, source, target)
    request = _whole_return(bought.purchase.purchase_id)
    # Fault injection: the first sweep fails after the return committed; the client retries.
    real_sweep = svc.sagas.sweep_merged
    calls: list[str] = []

    async def failing_once(src: str, dst: str) -> dict[str, int]:
        calls.append(src)
        if len(calls) == 1:
            raise StoreClosed("injected")
        return await real_sweep(src, dst)

    monkeypatch.setattr(svc.sagas, "sweep_merged", failing_once)
    await rpc_error(mesh.ledger.stub.RecordReturn(request), grpc.StatusCode.UNAVAILABLE)
    back = await mesh.ledger.stub.RecordReturn(request)
    assert (reversed_points(back), back.tender_recredited_points) == (0, 30)
    assert (await points(mesh, target), await points(mesh, source)) == (merged + 30, 0)
    totals = await mesh.ledger.stub.GetTotals(ledger_pb2.GetTotalsRequest(fresh=True))
    assert totals.differences == 0


async def test_switching_return_mode_is_refused_on_the_field_the_request_used(mesh: Mesh) -> None:
    """After a return by lines, a refund is refused naming `refund` (the field a till shows the
    error on), and the other way round naming `lines`."""
    member = await welcomed_member(mesh)
    by_lines = (await buy(mesh, member, [("misc", 2000, 2)])).purchase.purchase_id
    by_amount = (await buy(mesh, member, [("misc", 2000, 2)])).purchase.purchase_id
    await return_lines(mesh, by_lines, [(0, 1)])
    await mesh.ledger.stub.RecordReturn(_refund(by_amount, 500))
    refund = await rpc_error(mesh.ledger.stub.RecordReturn(_refund(by_lines, 500)), grpc.StatusCode.FAILED_PRECONDITION)
    lines = await rpc_error(
        mesh.ledger.stub.RecordReturn(ledger_pb2.RecordReturnRequest(
            idempotency_key=key(), purchase_id=by_amount, channel="pos", store_id="HEL-01",
            lines=[ledger_pb2.ReturnLine(line_index=0, quantity=1)],
        )),
        grpc.StatusCode.FAILED_PRECONDITION,
    )  # fmt: skip
    assert (error_field(refund), error_field(lines)) == ("refund", "lines")


def _refund(purchase_id: str, minor: int) -> ledger_pb2.RecordReturnRequest:
    return ledger_pb2.RecordReturnRequest(
        idempotency_key=key(), purchase_id=purchase_id, channel="pos", store_id="HEL-01",
        refund=common_pb2.Money(amount_minor=minor, currency="EUR"),
    )  # fmt: skip


async def test_a_basket_multiplier_comes_back_with_the_lines_it_paid_on(mesh: Mesh) -> None:
    """A `per: basket` 3x on wine pays 60 on 30 base wine points. Returning the bread (which it
    did not pay on) takes back the bread's 10 base points and none of the wine bonus; returning
    one of the three bottles takes back its 10 base and a third of the bonus."""
    wine = PROGRAM.read_text().replace(
        "rules:\n",
        'rules:\n  - {id: wine-x3, priority: 90, when: {categories: [wine]}, effect: {multiplier: "3", per: basket}}\n',
    )
    await mesh.rules.stub.PublishProgram(
        rules_pb2.PublishProgramRequest(idempotency_key=common_pb2.IdempotencyKey(key="wine"), document=wine)
    )
    member = await welcomed_member(mesh)
    bought = await buy(mesh, member, [("wine", 3000, 3), ("bread", 1000, 1)])
    pid = bought.purchase.purchase_id
    assert by_rule(bought.purchase) == {"base": 40, "wine-x3": 60}
    (bonus,) = (p.part for p in bought.purchase.parts if p.part.rule_id == "wine-x3")
    assert [(m.line_index, m.points) for m in bonus.multiplied_lines] == [(0, 30)]
    bread = await return_lines(mesh, pid, [(1, 1)])
    assert reversed_points(bread) == 10
    bottle = await return_lines(mesh, pid, [(0, 1)])
    assert reversed_points(bottle) == 10 + 20
    returned = {p.part.rule_id: p.returned_points for p in bottle.purchase.parts if p.part.unit == "points"}
    assert returned["wine-x3"] == 20
    rest = await return_lines(mesh, pid, [(0, 2)])
    assert reversed_points(rest) == 20 + 40
    assert await points(mesh, member) == 100


async def test_a_returned_boost_gives_its_day_cap_back(mesh: Mesh) -> None:
    """boost is x5 with a day cap of 50: 20.00 EUR of boost earns 20 base + 50 boost (cut from
    80). Returned and bought again the same day (an exchange), the member kept none of the first
    50 boost points, so the second purchase earns the boost again; a return of half of it then
    gives half back to the cap."""
    member = await welcomed_member(mesh)
    first = await buy(mesh, member, [("boost", 2000, 1)])
    assert by_rule(first.purchase) == {"base": 20, "boost": 50}
    back = await return_lines(mesh, first.purchase.purchase_id, [(0, 1)])
    assert reversed_points(back) == 70
    again = await buy(mesh, member, [("boost", 2000, 2)])
    assert by_rule(again.purchase) == {"base": 20, "boost": 50}
    await return_lines(mesh, again.purchase.purchase_id, [(0, 1)])  # 10 base + 25 boost back
    third = await buy(mesh, member, [("boost", 400, 1)])
    assert by_rule(third.purchase) == {"base": 4, "boost": 16}


async def test_a_returned_boost_of_a_merged_away_member_gives_the_cap_back_on_the_heir(mesh: Mesh) -> None:
    """The cap counters went to the heir with the merge: the return of the source's boosted
    purchase gives the cap back there."""
    source, heir = await welcomed_member(mesh), await welcomed_member(mesh)
    first = await buy(mesh, source, [("boost", 2000, 1)])
    assert by_rule(first.purchase) == {"base": 20, "boost": 50}
    await mesh.ledger.stub.MergeMembers(
        ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=source, target_member_id=heir)
    )
    capped = await buy(mesh, heir, [("boost", 400, 1)])
    assert by_rule(capped.purchase) == {"base": 4, "boost": 0}  # the person's day cap is used up
    back = await return_lines(mesh, first.purchase.purchase_id, [(0, 1)])
    assert reversed_points(back) == 70
    again = await buy(mesh, heir, [("boost", 400, 1)])
    assert by_rule(again.purchase) == {"base": 4, "boost": 16}


async def test_a_returned_boost_gives_the_cap_back_down_a_chain_merged_during_the_return(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A into B, then B into C while A's return runs (between the return's write and its
    reversal on B): the cap use given back on B, merged away by then, reaches C with the next
    sweep, where the person's counters are, so C's next boost earns again."""
    svc = mesh.ledger.app.service
    source, heir, last = await welcomed_member(mesh), await welcomed_member(mesh), await welcomed_member(mesh)
    first = await buy(mesh, source, [("boost", 2000, 1)])
    assert by_rule(first.purchase) == {"base": 20, "boost": 50}
    await mesh.ledger.stub.MergeMembers(
        ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=source, target_member_id=heir)
    )
    real_drive = svc.sagas.drive_reversal

    async def merge_heir_first(saga_id: str):  # type: ignore[no-untyped-def]
        monkeypatch.setattr(svc.sagas, "drive_reversal", real_drive)
        await mesh.ledger.stub.MergeMembers(
            ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=heir, target_member_id=last)
        )
        return await real_drive(saga_id)

    monkeypatch.setattr(svc.sagas, "drive_reversal", merge_heir_first)
    back = await return_lines(mesh, first.purchase.purchase_id, [(0, 1)])
    assert reversed_points(back) == 70
    again = await buy(mesh, last, [("boost", 400, 1)])
    assert by_rule(again.purchase) == {"base": 4, "boost": 16}
    totals = await mesh.ledger.stub.GetTotals(ledger_pb2.GetTotalsRequest(fresh=True))
    assert totals.differences == 0


async def test_an_ops_reversal_of_a_merged_away_members_boost_gives_the_cap_back_on_the_heir(mesh: Mesh) -> None:
    """Ops reversing the source's boosted earn in full, after the merge: the heir, who has the
    person's counters, earns the boost again the same day."""
    source, heir = await welcomed_member(mesh), await welcomed_member(mesh)
    first = await buy(mesh, source, [("boost", 2000, 1)])
    await mesh.ledger.stub.MergeMembers(
        ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=source, target_member_id=heir)
    )
    assert by_rule((await buy(mesh, heir, [("boost", 400, 1)])).purchase) == {"base": 4, "boost": 0}
    await mesh.ledger.stub.Reverse(ledger_pb2.ReverseRequest(
        idempotency_key=key(), transaction_id=first.purchase.earn_transactions["points"], full=True,
    ))  # fmt: skip
    assert by_rule((await buy(mesh, heir, [("boost", 400, 1)])).purchase) == {"base": 4, "boost": 16}


@pytest.mark.parametrize("merged", [False, True])
async def test_an_ops_refund_reversal_of_the_whole_boost_gives_the_cap_back(mesh: Mesh, merged: bool) -> None:
    """Reversed whole by a refund of the whole purchase, as by `full`: the cap is given back,
    on the member or (merged away) on its heir."""
    """Ops reversing the boosted earn by a refund of the whole purchase reverses it whole, as
    `full=True` does: the cap use comes back whether the member was merged away or not."""
    source, heir = await welcomed_member(mesh), await welcomed_member(mesh)
    first = await buy(mesh, source, [("boost", 2000, 1)])
    assert by_rule(first.purchase) == {"base": 20, "boost": 50}
    spender = source
    if merged:
        await mesh.ledger.stub.MergeMembers(
            ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=source, target_member_id=heir)
        )
        spender = heir
    assert by_rule((await buy(mesh, spender, [("boost", 400, 1)])).purchase) == {"base": 4, "boost": 0}
    rev = await mesh.ledger.stub.Reverse(ledger_pb2.ReverseRequest(
        idempotency_key=key(), transaction_id=first.purchase.earn_transactions["points"], refund_amount=money(2000),
    ))  # fmt: skip
    assert rev.reversed_points == 70
    assert by_rule((await buy(mesh, spender, [("boost", 400, 1)])).purchase) == {"base": 4, "boost": 16}
