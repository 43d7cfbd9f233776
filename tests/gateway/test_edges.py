"""Input at the edges of what the API can carry: times without an offset or outside years
1..9999 in UTC, and ids far longer than any the ledger issues. Each is a 400 naming the field,
never a 500 and never a silent guess."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from gateway.problems import from_grpc
from pointmesh.rpc import client_channel
from pointmesh.v1 import ledger_pb2, ledger_pb2_grpc
from tests.gateway.conftest import GatewayUnderTest
from tests.gateway.test_api import enrol, eur, idem, problem, purchase_body


def explain_body(receipt_time: str) -> dict[str, Any]:
    return {"total": eur(1000), "lines": [{"sku": "a", "quantity": 1, "amount": eur(1000)}],
            "receipt_time": receipt_time}  # fmt: skip


def fields_of(body: dict[str, Any]) -> list[str]:
    return [e["field"] for e in body["errors"]]


@pytest.mark.parametrize(
    ("when", "needle"),
    [
        ("2026-01-05T10:00:00", "has no UTC offset"),
        ("0001-01-01T00:30:00+01:00", "outside years 1..9999"),
        ("9999-12-31T23:30:00-01:00", "outside years 1..9999"),
    ],
)
async def test_a_time_without_an_offset_or_outside_utc_years_is_400_naming_the_field_everywhere(
    gw: GatewayUnderTest, when: str, needle: str
) -> None:
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        body = purchase_body(gw, member, "T-1", 1000, receipt_time=when)
        refused = problem(await pos.post("/v1/purchases", json=body, headers=idem()), 400)
        assert fields_of(refused) == ["body.receipt_time"] and needle in refused["detail"]
        assert "Value error" not in refused["detail"]
        refused = problem(await pos.post("/v1/program/explain", json=explain_body(when)), 400)
        assert fields_of(refused) == ["body.receipt_time"] and needle in refused["detail"]
        body = purchase_body(gw, member, "T-2", 1000, context={"contact_changed_at": when})
        refused = problem(await pos.post("/v1/purchases", json=body, headers=idem()), 400)
        assert fields_of(refused) == ["body.context.contact_changed_at"] and needle in refused["detail"]
        redeem = {"member_id": member, "points": 1, "context": {"contact_changed_at": when}}
        refused = problem(await pos.post("/v1/redemptions", json=redeem, headers=idem()), 400)
        assert fields_of(refused) == ["body.context.contact_changed_at"]
        balance = (await pos.get(f"/v1/members/{member}/balance")).json()
        assert balance["balance_points"] == 0  # nothing was recorded


async def test_the_same_receipt_with_an_offset_is_read_at_that_instant(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        got = await pos.post("/v1/program/explain", json=explain_body("2026-01-05T18:30:00+02:00"))
        assert got.status_code == 200, got.text
        assert got.json()["store_local_time"].startswith("2026-01-05T18:30:00")


async def test_ids_longer_than_the_ledger_issues_are_400_naming_the_field(gw: GatewayUnderTest) -> None:
    long = "m_" + "0" * 6000
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        for path, field in [
            (f"/v1/members/{long}", "path.member_id"),
            (f"/v1/members/{long}/balance", "path.member_id"),
            (f"/v1/members/{long}/history", "path.member_id"),
            (f"/v1/members/{long}/progress", "path.member_id"),
            (f"/v1/purchases/pu_{'a' * 6000}", "path.purchase_id"),
            (f"/v1/holds/ho_{'a' * 6000}", "path.hold_id"),
            (f"/v1/members/{member}/history?page_token={'A' * 6000}", "query.page_token"),
            (f"/v1/members/lookup?kind=card&value={'9' * 6000}", "query.value"),
        ]:
            assert fields_of(problem(await pos.get(path), 400)) == [field], path
        for url, body, field in [
            ("/v1/purchases", purchase_body(gw, long, "L-1", 1000), "body.member_id"),
            ("/v1/redemptions", {"member_id": long, "points": 1}, "body.member_id"),
            ("/v1/holds", {"member_id": long, "points": 1}, "body.member_id"),
            ("/v1/transfers", {"source_member_id": member, "destination_member_id": long, "points": 1},
             "body.destination_member_id"),
        ]:  # fmt: skip
            assert fields_of(problem(await pos.post(url, json=body, headers=idem()), 400)) == [field], url
        # Up to the bound, the ledger still says what is wrong with the id.
        refused = problem(await pos.get("/v1/members/" + "x" * 64), 400)
        assert fields_of(refused) == ["member_id"] and "is not a member id" in refused["detail"]


async def test_a_refusal_quoting_a_huge_value_still_arrives_as_itself(gw: GatewayUnderTest) -> None:
    """The ledger's refusal of a huge id quotes it: its trailers passed the metadata limit and the
    client saw RESOURCE_EXHAUSTED (a 429 over REST) with details it could not read. Statuses are
    bounded now (pointmesh.errors): INVALID_ARGUMENT on member_id, a 400."""
    channel = client_channel(gw.settings.ledger_addr)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ledger_pb2_grpc.LedgerServiceStub(channel).GetMember(
                ledger_pb2.GetMemberRequest(member_id="x" * 8000)
            )
    finally:
        await channel.close()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(caught.value.details() or "") <= 700
    mapped = from_grpc(caught.value, "ledger_svc")
    assert (mapped.status, mapped.slug, [e["field"] for e in mapped.errors]) == (400, "invalid-request", ["member_id"])
