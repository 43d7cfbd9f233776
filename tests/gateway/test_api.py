"""The REST API through the real mesh: every endpoint's happy path, problems, idempotency."""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

import httpx

from tests.gateway.conftest import GatewayUnderTest

_keys = itertools.count(1)


def idem() -> dict[str, str]:
    return {"Idempotency-Key": f"k-{next(_keys)}"}


def eur(minor: int) -> dict[str, Any]:
    return {"amount_minor": minor, "currency": "EUR"}


def purchase_body(gw: GatewayUnderTest, member_id: str, receipt: str, *amounts: int, **extra: Any) -> dict[str, Any]:
    return {
        "member_id": member_id, "receipt_id": receipt, "total": eur(sum(amounts)),
        "lines": [{"sku": f"sku-{i}", "category": "misc", "quantity": 1, "amount": eur(a)} for i, a in enumerate(amounts)],
        "receipt_time": gw.mesh.clock.now().isoformat(), **extra,
    }  # fmt: skip


async def enrol(client: httpx.AsyncClient, card: str = "") -> str:
    body = {"external_ids": [{"kind": "card", "value": card}]} if card else {}
    response = await client.post("/v1/members", json=body, headers=idem())
    assert response.status_code == 201, response.text
    return str(response.json()["member_id"])


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["type"].startswith("https://pointmesh.dev/problems/")
    return body


