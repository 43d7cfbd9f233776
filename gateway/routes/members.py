"""Members: create, read, look up by card or other external id, balance, history, tokens."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from gateway import convert as cv
from gateway import schemas as s
from gateway.deps import GatewayDep, IdPath, PageToken, UnitQuery, Write, call, reads_member, scoped, writing
from gateway.strict_json import StrictJsonRoute
from pointmesh.v1 import common_pb2, ledger_pb2

router = APIRouter(prefix="/v1/members", tags=["members"], route_class=StrictJsonRoute)
LEDGER = "ledger_svc"


@router.post("", status_code=201, response_model=s.Member, summary="Enrol a member")
async def create_member(
    body: s.CreateMember, gw: GatewayDep, write: Annotated[Write, writing("members:write")]
) -> s.Member:
    key = write.key
    request = ledger_pb2.CreateMemberRequest(
        idempotency_key=key, external_ids=[common_pb2.ExternalId(kind=e.kind, value=e.value) for e in body.external_ids],
        profile=body.profile,
    )  # fmt: skip
    return cv.member((await call(LEDGER, gw.ledger.CreateMember(request))).member)


@router.get("/lookup", response_model=s.Member, dependencies=[scoped("members:read")],
            summary="Find a member by card number or other external id")  # fmt: skip
async def lookup_member(
    gw: GatewayDep, kind: Annotated[str, Query(min_length=1, max_length=64, examples=["card"])],
    value: Annotated[str, Query(min_length=1, max_length=128, examples=["6001002003"])],
) -> s.Member:  # fmt: skip
    request = ledger_pb2.LookupMemberRequest(external_id=common_pb2.ExternalId(kind=kind, value=value))
    return cv.member((await call(LEDGER, gw.ledger.LookupMember(request))).member)


@router.get("/{member_id}", response_model=s.Member, dependencies=[reads_member],
            summary="A member (a member token reads only its own)")  # fmt: skip
async def get_member(member_id: IdPath, gw: GatewayDep) -> s.Member:
    return cv.member((await call(LEDGER, gw.ledger.GetMember(ledger_pb2.GetMemberRequest(member_id=member_id)))).member)


@router.get("/{member_id}/balance", response_model=s.Balance, dependencies=[reads_member],
            summary="Available, reserved and pending points")  # fmt: skip
async def get_balance(member_id: IdPath, gw: GatewayDep, unit: UnitQuery = "") -> s.Balance:
    response = await call(LEDGER, gw.ledger.GetBalance(ledger_pb2.GetBalanceRequest(member_id=member_id, unit=unit)))
    return cv.balance(response.balance)


@router.get("/{member_id}/tier", response_model=s.TierStatus, dependencies=[reads_member],
            summary="The member's tier, credits this window, the next tier, and until when the tier holds")  # fmt: skip
async def get_tier(member_id: IdPath, gw: GatewayDep) -> s.TierStatus:
    response = await call(LEDGER, gw.ledger.GetMemberTier(ledger_pb2.GetMemberTierRequest(member_id=member_id)))
    return cv.tier_status(member_id, response.status)


@router.get("/{member_id}/history", response_model=s.History, dependencies=[reads_member],
            summary="Entries on the member's account, newest first")  # fmt: skip
async def get_history(
    member_id: IdPath, gw: GatewayDep, unit: UnitQuery = "",
    page_size: Annotated[int, Query(ge=0, le=500)] = 50, page_token: PageToken = "",
) -> s.History:  # fmt: skip
    request = ledger_pb2.ListEntriesRequest(
        member_id=member_id, unit=unit, page=common_pb2.PageRequest(page_size=page_size, page_token=page_token)
    )
    response = await call(LEDGER, gw.ledger.ListEntries(request))
    return s.History(entries=[cv.entry(e) for e in response.entries], next_page_token=response.next_page_token)


@router.post("/{member_id}/tokens", status_code=201, response_model=s.MemberToken,
             dependencies=[scoped("members:write")],
             summary="A short-lived token the member's app uses to read its own member")  # fmt: skip
async def issue_token(member_id: IdPath, gw: GatewayDep) -> s.MemberToken:
    await call(LEDGER, gw.ledger.GetMember(ledger_pb2.GetMemberRequest(member_id=member_id)))
    token, expires = gw.tokens.issue(member_id)
    return s.MemberToken(token=token, expires_at=expires)
