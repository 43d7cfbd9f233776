"""A redemption quote promises only what a redemption of the same member would pay."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from pointmesh.v1 import common_pb2, ledger_pb2, rules_pb2
from tests.gateway.conftest import GatewayUnderTest
from tests.gateway.test_api import enrol, eur, idem
from tests.ledger.helpers import earn, key, place_hold, ts

PROGRAM = Path(__file__).resolve().parents[1] / "mesh" / "program.yaml"
REDEMPTION = """
redemption:
  unit: {unit}
  values:
    - {{currency: EUR, points: 1, amount_minor: 1}}
  minimum_points: {minimum}
  max_share_percent: 100
"""


async def _with_redemption(gw: GatewayUnderTest, unit: str = "points", minimum: int = 0) -> None:
    """meshmart again, now with 1 point = 0.01 EUR (v2, in effect now)."""
    document = PROGRAM.read_text() + REDEMPTION.format(unit=unit, minimum=minimum)
    await gw.mesh.rules.stub.PublishProgram(rules_pb2.PublishProgramRequest(
        idempotency_key=common_pb2.IdempotencyKey(key=f"redeem-{unit}-{minimum}"), document=document,
    ))  # fmt: skip


async def _quote(pos: httpx.AsyncClient, member: str) -> dict[str, Any]:
    quoted = await pos.post("/v1/redemptions/quote", json={"member_id": member, "basket_total": eur(1000)})
    return {"status": quoted.status_code, **quoted.json()}


async def test_a_blocked_member_is_not_quoted_points_a_redemption_refuses(gw: GatewayUnderTest) -> None:
    await _with_redemption(gw)
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        await earn(gw.mesh.ledger.stub, member, 500)
        await gw.mesh.ledger.stub.BlockMember(
            ledger_pb2.BlockMemberRequest(idempotency_key=key(), member_id=member, reason="card stolen")
        )
        redeemed = await pos.post("/v1/redemptions", json={"member_id": member, "points": 500}, headers=idem())
        assert redeemed.status_code == 422, redeemed.text  # member ... is BLOCKED
        quoted = await _quote(pos, member)
        # The quote promised 500 points paying 5.00 EUR that no redemption would take.
        assert quoted["status"] == 422, quoted
        assert quoted["errors"][0]["field"] == redeemed.json()["errors"][0]["field"] == "member_id", quoted
        assert "BLOCKED" in quoted["detail"], quoted


async def test_the_quote_reads_the_balance_of_the_unit_it_redeems(gw: GatewayUnderTest) -> None:
    await _with_redemption(gw, unit="tier_credits")
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        await earn(gw.mesh.ledger.stub, member, 700)  # points
        await earn(gw.mesh.ledger.stub, member, 30, unit="tier_credits")
        quoted = await _quote(pos, member)
        assert quoted["status"] == 200 and quoted["unit"] == "tier_credits", quoted
        # The member has 30 tier credits; a quote of 700 tier credits is the points balance.
        assert quoted["points"] == 30, quoted


async def test_points_past_their_date_are_not_quoted(gw: GatewayUnderTest) -> None:
    """docs/ledger.md: points past their date still show in the balance until the expiry job
    runs, "but nothing spends them"; the quote is built on that balance."""
    await _with_redemption(gw)
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        await earn(gw.mesh.ledger.stub, member, 400, expires_at=ts(gw.mesh.clock.now() + timedelta(hours=1)))
        await earn(gw.mesh.ledger.stub, member, 100)
        gw.mesh.clock.advance(timedelta(hours=2))  # the 400 are due; the hourly expiry job has not run
        quoted = await _quote(pos, member)
        assert quoted["status"] == 200, quoted
        assert quoted["points"] == 100, quoted  # the 400 past their date are no longer spendable
        redeemed = await pos.post("/v1/redemptions", json={"member_id": member, "points": quoted["points"]},
                                  headers=idem())  # fmt: skip
        assert redeemed.status_code == 201, (quoted, redeemed.text)


async def test_pending_and_held_points_are_not_quoted(gw: GatewayUnderTest) -> None:
    """Credits awaiting their release date or a review, and points a hold keeps, pay nothing."""
    await _with_redemption(gw)
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        await earn(gw.mesh.ledger.stub, member, 300)
        await earn(gw.mesh.ledger.stub, member, 200, release_at=ts(gw.mesh.clock.now() + timedelta(days=3)))
        await earn(gw.mesh.ledger.stub, member, 50, pending_review=True)
        await place_hold(gw.mesh.ledger.stub, member, 100)
        quoted = await _quote(pos, member)
        assert quoted["status"] == 200 and quoted["points"] == 200, quoted
