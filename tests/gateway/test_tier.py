"""A member's tier standing through the real gateway, ledger and rules_svc: the tier, the
credits this window counts, what the next tier needs and until when the tier holds. The mesh
program tiers on tier_credits (1 per EUR), blue from 0, silver from 300, calendar year, 30
days' grace, in Helsinki's time; the mesh clock stands on Monday 5 January 2026."""

from __future__ import annotations

from datetime import datetime

import grpc

from pointmesh.v1 import ledger_pb2, rules_pb2
from tests.conftest import LedgerUnderTest
from tests.gateway.conftest import GatewayUnderTest
from tests.gateway.test_api import enrol, eur, idem, problem, purchase_body
from tests.gateway.test_auth_and_live import member_token
from tests.ledger.helpers import create_member, error_field, rpc_error


async def test_the_member_sees_their_tier_what_silver_needs_and_then_until_when_they_keep_it(
    gw: GatewayUnderTest,
) -> None:
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        token = await member_token(gw, member)
        async with gw.client(token=token) as app:
            blue = (await app.get(f"/v1/members/{member}/tier")).json()
            assert {k: blue[k] for k in ("tier", "qualifying_points", "next_tier", "points_to_next", "held_until")} == {
                "tier": "blue", "qualifying_points": 0, "next_tier": "silver", "points_to_next": 300,
                "held_until": None,
            }  # fmt: skip

            bought = await pos.post("/v1/purchases", json=purchase_body(gw, member, "T-1", 35_000), headers=idem())
            assert bought.status_code == 201, bought.text

            silver = (await app.get(f"/v1/members/{member}/tier")).json()
        assert (silver["tier"], silver["qualifying_points"], silver["next_tier"]) == ("silver", 350, "")
        assert (silver["metric_unit"], silver["window"], silver["program"]) == ("tier_credits", "calendar_year",
                                                                               "meshmart")  # fmt: skip
        # Earned in 2026: held through 2027 and 30 days into 2028, from midnight in Helsinki.
        assert (silver["held_until"], silver["tier_after"]) == ("2028-01-30T22:00:00Z", "blue")


async def test_another_members_tier_is_refused_and_an_unknown_member_is_404(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        member, other = await enrol(pos), await enrol(pos)
        async with gw.client(token=await member_token(gw, other)) as app:
            problem(await app.get(f"/v1/members/{member}/tier"), 403)
        missing = problem(await pos.get("/v1/members/m_0000000000000000000000000000/tier"), 404)
        assert "member_id" in str(missing)


async def test_rules_svc_refuses_a_bucket_that_is_not_a_month_naming_it(gw: GatewayUnderTest) -> None:
    error = await rpc_error(
        gw.mesh.rules.stub.GetTierStatus(
            rules_pb2.GetTierStatusRequest(program="meshmart", qualification={"2026-13": 5})
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error_field(error) == "qualification['2026-13']"


async def test_with_rules_svc_away_the_ledger_answers_unavailable(ledger: LedgerUnderTest) -> None:
    """This ledger is configured with a rules_svc address nothing listens on."""
    member = (await create_member(ledger.stub)).member_id
    error = await rpc_error(
        ledger.stub.GetMemberTier(ledger_pb2.GetMemberTierRequest(member_id=member)), grpc.StatusCode.UNAVAILABLE
    )
    assert "rules_svc did not answer" in (error.details() or "")


async def test_rules_svc_reads_credits_beyond_its_bounds_as_the_bound_and_refuses_bad_months_and_instants(
    gw: GatewayUnderTest,
) -> None:
    """Refused as bad input, not failed as UNKNOWN (which the ledger would report as rules_svc
    being down). Credits past 10^15 a month (a month of many bounded purchases can pass it) are
    read as 10^15, past every threshold: the sum of int64 months never overflows the answer."""
    huge = rules_pb2.GetTierStatusRequest(program="meshmart", qualification={"2026-01": 2**63 - 1, "2026-02": 1})
    assert (await gw.mesh.rules.stub.GetTierStatus(huge)).status.tier == "silver"
    month = rules_pb2.GetTierStatusRequest(program="meshmart", qualification={"2026-13": 5})
    error = await rpc_error(gw.mesh.rules.stub.GetTierStatus(month), grpc.StatusCode.INVALID_ARGUMENT)
    assert error_field(error) == "qualification['2026-13']"
    late = rules_pb2.GetTierStatusRequest(program="meshmart", qualification={"2026-01": 500})
    late.at.FromDatetime(datetime(9999, 6, 1))
    error = await rpc_error(gw.mesh.rules.stub.GetTierStatus(late), grpc.StatusCode.INVALID_ARGUMENT)
    assert error_field(error) == "at"


async def test_explain_as_a_tier_the_program_does_not_declare_is_refused_naming_it(gw: GatewayUnderTest) -> None:
    """meshmart declares blue and silver; silver doubles the base points. A preview typed as
    "Silver" was priced as the entry tier, 200, with nothing saying the tier was unknown."""
    body = {"total": eur(10_000), "receipt_time": gw.mesh.clock.now().isoformat(),
            "lines": [{"sku": "a", "category": "misc", "quantity": 1, "amount": eur(10_000)}]}  # fmt: skip
    async with gw.client("pos") as pos:
        silver = await pos.post("/v1/program/explain", json={**body, "tier": "silver"})
        assert silver.status_code == 200, silver.text
        assert "silver" in {p["rule_id"] for p in silver.json()["parts"]}
        for typo in ("Silver", "gold"):
            refused = problem(await pos.post("/v1/program/explain", json={**body, "tier": typo}), 400)
            assert [e["field"] for e in refused["errors"]] == ["tier"]
            assert "its tiers: blue, silver" in refused["errors"][0]["detail"]
