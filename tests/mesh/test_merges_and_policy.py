"""Purchases of members merged away, and program policy the ledger must follow: after chained
merges (A into B, B into C) a return's points come off C, the member holding them; after the
merged-away member was erased, a tender given back still follows the merge; a merge carries the
tier qualification and purchase count; a program whose points never expire dates no lot. Both
stores (tests/mesh)."""

from __future__ import annotations

from datetime import timedelta

import grpc

from ledger_svc.reconcile import reconcile
from pointmesh.v1 import common_pb2, ledger_pb2, rules_pb2
from tests.ledger.helpers import balance, error_field, figures, key, redeem, rpc_error
from tests.mesh.conftest import PROGRAM, Mesh
from tests.mesh.helpers import buy, exact, new_member, purchase_request, return_lines, welcomed_member
from tests.mesh.test_batch_accrual import as_items, ingest


async def merge(mesh: Mesh, source: str, target: str) -> None:
    await mesh.ledger.stub.MergeMembers(ledger_pb2.MergeMembersRequest(
        idempotency_key=key(), source_member_id=source, target_member_id=target))  # fmt: skip


async def books_balance(mesh: Mesh) -> None:
    report = await reconcile(mesh.ledger.app.store, mesh.clock.now())
    assert report.ok, [d.describe() for d in report.differences]


async def test_a_return_after_chained_merges_takes_its_points_from_the_end_of_the_chain(mesh: Mesh) -> None:
    s = mesh.ledger.stub
    a, b, c = await welcomed_member(mesh), await new_member(mesh), await new_member(mesh)
    bought = await buy(mesh, a, [("misc", 5000, 1)])
    earned = exact(bought.purchase)
    await merge(mesh, a, b)
    await merge(mesh, b, c)
    before = figures(await balance(s, c))

    back = await return_lines(mesh, bought.purchase.purchase_id, [(0, 1)])

    assert back.debt_points == 0
    assert [figures(await balance(s, m))["debt"] for m in (a, b)] == [0, 0]
    assert figures(await balance(s, c))["balance"] == before["balance"] - earned["points"]
    await books_balance(mesh)


async def test_a_tender_given_back_to_an_erased_merged_member_follows_the_merge(mesh: Mesh) -> None:
    s = mesh.ledger.stub
    a, b = await welcomed_member(mesh), await new_member(mesh)
    paid = (await redeem(s, a, 80)).transaction.transaction_id
    bought = await buy(mesh, a, [("misc", 4000, 1)], tender=paid)
    await merge(mesh, a, b)
    await s.EraseMember(ledger_pb2.EraseMemberRequest(idempotency_key=key(), member_id=a))
    before = figures(await balance(s, b))["balance"]

    back = await return_lines(mesh, bought.purchase.purchase_id, [(0, 1)])

    assert back.tender_recredited_points == 80
    assert figures(await balance(s, a))["balance"] == 0  # nothing left on the erased member
    assert figures(await balance(s, b))["balance"] == before + 80 - sum(u.points for u in back.reversed
                                                                        if u.unit == "points")  # fmt: skip
    await books_balance(mesh)


async def test_a_merge_carries_the_tier_qualification_and_purchase_count_to_the_target(mesh: Mesh) -> None:
    """The target keeps everything: the person's tier and purchase number do not reset (nor a
    welcome bonus come again) because two of their accounts became one; a replayed merge adds
    nothing twice."""
    a, b = await welcomed_member(mesh), await new_member(mesh)
    crossed = await buy(mesh, a, [("misc", 30_000, 1)])
    assert (crossed.purchase.tier_before, crossed.purchase.tier_after) == ("blue", "silver")
    request = ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=a, target_member_id=b)
    await mesh.ledger.stub.MergeMembers(request)
    await mesh.ledger.stub.MergeMembers(request)

    after = (await buy(mesh, b, [("misc", 1_000, 1)])).purchase

    assert (after.tier_before, after.purchase_number) == ("silver", 3)
    assert "welcome" not in {p.part.rule_id for p in after.parts}
    await books_balance(mesh)


async def test_a_program_whose_points_never_expire_gives_lots_no_expiry(mesh: Mesh) -> None:
    """`expiry_days: null` is never: the ledger's own default (for earns that name no program)
    must not date a purchase's points in its place."""
    never = PROGRAM.read_text().replace("  expiry_days: 365\n", "  expiry_days: null\n")
    assert never != PROGRAM.read_text()
    await mesh.rules.stub.PublishProgram(
        rules_pb2.PublishProgramRequest(idempotency_key=common_pb2.IdempotencyKey(key="never"), document=never)
    )
    member = await new_member(mesh)
    earned = exact((await buy(mesh, member, [("misc", 5000, 1)])).purchase)

    mesh.clock.advance(timedelta(days=800))
    expired = await mesh.ledger.stub.RunExpiry(ledger_pb2.RunExpiryRequest())

    assert expired.expired_points == 0
    assert figures(await balance(mesh.ledger.stub, member))["balance"] == earned["points"]


