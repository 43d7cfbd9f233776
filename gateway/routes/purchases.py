"""Purchases and returns. Channel and store come from the API key; the ledger dedupes each
receipt on its natural key, so the same receipt over REST and in a legacy file earns once."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response

from gateway import convert as cv
from gateway import schemas as s
from gateway.deps import Caller, GatewayDep, IdPath, Write, call, scoped, writing
from gateway.problems import bad_request, forbidden
from gateway.strict_json import StrictJsonRoute
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import ledger_pb2

router = APIRouter(prefix="/v1/purchases", tags=["purchases"], route_class=StrictJsonRoute)
LEDGER = "ledger_svc"


@router.post("", status_code=201, response_model=s.Purchase,
             responses={200: {"description": "A replay: this receipt was already recorded", "model": s.Purchase}},
             summary="Record a purchase; the points and their explanation come back")  # fmt: skip
async def record_purchase(
    body: s.RecordPurchase,
    response: Response,
    gw: GatewayDep,
    caller: Caller,
    write: Annotated[Write, writing("purchases:write")],
) -> s.Purchase:
    api_key, key = write
    if body.channel and body.channel != api_key.channel:
        raise forbidden(f"API key {api_key.key_id} acts for channel {api_key.channel}, not {body.channel}")
    store_id = caller.store_for(body.store_id)
    screened_at = body.context.store_id if body.context is not None else ""
    if screened_at:  # refused like a spend's context naming a store the key is not bound to
        caller.store_for(screened_at, "context.store_id")
        if screened_at != store_id:
            raise bad_request("body.context.store_id", f"names store {screened_at}, but the receipt is store "
                              f"{store_id}'s (body.store_id): a purchase is screened where it was made")  # fmt: skip
    request = ledger_pb2.RecordPurchaseRequest(
        idempotency_key=key, member_id=body.member_id, channel=api_key.channel, store_id=store_id,
        receipt_id=body.receipt_id, total=cv.money_pb(body.total), lines=cv.lines_pb(body.lines),
        receipt_time=to_timestamp(body.receipt_time), tender_transaction_id=body.tender_transaction_id,
        context=cv.context_pb(body.context, api_key.channel, store_id),
    )  # fmt: skip
    result = await call(LEDGER, gw.ledger.RecordPurchase(request))
    if result.replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return cv.purchase(result.purchase, result.replayed)


@router.get("/{purchase_id}", response_model=s.Purchase, dependencies=[scoped("members:read")],
            summary="A purchase with its explanation and returns")  # fmt: skip
async def get_purchase(purchase_id: IdPath, gw: GatewayDep) -> s.Purchase:
    result = await call(LEDGER, gw.ledger.GetPurchase(ledger_pb2.GetPurchaseRequest(purchase_id=purchase_id)))
    return cv.purchase(result.purchase)


@router.post("/{purchase_id}/returns", status_code=201, response_model=s.ReturnResult,
             summary="Return lines (or an amount) of a purchase, in any channel or store")  # fmt: skip
async def record_return(
    purchase_id: IdPath,
    body: s.RecordReturn,
    gw: GatewayDep,
    caller: Caller,
    write: Annotated[Write, writing("purchases:write")],
) -> s.ReturnResult:
    api_key, key = write
    request = ledger_pb2.RecordReturnRequest(
        idempotency_key=key, purchase_id=purchase_id, channel=api_key.channel, store_id=caller.store_for(body.store_id, required=False),
        lines=[ledger_pb2.ReturnLine(line_index=ln.line_index, quantity=ln.quantity) for ln in body.lines],
        refund=cv.money_pb(body.refund) if body.refund is not None else None,
    )  # fmt: skip
    result = await call(LEDGER, gw.ledger.RecordReturn(request))
    return s.ReturnResult(
        purchase=cv.purchase(result.purchase), reversed={u.unit: u.points for u in result.reversed},
        tender_recredited_points=result.tender_recredited_points, debt_points=result.debt_points,
    )  # fmt: skip
