"""Batch order as one by one: a reversal of a merged-away member's earn keeps its place among the
items of the member its points live with now (the heir), and of two receipts a till sent under
one transport key the first in the stream decides."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest

from pointmesh.v1 import ledger_pb2
from tests.ledger.helpers import balance, figures, key
from tests.mesh.conftest import Mesh
from tests.mesh.helpers import by_rule, new_member, purchase_request
from tests.mesh.test_batch_accrual import ingest
from tests.mesh.test_merged_state_and_waiting import merge


@pytest.mark.parametrize("order", ["purchase_first", "reversal_first"])
@pytest.mark.parametrize("path", ["unary", "batch"])
async def test_a_merged_members_reversal_keeps_its_place_among_the_heirs_purchases(
    mesh: Mesh, path: str, order: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heir is silver on the merged-away member's tier credits. Stream [purchase of the heir,
    reversal of the merged-away member's credit earn] must price the purchase at silver (as
    RecordPurchase then Reverse do); [reversal, purchase] at blue. The batch cuts a segment where
    one member's items switch kind; it took the reversal's member to be the merged-away one, so
    the two ran side by side and whichever committed first won (rules_svc answering EvaluateBatch
    in 300 ms, or a slow saga, decided it). Here rules_svc is made slow for the purchase-first
    order and the saga for the reversal-first order, so each failed every time before the fix."""
    svc = mesh.ledger.app.service
    engine = svc.accrual.engine
    real_quote_many, real_reverse = engine.quote_many, svc.reverse

    async def slow_quote_many(*args, **kwargs):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.3)
        return await real_quote_many(*args, **kwargs)

    async def slow_reverse(*args, **kwargs):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.3)
        return await real_reverse(*args, **kwargs)

    if path == "batch":
        if order == "purchase_first":
            monkeypatch.setattr(engine, "quote_many", slow_quote_many)
        else:
            monkeypatch.setattr(svc, "reverse", slow_reverse)
    gone, heir = await new_member(mesh), await new_member(mesh)
    at = mesh.clock.now() - timedelta(minutes=10)
    crossed = (await mesh.ledger.stub.RecordPurchase(purchase_request(gone, [("misc", 31000, 1)], at=at))).purchase
    assert crossed.tier_after == "silver"
    await merge(mesh, gone, heir)  # the heir is silver on the merged-away member's credits
    bought = purchase_request(heir, [("misc", 1000, 1)], at=at + timedelta(minutes=1))
    reverse = ledger_pb2.ReverseRequest(
        idempotency_key=key(), transaction_id=crossed.earn_transactions["tier_credits"], full=True, reason="ops"
    )
    if path == "unary":
        if order == "purchase_first":
            purchase = (await mesh.ledger.stub.RecordPurchase(bought)).purchase
            await mesh.ledger.stub.Reverse(reverse)
        else:
            await mesh.ledger.stub.Reverse(reverse)
            purchase = (await mesh.ledger.stub.RecordPurchase(bought)).purchase
    else:
        items = [ledger_pb2.IngestBatchRequest(purchase=bought), ledger_pb2.IngestBatchRequest(reverse=reverse)]
        if order == "reversal_first":
            items.reverse()
        response = await ingest(mesh, items)
        assert (response.posted, response.failed) == (2, 0), response.failures
        purchase = (await mesh.ledger.stub.GetPurchase(
            ledger_pb2.GetPurchaseRequest(purchase_id=response.purchases[0].purchase_id))).purchase  # fmt: skip
    expected = ("silver", {"base": 10, "silver": 10}) if order == "purchase_first" else ("blue", {"base": 10})
    assert (purchase.tier_before, by_rule(purchase)) == expected


@pytest.mark.parametrize("path", ["unary", "batch"])
async def test_the_first_receipt_in_the_stream_under_a_transport_key_decides(mesh: Mesh, path: str) -> None:
    """Two receipts (of two members) that a till sent under one transport key: purchase by
    purchase the first earns and the second is the conflict. In a batch both take the unary
    path side by side, and whichever claimed the key first won: here B, whose purchase waits
    behind an earlier one for rules_svc and so skips the Evaluate call A's makes. The later
    copy of a transport key now waits for the first's answer, as a natural key's does."""
    a, b = await new_member(mesh), await new_member(mesh)
    at = mesh.clock.now() - timedelta(minutes=5)
    await mesh.stop_rules()
    parked = await mesh.ledger.stub.RecordPurchase(purchase_request(b, [("misc", 500, 1)], at=at))
    assert parked.purchase.status == ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL
    await mesh.restart_rules()
    await asyncio.sleep(1.1)  # the breaker (BREAKER_SECONDS) closes again
    first = purchase_request(a, [("misc", 1000, 1)], at=at, receipt="till-1", transport_key="tx-77")
    second = purchase_request(b, [("misc", 2000, 1)], at=at, receipt="till-2", transport_key="tx-77")
    if path == "unary":
        await mesh.ledger.stub.RecordPurchase(first)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mesh.ledger.stub.RecordPurchase(second)
        assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    else:
        response = await ingest(mesh, [ledger_pb2.IngestBatchRequest(purchase=p) for p in (first, second)])
        assert [(f.index, f.code) for f in response.failures] == [(1, "ALREADY_EXISTS")]
    assert figures(await balance(mesh.ledger.stub, a))["balance"] == 110