async def test_a_tender_given_back_keeps_the_programs_expiry_policy(mesh: Mesh) -> None:
    """Points paid as tender come back as a fresh lot dated by the purchase's program, not by the
    ledger's own default: never under `expiry_days: null`, and the program's days otherwise."""
    s = mesh.ledger.stub
    for version, (days, advance, kept) in enumerate([("null", 800, True), ("30", 31, False)]):
        document = PROGRAM.read_text().replace("  expiry_days: 365\n", f"  expiry_days: {days}\n")
        assert document != PROGRAM.read_text()
        await mesh.rules.stub.PublishProgram(rules_pb2.PublishProgramRequest(
            idempotency_key=common_pb2.IdempotencyKey(key=f"expiry-{version}"), document=document))  # fmt: skip
        member = await welcomed_member(mesh)
        await s.RunExpiry(ledger_pb2.RunExpiryRequest())
        paid = (await redeem(s, member, 80)).transaction.transaction_id
        bought = await buy(mesh, member, [("misc", 4000, 1)], tender=paid)
        back = await return_lines(mesh, bought.purchase.purchase_id, [(0, 1)])
        assert back.tender_recredited_points == 80
        before = figures(await balance(s, member))["balance"]

        mesh.clock.advance(timedelta(days=advance))
        await s.RunExpiry(ledger_pb2.RunExpiryRequest())

        after = figures(await balance(s, member))["balance"]
        assert after == (before if kept else 0), (days, before, after)
        await books_balance(mesh)


async def test_a_return_by_card_and_receipt_after_a_merge_finds_the_purchase_of_the_merged_away_member(
    mesh: Mesh,
) -> None:
    """A till (or a legacy file) knows the card and the receipt: the card resolves to the
    member it was merged into, and the receipt is the merged-away member's purchase."""
    s = mesh.ledger.stub
    a, b, c = await welcomed_member(mesh), await new_member(mesh), await new_member(mesh)
    bought = await buy(mesh, a, [("misc", 5000, 1)])
    earned = exact(bought.purchase)
    await merge(mesh, a, b)
    await merge(mesh, b, c)
    before = figures(await balance(s, c))["balance"]

    back = await s.RecordReturn(ledger_pb2.RecordReturnRequest(
        idempotency_key=key(), member_id=c, original_channel="pos", original_store_id="HEL-01",
        original_receipt_id=bought.purchase.receipt_id, channel="pos", store_id="HEL-01",
        lines=[ledger_pb2.ReturnLine(line_index=0, quantity=1)],
    ))  # fmt: skip

    assert back.purchase.purchase_id == bought.purchase.purchase_id
    assert figures(await balance(s, c))["balance"] == before - earned["points"]
    await books_balance(mesh)


async def test_a_receipt_sent_again_for_the_member_it_was_merged_into_is_the_same_purchase(mesh: Mesh) -> None:
    """A legacy file re-run after the merge names the card's member now: the receipt is the one
    already recorded, answered as a replay over either path, not refused as a conflict."""
    s = mesh.ledger.stub
    a, b = await welcomed_member(mesh), await new_member(mesh)
    at = mesh.clock.now() - timedelta(minutes=5)
    first = (await s.RecordPurchase(purchase_request(a, [("misc", 5000, 1)], at=at, receipt="again-1"))).purchase
    await merge(mesh, a, b)
    before = figures(await balance(s, b))["balance"]
    again = purchase_request(b, [("misc", 5000, 1)], at=at, receipt="again-1")

    unary = await s.RecordPurchase(again)
    batch = await ingest(mesh, as_items([again]))

    assert unary.replayed and unary.purchase.purchase_id == first.purchase_id
    assert (batch.replayed, batch.failed) == (1, 0), batch.failures
    assert figures(await balance(s, b))["balance"] == before


async def test_an_erased_merged_away_member_has_no_tier_of_its_own(mesh: Mesh) -> None:
    """Erasure wipes the profile, not the merge: the months the merge moved to the target
    showed again as the erased member's own tier (silver, 300 credits counted on both)."""
    s = mesh.ledger.stub
    a, b = await welcomed_member(mesh), await new_member(mesh)
    assert (await buy(mesh, a, [("misc", 30_000, 1)])).purchase.tier_after == "silver"
    await merge(mesh, a, b)
    await s.EraseMember(ledger_pb2.EraseMemberRequest(idempotency_key=key(), member_id=a))

    refused = await rpc_error(s.GetMemberTier(ledger_pb2.GetMemberTierRequest(member_id=a)),
                              grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip

    assert error_field(refused) == "member_id" and b in refused.details()
    assert (await s.GetMemberTier(ledger_pb2.GetMemberTierRequest(member_id=b))).status.tier == "silver"
