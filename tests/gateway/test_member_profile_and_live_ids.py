"""A member's profile read back, and a live stream opened on an over-long member id."""

from __future__ import annotations

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.gateway.conftest import GatewayUnderTest
from tests.gateway.test_api import idem
from tests.gateway.test_auth_and_live import member_token


async def test_the_profile_given_at_enrolment_is_read_back_by_the_member_and_the_channel(gw: GatewayUnderTest) -> None:
    """docs/gateway.md: a member token reads "only that member: profile, balance, history, tier,
    live updates". The profile POST /v1/members stores must come back from the member routes."""
    profile = {"language": "fi", "segments": "students"}
    async with gw.client("pos") as pos:
        created = await pos.post("/v1/members", json={"profile": profile}, headers=idem())
        assert created.status_code == 201, created.text
        member = created.json()["member_id"]
        by_key = (await pos.get(f"/v1/members/{member}")).json()
    async with gw.client(token=await member_token(gw, member)) as app:
        by_token = (await app.get(f"/v1/members/{member}")).json()
    assert by_key.get("profile") == profile, by_key
    assert by_token.get("profile") == profile, by_token


async def test_a_live_stream_of_an_over_long_member_id_is_refused_as_the_member_route_is(
    gw: GatewayUnderTest,
) -> None:
    """docs/gateway.md, Websockets: a key opening the stream of a member id that is malformed is
    answered at the handshake as GET /v1/members/{id} would be (400)."""
    member_id = "m_" + "0" * 63  # 65 characters: over the 64 every id in a path may have
    async with gw.client("reader") as reader:
        rest = await reader.get(f"/v1/members/{member_id}")
    assert rest.status_code == 400, rest.text
    with pytest.raises(InvalidStatus) as refused:
        async with connect(gw.ws_url + f"/v1/members/{member_id}/live",
                           additional_headers={"Authorization": f"Bearer {gw.keys['reader']}"}) as ws:  # fmt: skip
            pytest.fail(f"subscribed: {await ws.recv()}")
    assert refused.value.response.status_code == rest.status_code, refused.value.response
