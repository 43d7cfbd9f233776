"""A hold belongs to the channel and store it was placed for: a hold id seen at one till (on a
receipt, in a log) cannot be read, captured or voided with another store's or channel's key."""

from __future__ import annotations

from gateway.app import key_store
from tests.gateway.conftest import ALL_POS, GatewayUnderTest
from tests.gateway.test_api import enrol, idem, problem, purchase_body


async def test_only_the_placing_store_or_an_admin_key_settles_a_hold(gw: GatewayUnderTest) -> None:
    store = key_store(gw.settings)
    web_secret = store.create("web", ["redemptions:write"], [], "web checkout")[0]
    chain_secret = store.create("pos", ALL_POS, [], "every store of the chain")[0]
    admin_secret = store.create("ops", ["admin"], [], "admin")[0]
    async with (
        gw.client("pos") as helsinki,
        gw.client("pos_lisbon") as lisbon,
        gw.client(token=web_secret) as web,
        gw.client(token=chain_secret) as chain,
        gw.client(token=admin_secret) as admin,
    ):
        member = await enrol(helsinki)
        bought = await helsinki.post("/v1/purchases", json=purchase_body(gw, member, "HB-1", 5000), headers=idem())
        assert bought.status_code == 201, bought.text
        placed = await helsinki.post("/v1/holds", json={"member_id": member, "points": 30}, headers=idem())
        assert placed.status_code == 201, placed.text
        hold = placed.json()
        assert (hold["channel"], hold["store_id"]) == ("pos", "HEL-01")
        hold_id = hold["hold_id"]

        for foreign in (lisbon, web):
            for refused in (
                await foreign.get(f"/v1/holds/{hold_id}"),
                await foreign.post(f"/v1/holds/{hold_id}/capture", json={"points": 30}, headers=idem()),
                await foreign.post(f"/v1/holds/{hold_id}/void", headers=idem()),
            ):
                assert hold_id in problem(refused, 403)["detail"]
        # Nothing moved: the hold is still placed, its points still reserved.
        seen = await helsinki.get(f"/v1/holds/{hold_id}")
        assert seen.json()["status"] == "PLACED"
        balance = (await helsinki.get(f"/v1/members/{member}/balance")).json()
        assert balance["reserved_points"] == 30

        # A key of the channel bound to no store acts for all its stores; so does an admin key.
        assert (await chain.get(f"/v1/holds/{hold_id}")).json()["status"] == "PLACED"
        captured = await chain.post(f"/v1/holds/{hold_id}/capture", json={"points": 10}, headers=idem())
        assert captured.status_code == 200, captured.text
        assert captured.json()["captured_points"] == 10

        second = (await helsinki.post("/v1/holds", json={"member_id": member, "points": 5}, headers=idem())).json()
        voided = await admin.post(f"/v1/holds/{second['hold_id']}/void", headers=idem())
        assert voided.status_code == 200 and voided.json()["status"] == "VOIDED"

        third = (await helsinki.post("/v1/holds", json={"member_id": member, "points": 7}, headers=idem())).json()
        own = await helsinki.post(f"/v1/holds/{third['hold_id']}/capture", json={"points": 0}, headers=idem())
        assert own.status_code == 200 and own.json()["captured_points"] == 7
        after = (await helsinki.get(f"/v1/members/{member}/balance")).json()
        assert after["reserved_points"] == 0
        assert after["balance_points"] == balance["balance_points"] - 10 - 7
