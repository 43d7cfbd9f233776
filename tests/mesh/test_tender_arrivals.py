"""A receipt paid partly with points names its tender only when the till sends it: the store's
legacy file or end-of-day export carries the same receipt without it. Either order is one
receipt, earned once, and the points paid come back with a return."""

from __future__ import annotations

import grpc

from pointmesh.v1 import common_pb2, ledger_pb2
from tests.ledger.helpers import key, redeem, rpc_error
from tests.mesh.conftest import Mesh
from tests.mesh.helpers import exact, points, purchase_request, return_lines, welcomed_member
from tests.mesh.test_batch_accrual import ingest
from tests.mesh.test_merges_and_policy import merge


async def _paid(mesh: Mesh, member: str, pts: int) -> str:
    return (await redeem(mesh.ledger.stub, member, pts)).transaction.transaction_id


async def test_a_file_copy_without_the_tender_of_a_receipt_the_till_sent_is_a_duplicate(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    paid = await _paid(mesh, member, 80)
    till = purchase_request(member, [("misc", 4000, 1)], at=mesh.clock.now(), tender=paid)
    first = await mesh.ledger.stub.RecordPurchase(till)
    filed = ledger_pb2.RecordPurchaseRequest()
    filed.CopyFrom(till)
    filed.tender_transaction_id = ""

    again = await mesh.ledger.stub.RecordPurchase(filed)
    batched = await ingest(mesh, [ledger_pb2.IngestBatchRequest(purchase=filed)])

    assert again.replayed and again.purchase.purchase_id == first.purchase.purchase_id
    assert again.purchase.tender_transaction_id == paid and again.purchase.tender_points == 80
    assert (batched.posted, batched.replayed, batched.failed) == (0, 1, 0)
    assert await points(mesh, member) == 100 - 80 + exact(first.purchase)["points"]


async def test_the_till_naming_its_tender_after_the_file_links_it_and_the_return_gives_it_back(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    paid = await _paid(mesh, member, 80)
    filed = purchase_request(member, [("misc", 4000, 1)], at=mesh.clock.now())
    first = await mesh.ledger.stub.RecordPurchase(filed)
    assert first.purchase.tender_points == 0
    till = ledger_pb2.RecordPurchaseRequest()
    till.CopyFrom(filed)
    till.tender_transaction_id = paid
    till.idempotency_key.CopyFrom(common_pb2.IdempotencyKey(namespace="pos", key="till-1"))

    linked = await mesh.ledger.stub.RecordPurchase(till)
    retried = await mesh.ledger.stub.RecordPurchase(till)
    refiled = await mesh.ledger.stub.RecordPurchase(filed)

    assert linked.replayed and linked.purchase.purchase_id == first.purchase.purchase_id
    assert (linked.purchase.tender_transaction_id, linked.purchase.tender_points) == (paid, 80)
    assert retried.replayed and retried.purchase.tender_points == 80
    assert refiled.replayed and refiled.purchase.tender_points == 80
    earned = exact(first.purchase)["points"]
    assert await points(mesh, member) == 100 - 80 + earned  # earned once
    back = await return_lines(mesh, first.purchase.purchase_id, [(0, 1)])
    assert back.tender_recredited_points == 80
    assert await points(mesh, member) == 100


async def test_a_tender_named_after_a_partial_return_gives_back_the_returned_share_at_once(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    paid = await _paid(mesh, member, 80)
    filed = purchase_request(member, [("misc", 4000, 1)], at=mesh.clock.now())
    first = await mesh.ledger.stub.RecordPurchase(filed)
    await mesh.ledger.stub.RecordReturn(
        ledger_pb2.RecordReturnRequest(
            idempotency_key=key(), purchase_id=first.purchase.purchase_id, channel="pos", store_id="HEL-01",
            refund=common_pb2.Money(amount_minor=1000, currency="EUR"),
        )
    )  # fmt: skip
    before = await points(mesh, member)
    till = ledger_pb2.RecordPurchaseRequest()
    till.CopyFrom(filed)
    till.tender_transaction_id = paid

    linked = await mesh.ledger.stub.RecordPurchase(till)
    await mesh.ledger.stub.RecordPurchase(till)  # its retry gives nothing back twice

    assert linked.purchase.tender_points == 80
    assert await points(mesh, member) == before + 20


async def test_a_copy_naming_another_tender_than_the_recorded_one_is_a_conflict_and_changes_nothing(
    mesh: Mesh,
) -> None:
    member = await welcomed_member(mesh)
    paid, other = await _paid(mesh, member, 30), await _paid(mesh, member, 20)
    till = purchase_request(member, [("misc", 4000, 1)], at=mesh.clock.now(), tender=paid)
    await mesh.ledger.stub.RecordPurchase(till)
    before = await points(mesh, member)
    till.tender_transaction_id = other

    error = await rpc_error(mesh.ledger.stub.RecordPurchase(till), grpc.StatusCode.ALREADY_EXISTS)

    assert paid in error.details() and other in error.details()
    assert await points(mesh, member) == before


async def test_a_tender_named_after_the_file_must_still_be_a_redemption_of_the_member(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    filed = purchase_request(member, [("misc", 4000, 1)], at=mesh.clock.now())
    first = await mesh.ledger.stub.RecordPurchase(filed)
    filed.tender_transaction_id = first.purchase.earn_transactions["points"]  # an earn, not a redemption

    error = await rpc_error(mesh.ledger.stub.RecordPurchase(filed), grpc.StatusCode.INVALID_ARGUMENT)

    assert "not a redemption of member" in error.details()
    got = await mesh.ledger.stub.GetPurchase(ledger_pb2.GetPurchaseRequest(purchase_id=first.purchase.purchase_id))
    assert got.purchase.tender_transaction_id == ""


async def test_a_file_copy_without_the_tender_after_the_member_was_merged_is_the_same_receipt(mesh: Mesh) -> None:
    a, b = await welcomed_member(mesh), await welcomed_member(mesh)
    paid = await _paid(mesh, a, 80)
    till = purchase_request(a, [("misc", 4000, 1)], at=mesh.clock.now(), receipt="merged-tender-1")
    till.tender_transaction_id = paid
    first = await mesh.ledger.stub.RecordPurchase(till)
    await merge(mesh, a, b)
    before = await points(mesh, b)
    filed = purchase_request(b, [("misc", 4000, 1)], at=mesh.clock.now(), receipt="merged-tender-1")

    again = await mesh.ledger.stub.RecordPurchase(filed)

    assert again.replayed and again.purchase.purchase_id == first.purchase.purchase_id
    assert await points(mesh, b) == before


async def test_another_members_redemption_named_as_tender_is_refused_alike_on_any_shard(mesh: Mesh) -> None:
    """Whether the other member's redemption lives in the buyer's shard or another, the till is
    told the same: it is not a redemption of the buyer (before, another shard's read as "does
    not exist", NOT_FOUND)."""
    member = await welcomed_member(mesh)
    for _ in range(6):  # members land on either shard
        other = await welcomed_member(mesh)
        named = purchase_request(member, [("misc", 4000, 1)], at=mesh.clock.now(), tender=await _paid(mesh, other, 10))
        error = await rpc_error(mesh.ledger.stub.RecordPurchase(named), grpc.StatusCode.INVALID_ARGUMENT)
        assert "not a redemption of member" in error.details()
    assert await points(mesh, member) == 100
