"""Spending and moving points: redemptions (and their quotes), holds, transfers."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Response
from google.protobuf.duration_pb2 import Duration

from gateway import convert as cv
from gateway import schemas as s
from gateway.auth import Principal
from gateway.deps import Caller, Gateway, GatewayDep, IdPath, Write, call, scoped, writing
from gateway.keys import ApiKey
from gateway.strict_json import StrictJsonRoute
from pointmesh.bounds import MAX_POINTS
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import ledger_pb2, rules_pb2

router = APIRouter(prefix="/v1", tags=["points"], route_class=StrictJsonRoute)
LEDGER, RULES = "ledger_svc", "rules_svc"


def _screening(caller: Principal, api_key: ApiKey, context: s.ScreeningContext | None) -> ledger_pb2.ScreeningContext:
    """A spend's session facts for fraud screening: the key's channel, and the store the body
    names (checked against the key, and required of a key bound to several)."""
    store = caller.store_for(context.store_id if context is not None else "", "context.store_id")
    return cv.context_pb(context, api_key.channel, store)


@router.post("/redemptions", status_code=201, response_model=s.Redemption,
             responses={202: {"description": "Held for fraud review: the points are reserved until ops decides",
                              "model": s.Redemption},
                        200: {"description": "A retry of a redemption its fraud review rejected: REJECTED, the "
                                             "hold VOIDED, nothing paid (one it approved answers 201 PAID)",
                              "model": s.Redemption}},
             summary="Spend points (fraud-screened)")  # fmt: skip
async def redeem(
    body: s.Redeem,
    response: Response,
    gw: GatewayDep,
    caller: Caller,
    write: Annotated[Write, writing("redemptions:write")],
) -> s.Redemption:
    api_key, key = write
    request = ledger_pb2.RedeemRequest(
        idempotency_key=key, member_id=body.member_id, unit=body.unit, points=body.points, reference=body.reference,
        context=_screening(caller, api_key, body.context),
    )  # fmt: skip
    result = cv.redemption(await call(LEDGER, gw.ledger.Redeem(request)))
    if result.hold is not None:  # a retry says where it stands now, as a transfer's does
        response.status_code = 202 if result.status == "HELD_FOR_REVIEW" else 200
    return result


@router.post("/redemptions/quote", response_model=s.RedemptionQuote, dependencies=[scoped("redemptions:write")],
             summary="How many of the member's points may pay for a basket, and what they are worth")  # fmt: skip
async def quote(body: s.RedemptionQuoteRequest, gw: GatewayDep) -> s.RedemptionQuote:
    at = to_timestamp(gw.clock.now())  # one program version for both quotes below

    def asked(available: int) -> rules_pb2.QuoteRedemptionRequest:
        return rules_pb2.QuoteRedemptionRequest(
            program=gw.settings.program, basket_total=cv.money_pb(body.basket_total),
            points_available=available, points_wanted=body.points_wanted, at=at,
        )  # fmt: skip

    # The program names the unit that pays; the member's spendable balance of that unit (as a
    # redemption would find it: an active member, points past their date left out) bounds it.
    unit = (await call(RULES, gw.rules.QuoteRedemption(asked(MAX_POINTS)))).unit
    balance = await call(LEDGER, gw.ledger.GetBalance(
        ledger_pb2.GetBalanceRequest(member_id=body.member_id, unit=unit, for_spending=True)
    ))  # fmt: skip
    q = await call(RULES, gw.rules.QuoteRedemption(asked(balance.balance.available_points)))
    return s.RedemptionQuote(points=q.points, pays=cv.money(q.pays), remaining=cv.money(q.remaining), unit=q.unit,
                             explanation=q.explanation, program_version=q.version)  # fmt: skip


@router.post("/holds", status_code=201, response_model=s.Hold,
             responses={202: {"description": "Held for fraud review: the hold belongs to the review; approval "
                                             "captures it, and the caller cannot capture or void it",
                              "model": s.Hold},
                        200: {"description": "A retry once its fraud review decided: the hold as decided "
                                             "(CAPTURED or VOIDED)", "model": s.Hold}},
             summary="Reserve points (place a hold; fraud-screened)")  # fmt: skip
async def place_hold(
    body: s.PlaceHold,
    response: Response,
    gw: GatewayDep,
    caller: Caller,
    write: Annotated[Write, writing("redemptions:write")],
) -> s.Hold:
    api_key, key = write
    timeout = Duration()
    if body.timeout_seconds is not None:
        timeout.FromTimedelta(timedelta(seconds=body.timeout_seconds))
    request = ledger_pb2.PlaceHoldRequest(
        idempotency_key=key, member_id=body.member_id, unit=body.unit, points=body.points,
        timeout=timeout if body.timeout_seconds is not None else None, reference=body.reference,
        context=_screening(caller, api_key, body.context),
    )  # fmt: skip
    result = await call(LEDGER, gw.ledger.PlaceHold(request))
    shown = cv.screening(result.screening) if result.HasField("screening") else None
    if shown is not None and shown.review_id:  # a retry after the decision: the hold as decided
        response.status_code = 202 if result.hold.status == ledger_pb2.HOLD_STATUS_PLACED else 200
    update = {"screening": shown, "transaction_id": result.capture_transaction_id}
    return cv.hold(result.hold, result.balance_after).model_copy(update=update)


async def _own_hold(gw: Gateway, caller: Principal, hold_id: str) -> ledger_pb2.Hold:
    """The hold, once the caller is known to act for the channel and store it was placed for."""
    found: ledger_pb2.GetHoldResponse = await call(
        LEDGER, gw.ledger.GetHold(ledger_pb2.GetHoldRequest(hold_id=hold_id))
    )
    hold = found.hold
    caller.may_act_on_hold(hold_id, hold.channel, hold.store_id)
    return hold


@router.get("/holds/{hold_id}", response_model=s.Hold, dependencies=[scoped("redemptions:write")],
            summary="A hold (only to keys acting for its channel and store)")  # fmt: skip
async def get_hold(hold_id: IdPath, gw: GatewayDep, caller: Caller) -> s.Hold:
    return cv.hold(await _own_hold(gw, caller, hold_id))


@router.post("/holds/{hold_id}/capture", response_model=s.Hold, summary="Capture all or part of a hold")
async def capture_hold(
    hold_id: IdPath, body: s.CaptureHold, gw: GatewayDep, caller: Caller,
    write: Annotated[Write, writing("redemptions:write")],
) -> s.Hold:  # fmt: skip
    await _own_hold(gw, caller, hold_id)
    request = ledger_pb2.CaptureHoldRequest(idempotency_key=write.key, hold_id=hold_id, points=body.points)
    result = await call(LEDGER, gw.ledger.CaptureHold(request))
    captured = cv.hold(result.hold, result.balance_after)
    return captured.model_copy(update={"transaction_id": result.transaction.transaction_id})


@router.post("/holds/{hold_id}/void", response_model=s.Hold, summary="Release a hold")
async def void_hold(
    hold_id: IdPath, gw: GatewayDep, caller: Caller, write: Annotated[Write, writing("redemptions:write")]
) -> s.Hold:
    await _own_hold(gw, caller, hold_id)
    request = ledger_pb2.VoidHoldRequest(idempotency_key=write.key, hold_id=hold_id)
    result = await call(LEDGER, gw.ledger.VoidHold(request))
    return cv.hold(result.hold, result.balance_after)


@router.post("/transfers", status_code=201, response_model=s.TransferResult,
             responses={202: {"description": "Held for fraud review: the points are reserved on the source until "
                                             "ops decides; approval completes the transfer",
                              "model": s.TransferResult},
                        200: {"description": "A retried request whose transfer fraud review rejected: the hold "
                                             "was voided and nothing moved (status REJECTED)",
                              "model": s.TransferResult}},
             summary="Move points between members (fraud-screened)")  # fmt: skip
async def transfer(
    body: s.Transfer,
    response: Response,
    gw: GatewayDep,
    caller: Caller,
    write: Annotated[Write, writing("transfers:write")],
) -> s.TransferResult:
    api_key, key = write
    request = ledger_pb2.TransferRequest(
        idempotency_key=key, source_member_id=body.source_member_id, destination_member_id=body.destination_member_id,
        unit=body.unit, points=body.points, reason=body.reason,
        context=_screening(caller, api_key, body.context),
    )  # fmt: skip
    result = cv.transfer(await call(LEDGER, gw.ledger.Transfer(request)))
    response.status_code = {"HELD_FOR_REVIEW": 202, "REJECTED": 200}.get(result.status, 201)
    return result
