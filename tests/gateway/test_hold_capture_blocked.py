"""A till's hold on a member blocked since (a takeover confirmed) is not captured over REST:
the member cannot spend, as POST /v1/redemptions already says."""

from __future__ import annotations

from pointmesh.v1 import ledger_pb2
from tests.gateway.conftest import GatewayUnderTest
from tests.gateway.test_api import enrol, idem, problem
from tests.ledger.helpers import earn, key


async def test_a_hold_of_a_member_blocked_since_is_not_captured(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        await earn(gw.mesh.ledger.stub, member, 500)
        placed = await pos.post("/v1/holds", json={"member_id": member, "points": 300}, headers=idem())
        assert placed.status_code == 201, placed.text
        await gw.mesh.ledger.stub.BlockMember(
            ledger_pb2.BlockMemberRequest(idempotency_key=key(), member_id=member, reason="takeover")
        )
        redeemed = await pos.post("/v1/redemptions", json={"member_id": member, "points": 100}, headers=idem())
        assert problem(redeemed, 422)["type"].endswith("member-not-active")
        captured = await pos.post(f"/v1/holds/{placed.json()['hold_id']}/capture", json={"points": 0}, headers=idem())
        # Was 200: CAPTURED, 300 of the blocked member's points spent.
        assert problem(captured, 422)["type"].endswith("member-not-active"), captured.text
        balance = (await pos.get(f"/v1/members/{member}/balance")).json()
        assert (balance["balance_points"], balance["reserved_points"]) == (500, 300)
