"""IngestBatch gives what RecordPurchase and Reverse give one by one, where a batch once did
not: a receipt refused for a tender that is not one can come again corrected (over either
path); the first copy in the stream of a receipt named for two members decides; a reversal
takes the tier credits off the month they qualified in. Figures from tests/mesh/program.yaml."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest

from pointmesh.v1 import ledger_pb2
from tests.ledger.helpers import balance, earn, figures, key
from tests.mesh.conftest import Mesh
from tests.mesh.helpers import by_rule, exact, new_member, purchase_request
from tests.mesh.test_batch_accrual import as_items, ingest


@pytest.mark.parametrize("path", ["batch", "unary"])
async def test_a_receipt_refused_for_a_bad_tender_earns_when_sent_again_corrected(mesh: Mesh, path: str) -> None:
    member = await new_member(mesh)
    at = mesh.clock.now() - timedelta(minutes=5)
    first = await mesh.ledger.stub.RecordPurchase(purchase_request(member, [("misc", 1000, 1)], at=at))
    not_a_redemption = first.purchase.earn_transactions["points"]
    bad = purchase_request(member, [("misc", 3000, 1)], at=at, receipt=f"tender-{path}", tender=not_a_redemption)
    fixed = purchase_request(member, [("misc", 3000, 1)], at=at, receipt=f"tender-{path}")
    before = figures(await balance(mesh.ledger.stub, member))["balance"]

    if path == "batch":
        refused = await ingest(mesh, as_items([bad]))
        assert [(f.index, f.code, f.field) for f in refused.failures] == [
            (0, "INVALID_ARGUMENT", "tender_transaction_id")
        ]
        again = await ingest(mesh, as_items([fixed]))
        assert (again.posted, again.failed) == (1, 0), again.failures
    else:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mesh.ledger.stub.RecordPurchase(bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        earned = await mesh.ledger.stub.RecordPurchase(fixed)
        assert earned.purchase.status == ledger_pb2.PURCHASE_STATUS_EARNED

    assert figures(await balance(mesh.ledger.stub, member))["balance"] == before + 30


async def test_the_first_copy_in_the_stream_of_a_receipt_named_for_two_members_decides(mesh: Mesh) -> None:
    """A's copy carries a transport key (so it takes the unary path inside the batch); B's copy,
    later in the stream, is the one refused, as purchase by purchase."""
    a, b = await new_member(mesh), await new_member(mesh)
    at = mesh.clock.now() - timedelta(minutes=5)
    copies = [
        purchase_request(a, [("misc", 1000, 1)], at=at, receipt="shared-1", transport_key="pos-tx-1"),
        purchase_request(b, [("misc", 1000, 1)], at=at, receipt="shared-1"),
    ]

    got = await ingest(mesh, as_items(copies))

    assert [(f.index, f.code) for f in got.failures] == [(1, "ALREADY_EXISTS")]
    assert figures(await balance(mesh.ledger.stub, a))["balance"] == 110
    assert figures(await balance(mesh.ledger.stub, b))["balance"] == 0


@pytest.mark.parametrize("path", ["batch", "unary"])
async def test_a_reversed_tier_credit_earn_takes_the_member_back_down(mesh: Mesh, path: str) -> None:
    member = await new_member(mesh)
    at = mesh.clock.now() - timedelta(minutes=10)
    crossed = (await mesh.ledger.stub.RecordPurchase(purchase_request(member, [("misc", 31000, 1)], at=at))).purchase
    assert crossed.tier_after == "silver"
    reverse = ledger_pb2.ReverseRequest(
        idempotency_key=key(), transaction_id=crossed.earn_transactions["tier_credits"], full=True, reason="ops"
    )
    if path == "batch":
        done = await ingest(mesh, [ledger_pb2.IngestBatchRequest(reverse=reverse)])
        assert (done.posted, done.failed) == (1, 0), done.failures
    else:
        await mesh.ledger.stub.Reverse(reverse)

    after = (await mesh.ledger.stub.RecordPurchase(
        purchase_request(member, [("misc", 1000, 1)], at=at + timedelta(minutes=1))
    )).purchase  # fmt: skip

    assert (after.tier_before, exact(after)) == ("blue", {"points": 10, "tier_credits": 10})


@pytest.mark.parametrize("path", ["unary", "batch"])
async def test_a_purchase_ahead_of_a_reversal_in_the_stream_is_priced_before_it(mesh: Mesh, path: str) -> None:
    """The reversal of the member's tier-credit earn comes after the purchase in the stream, so
    the purchase meets silver (2x), as RecordPurchase then Reverse price it. A reversal names a
    transaction, not a member: it ran beside the purchase, committed first, and the purchase was
    priced at blue."""
    member = await new_member(mesh)
    at = mesh.clock.now() - timedelta(minutes=10)
    crossed = (await mesh.ledger.stub.RecordPurchase(purchase_request(member, [("misc", 31000, 1)], at=at))).purchase
    assert crossed.tier_after == "silver"
    bought = purchase_request(member, [("misc", 1000, 1)], at=at + timedelta(minutes=1))
    reverse = ledger_pb2.ReverseRequest(
        idempotency_key=key(), transaction_id=crossed.earn_transactions["tier_credits"], full=True, reason="ops"
    )
    if path == "unary":
        purchase = (await mesh.ledger.stub.RecordPurchase(bought)).purchase
        await mesh.ledger.stub.Reverse(reverse)
    else:
        response = await ingest(mesh, [ledger_pb2.IngestBatchRequest(purchase=bought),
                                       ledger_pb2.IngestBatchRequest(reverse=reverse)])  # fmt: skip
        assert (response.posted, response.failed) == (2, 0), response.failures
        purchase = (await mesh.ledger.stub.GetPurchase(
            ledger_pb2.GetPurchaseRequest(purchase_id=response.purchases[0].purchase_id))).purchase  # fmt: skip
    assert (purchase.tier_before, by_rule(purchase)) == ("silver", {"base": 10, "silver": 10})


@pytest.mark.parametrize("path", ["unary", "batch"])
async def test_a_receipt_corrected_later_in_the_stream_earns_in_its_place(mesh: Mesh, path: str) -> None:
    """Refused for a tender that is not one and sent again corrected in the same stream, the
    receipt is the member's first purchase (welcome bonus) and lifts them to silver for the
    purchase after it, as one by one. The corrected copy waited for the whole batch, so the
    purchase after it took the welcome bonus and was priced at blue."""
    member, other = await new_member(mesh), await new_member(mesh)
    not_a_tender = (await earn(mesh.ledger.stub, other, 10)).transaction.transaction_id
    at = mesh.clock.now() - timedelta(minutes=10)
    stream = [
        purchase_request(member, [("misc", 31000, 1)], at=at, receipt="big", tender=not_a_tender),
        purchase_request(member, [("misc", 31000, 1)], at=at, receipt="big"),  # corrected
        purchase_request(member, [("misc", 1000, 1)], at=at + timedelta(minutes=1), receipt="small"),
    ]

    if path == "unary":
        with pytest.raises(grpc.aio.AioRpcError):
            await mesh.ledger.stub.RecordPurchase(stream[0])
        got = [(await mesh.ledger.stub.RecordPurchase(r)).purchase for r in stream[1:]]
    else:
        response = await ingest(mesh, as_items(stream))
        assert [(f.index, f.field) for f in response.failures] == [(0, "tender_transaction_id")]
        got = [
            (await mesh.ledger.stub.GetPurchase(ledger_pb2.GetPurchaseRequest(purchase_id=p.purchase_id))).purchase
            for p in response.purchases
        ]

    assert [(p.receipt_id, p.purchase_number, p.tier_before, by_rule(p)) for p in got] == [
        ("big", 1, "blue", {"base": 310, "big-basket": 20, "welcome": 100}),
        ("small", 2, "silver", {"base": 10, "silver": 10}),
    ]