async def test_members_create_get_lookup_balance_and_history(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        member = await enrol(pos, "6001-1")
        got = (await pos.get(f"/v1/members/{member}")).json()
        assert got["status"] == "ACTIVE" and got["external_ids"] == [{"kind": "card", "value": "6001-1"}]
        found = await pos.get("/v1/members/lookup", params={"kind": "card", "value": "6001-1"})
        assert found.json()["member_id"] == member
        bought = await pos.post("/v1/purchases", json=purchase_body(gw, member, "H-1", 2500), headers=idem())
        assert bought.status_code == 201, bought.text
        await pos.post("/v1/purchases", json=purchase_body(gw, member, "H-1b", 1000), headers=idem())
        balance = (await pos.get(f"/v1/members/{member}/balance")).json()
        assert balance["balance_points"] == 25 + 100 + 10  # base + welcome, then base
        history = (await pos.get(f"/v1/members/{member}/history", params={"page_size": 1})).json()
        assert len(history["entries"]) == 1 and history["next_page_token"]
        rest = (
            await pos.get(f"/v1/members/{member}/history", params={"page_token": history["next_page_token"]})
        ).json()
        assert [e["points"] for e in history["entries"] + rest["entries"]] == [10, 125]


async def test_a_purchase_returns_its_explanation_and_a_replay_returns_the_same(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        body = purchase_body(gw, member, "H-2", 1250, 999)
        headers = idem()
        first = await pos.post("/v1/purchases", json=body, headers=headers)
        again = await pos.post("/v1/purchases", json=body, headers=headers)
        assert (first.status_code, again.status_code) == (201, 200)
        assert again.headers["Idempotent-Replayed"] == "true"
        one, two = first.json(), again.json()
        assert one["store_id"] == "HEL-01" and one["channel"] == "pos"  # stamped from the key
        assert (
            sum(p["points"] for p in one["parts"] if p["unit"] == "points") == one["earned"]["points"] == 12 + 9 + 100
        )
        assert {k: v for k, v in two.items() if k != "replayed"} == {k: v for k, v in one.items() if k != "replayed"}
        got = (await pos.get(f"/v1/purchases/{one['purchase_id']}")).json()
        assert got["parts"] == one["parts"]


async def test_same_idempotency_key_with_another_body_is_409(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        await pos.post("/v1/purchases", json=purchase_body(gw, member, "H-3", 5000), headers=idem())
        ok_key = idem()
        done = await pos.post("/v1/redemptions", json={"member_id": member, "points": 5}, headers=ok_key)
        assert done.status_code == 201
        clash = await pos.post("/v1/redemptions", json={"member_id": member, "points": 6}, headers=ok_key)
        body = problem(clash, 409)
        assert body["type"].endswith("/idempotency-conflict") and "same request body" in body["detail"]


async def test_the_same_receipt_from_two_channels_of_one_store_earns_once(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        body = purchase_body(gw, member, "H-4", 4000)
        first = await pos.post("/v1/purchases", json=body, headers=idem())
        second = await pos.post("/v1/purchases", json=body, headers=idem())  # a retry with a new key
        assert (first.status_code, second.status_code) == (201, 200)
        assert (await pos.get(f"/v1/members/{member}/balance")).json()["balance_points"] == 140


async def test_returns_redemptions_holds_and_transfers(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos, gw.client("pos_lisbon") as lisbon:
        alice, bob = await enrol(pos), await enrol(pos)
        bought = (
            await pos.post("/v1/purchases", json=purchase_body(gw, alice, "H-5", 3000, 2000), headers=idem())
        ).json()
        back = await lisbon.post(f"/v1/purchases/{bought['purchase_id']}/returns",
                                 json={"lines": [{"line_index": 1, "quantity": 1}]}, headers=idem())  # fmt: skip
        assert back.status_code == 201, back.text
        assert back.json()["reversed"] == {"points": 20, "tier_credits": 20}
        redeemed = await pos.post(
            "/v1/redemptions", json={"member_id": alice, "points": 30, "reference": "coffee"}, headers=idem()
        )
        assert redeemed.status_code == 201 and redeemed.json()["balance_after"]["balance_points"] == 130 - 30
        hold = (
            await pos.post("/v1/holds", json={"member_id": alice, "points": 50, "timeout_seconds": 600}, headers=idem())
        ).json()
        assert hold["status"] == "PLACED" and hold["balance_after"]["reserved_points"] == 50
        captured = await pos.post(f"/v1/holds/{hold['hold_id']}/capture", json={"points": 20}, headers=idem())
        assert captured.json()["status"] == "CAPTURED" and captured.json()["captured_points"] == 20
        other = (await pos.post("/v1/holds", json={"member_id": alice, "points": 10}, headers=idem())).json()
        voided = await pos.post(f"/v1/holds/{other['hold_id']}/void", headers=idem())
        assert voided.json()["status"] == "VOIDED"
        assert (await pos.get(f"/v1/holds/{other['hold_id']}")).json()["status"] == "VOIDED"
        moved = await pos.post("/v1/transfers", json={"source_member_id": alice, "destination_member_id": bob, "points": 15},
                               headers=idem())  # fmt: skip
        assert moved.status_code == 201, moved.text
        assert (await pos.get(f"/v1/members/{bob}/balance")).json()["balance_points"] == 15
        assert (await pos.get(f"/v1/members/{alice}/balance")).json()["balance_points"] == 130 - 30 - 20 - 15


async def test_insufficient_points_is_422_with_its_own_type_and_figures(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        response = await pos.post("/v1/redemptions", json={"member_id": member, "points": 10}, headers=idem())
        body = problem(response, 422)
        assert body["type"].endswith("/insufficient-points")
        assert (body["available_points"], body["requested_points"]) == (0, 10)


async def test_bad_input_is_400_naming_the_field(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        floats = purchase_body(gw, member, "H-6", 100)
        floats["lines"][0]["quantity"] = 1.5
        body = problem(await pos.post("/v1/purchases", json=floats, headers=idem()), 400)
        assert body["errors"][0]["field"] == "body.lines[0].quantity"
        sums = purchase_body(gw, member, "H-6", 100)
        sums["total"]["amount_minor"] = 101
        body = problem(await pos.post("/v1/purchases", json=sums, headers=idem()), 400)
        assert body["errors"] == [{"field": "total.amount_minor", "detail": body["errors"][0]["detail"]}]
        missing = problem(await pos.post("/v1/redemptions", json={"member_id": member, "points": 1}), 400)
        assert missing["errors"][0]["field"] == "Idempotency-Key"
        unknown = problem(await pos.get("/v1/members/m_" + "0" * 28), 404)
        assert "does not exist" in unknown["detail"]


async def test_explain_and_program_and_redemption_quote(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        explained = await pos.post("/v1/program/explain", json={
            "total": eur(2000), "receipt_time": gw.mesh.clock.now().isoformat(),
            "lines": [{"sku": "a", "category": "boost", "quantity": 1, "amount": eur(2000)}],
        })  # fmt: skip
        body = explained.json()
        assert explained.status_code == 200, explained.text
        assert {p["rule_id"] for p in body["parts"]} >= {"base", "boost"}
        assert body["totals"]["points"] == sum(p["points"] for p in body["parts"] if p["unit"] == "points")
        program = (await pos.get("/v1/program")).json()
        assert program["program"] == "meshmart" and program["version"] == 1
        member = await enrol(pos)
        quote = await pos.post("/v1/redemptions/quote", json={"member_id": member, "basket_total": eur(1000)})
        problem(quote, 422)  # meshmart has no redemption values


async def test_readiness_reports_each_dependency(gw: GatewayUnderTest) -> None:
    async with gw.client() as anyone:
        assert (await anyone.get("/healthz")).json() == {"status": "ok", "checks": {}}
        ready = await anyone.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {
            "ledger": "SERVING",
            "rules": "SERVING",
            "redis": "ok",
        }
        await gw.mesh.stop_rules()
        down = await anyone.get("/readyz")
        assert down.status_code == 503 and down.json()["checks"]["rules"] != "SERVING"


async def test_a_service_outage_is_503_with_retry_after(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        await gw.mesh.stop_rules()
        response = await pos.post("/v1/program/explain", json={
            "total": eur(100), "receipt_time": (gw.mesh.clock.now() - timedelta(minutes=1)).isoformat(),
            "lines": [{"sku": "a", "quantity": 1, "amount": eur(100)}],
        })  # fmt: skip
        body = problem(response, 503)
        assert response.headers["Retry-After"] == "1" and body["type"].endswith("/service-unavailable")
