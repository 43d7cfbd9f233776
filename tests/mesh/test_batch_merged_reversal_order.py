"""A reversal of a merged-away member's earn in a batch keeps its place among the items of the
member its points live with now (the heir), as RecordPurchase then Reverse one by one."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from pointmesh.v1 import ledger_pb2
from tests.ledger.helpers import key
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
