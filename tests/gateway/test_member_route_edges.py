"""Member routes and the live socket at their edges: which service a 503 names, the field a
refusal names, a live stream of no member, a receipt's tender at odds with the recorded one."""

from __future__ import annotations

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.gateway.conftest import GatewayUnderTest
from tests.gateway.test_api import enrol, idem, problem, purchase_body


async def test_a_tier_read_with_rules_svc_down_is_the_rules_engines_503_not_the_ledgers(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        await gw.mesh.stop_rules()
        got = await pos.get(f"/v1/members/{member}/tier")
        body = problem(got, 503)
        assert got.headers["Retry-After"] == "1"
        assert body["detail"] == "the rules engine is unavailable; retry shortly", body
        assert (await pos.get(f"/v1/members/{member}/balance")).status_code == 200  # the ledger answers


async def test_a_lookup_that_finds_no_member_names_the_query_parameter(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        await enrol(pos, "6001-LOOK")
        missing = problem(await pos.get("/v1/members/lookup", params={"kind": "card", "value": "6001-NONE"}), 404)
    assert [e["field"] for e in missing["errors"]] == ["value"], missing
    assert missing["detail"].startswith("value: "), missing


@pytest.mark.parametrize("member_id", ["xyz", "m_0a1b2c3d4e5f60718293a4b5c6d7"])
async def test_a_live_stream_of_no_member_is_refused_as_the_member_route_is(
    gw: GatewayUnderTest, member_id: str
) -> None:
    async with gw.client("reader") as reader:
        rest = await reader.get(f"/v1/members/{member_id}")
        assert rest.status_code in (400, 404), rest.text
    with pytest.raises(InvalidStatus) as refused:
        async with connect(gw.ws_url + f"/v1/members/{member_id}/live",
                           additional_headers={"Authorization": f"Bearer {gw.keys['reader']}"}) as ws:  # fmt: skip
            pytest.fail(f"subscribed to a member that does not exist: {await ws.recv()}")
    assert refused.value.response.status_code == rest.status_code


async def test_a_receipt_sent_again_naming_another_tender_is_a_409_on_the_tender(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        await pos.post("/v1/purchases", json=purchase_body(gw, member, "T-0", 5000), headers=idem())
        paid = [
            (await pos.post("/v1/redemptions", json={"member_id": member, "points": n}, headers=idem())).json()
            for n in (10, 20)
        ]
        ids = [p["transaction_id"] for p in paid]
        first = await pos.post("/v1/purchases", json=purchase_body(gw, member, "T-1", 3000,
                               tender_transaction_id=ids[0]), headers=idem())  # fmt: skip
        assert first.status_code == 201, first.text
        clash = await pos.post("/v1/purchases", json=purchase_body(gw, member, "T-1", 3000,
                               tender_transaction_id=ids[1]), headers=idem())  # fmt: skip
    body = problem(clash, 409)
    assert [e["field"] for e in body["errors"]] == ["tender_transaction_id"], body
    assert ids[0] in body["detail"] and ids[1] in body["detail"]


async def test_a_partial_capture_answers_the_balance_after_the_released_points_paid_debt(gw: GatewayUnderTest) -> None:
    """The capture releases the rest of the hold, whose points first pay the debt a return
    recorded while they were reserved: the answer showed the balance from before that."""
    async with gw.client("pos") as pos:
        m = await enrol(pos)
        bought = (await pos.post("/v1/purchases", json=purchase_body(gw, m, "D-1", 20000), headers=idem())).json()
        hold = (await pos.post("/v1/holds", json={"member_id": m, "points": 300}, headers=idem())).json()
        back = await pos.post(f"/v1/purchases/{bought['purchase_id']}/returns",
                              json={"lines": [{"line_index": 0, "quantity": 1}]}, headers=idem())  # fmt: skip
        assert back.status_code == 201, back.text
        assert (await pos.get(f"/v1/members/{m}/balance")).json()["debt_points"] > 0  # the held points stayed

        captured = await pos.post(f"/v1/holds/{hold['hold_id']}/capture", json={"points": 100}, headers=idem())
        now = (await pos.get(f"/v1/members/{m}/balance")).json()

    shown = captured.json()["balance_after"]
    assert (shown["available_points"], shown["debt_points"]) == (now["available_points"], now["debt_points"])
