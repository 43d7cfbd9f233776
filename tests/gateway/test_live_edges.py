"""Websockets keep streaming through what clients send and through events the gateway cannot
show: only the client's close ends a member's stream, and one bad event is skipped, never the
end of live updates for every member."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.routes import live as live_routes
from pointmesh.consumers import dead_letter
from pointmesh.events import LEDGER_EVENTS, OutgoingEvent, RedisStreamBus
from pointmesh.redis_server import RedisServer
from pointmesh.redrive import redrive
from pointmesh.v1 import ledger_pb2
from tests.gateway.conftest import GatewayUnderTest
from tests.gateway.test_api import enrol, idem, purchase_body
from tests.gateway.test_auth_and_live import member_stream, member_token, next_message


async def test_a_client_ping_is_answered_and_the_stream_goes_on(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos, member_stream(gw, pos) as (member, ws):
        await ws.send(json.dumps({"type": "ping"}))
        await next_message(ws, "pong")
        await ws.send("not json at all")
        await ws.send(b"\x00\x01")
        await pos.post("/v1/purchases", json=purchase_body(gw, member, "WS-1", 1000), headers=idem())
        earned = await next_message(ws, "purchase_recorded", within=3.0)
        assert earned["member_id"] == member


async def test_a_frame_far_bigger_than_a_ping_closes_the_socket_instead_of_being_held(gw: GatewayUnderTest) -> None:
    """A phone (or anyone with a token) cannot make the gateway buffer megabytes per socket."""
    async with gw.client("pos") as pos, member_stream(gw, pos) as (_member, ws):
        await ws.send("x" * (1024 * 1024))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5.0)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_events_the_gateway_cannot_show_are_skipped_and_the_rest_still_arrive(
    gw: GatewayUnderTest, redis_server: RedisServer
) -> None:
    async with gw.client("pos") as pos:
        alice, bob = await enrol(pos), await enrol(pos)
        ta, tb = await member_token(gw, alice), await member_token(gw, bob)
        async with (
            connect(f"{gw.ws_url}/v1/members/{alice}/live?token={ta}") as wa,
            connect(f"{gw.ws_url}/v1/members/{bob}/live?token={tb}") as wb,
        ):
            await wa.recv()
            await wb.recv()
            unrenderable = ledger_pb2.LedgerEvent(event_id="ev_3", member_id=alice)
            unrenderable.occurred_at.seconds = 10**15  # parses, but no date-time can show it
            redis = Redis.from_url(redis_server.url)
            await RedisStreamBus(redis).publish(LEDGER_EVENTS, [
                OutgoingEvent(alice, "ev_1", "points_earned", b"\xff\xff\xff", schema="pointmesh.v1/2"),
                OutgoingEvent(alice, "ev_2", "points_earned", b"\xff\xff\xff"),
                OutgoingEvent(alice, "ev_3", "points_earned", unrenderable.SerializeToString()),
            ])  # fmt: skip
            await redis.aclose()
            for member, ws in ((bob, wb), (alice, wa)):
                await pos.post("/v1/purchases", json=purchase_body(gw, member, f"P-{member}", 1000), headers=idem())
                got = await next_message(ws, "purchase_recorded", within=3.0)
                assert got["member_id"] == member
            assert not [t for t in asyncio.all_tasks() if t.get_name() == "live-hub" and t.done()]


async def test_a_stream_ends_when_its_member_token_expires(gw: GatewayUnderTest) -> None:
    """REST refuses an expired token; a socket opened before expiry must not outlive it."""
    async with gw.client("pos") as pos, member_stream(gw, pos) as (member, ws):
        await pos.post("/v1/purchases", json=purchase_body(gw, member, "EXP-1", 1000), headers=idem())
        await next_message(ws, "purchase_recorded", within=3.0)  # still valid: delivered
        gw.mesh.clock.advance(timedelta(seconds=gw.settings.member_token_ttl_seconds + 60))
        await pos.post("/v1/purchases", json=purchase_body(gw, member, "EXP-2", 1000), headers=idem())
        with pytest.raises(ConnectionClosed) as closed:
            while True:  # anything queued before the purchase's event, then the close
                message = json.loads(await asyncio.wait_for(ws.recv(), 3.0))
                assert message["type"] != "purchase_recorded", "an update went out on an expired token"
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert "expired" in closed.value.rcvd.reason


async def test_a_quiet_stream_is_closed_too_when_its_member_token_expires(
    gw: GatewayUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live_routes, "RECHECK_SECONDS", 0.1)
    async with gw.client("pos") as pos, member_stream(gw, pos) as (_member, ws):
        await ws.send(json.dumps({"type": "ping"}))
        await next_message(ws, "pong")  # still open and answering while the token is valid
        gw.mesh.clock.advance(timedelta(seconds=gw.settings.member_token_ttl_seconds + 60))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5.0)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_a_copy_or_a_redriven_dead_letter_never_shows_a_member_an_older_balance(
    gw: GatewayUnderTest, redis_server: RedisServer
) -> None:
    """The member saw 110, then 160. The gamification group had dead-lettered the first event,
    and the operator's redrive sent it back on the stream: the live feed showed 110 again. A
    second copy of the newest event (the relay publishes at least once) is not shown twice."""
    redis = Redis.from_url(redis_server.url)
    bus = RedisStreamBus(redis)
    try:
        async with gw.client("pos") as pos, member_stream(gw, pos) as (member, ws):
            r = await pos.post("/v1/purchases", json=purchase_body(gw, member, "RD-1", 1000), headers=idem())
            assert r.status_code == 201, r.text
            first = await next_message(ws, "purchase_recorded", within=5.0)
            async with asyncio.timeout(5.0):
                async for message in bus.subscribe(LEDGER_EVENTS, "0"):
                    if message.event_id == first["event_id"]:
                        break
            await dead_letter(bus, LEDGER_EVENTS, "rules-gamification", message, "no program in effect")
            r = await pos.post("/v1/purchases", json=purchase_body(gw, member, "RD-2", 5000), headers=idem())
            assert r.status_code == 201, r.text
            second = await next_message(ws, "purchase_recorded", within=5.0)
            newest = second["balance"]
            assert newest["version"] > first["balance"]["version"]
            assert newest["balance_points"] > first["balance"]["balance_points"]
            async with asyncio.timeout(5.0):
                async for latest in bus.subscribe(LEDGER_EVENTS, message.position):
                    if latest.event_id == second["event_id"]:
                        break
            await bus.publish(LEDGER_EVENTS, [OutgoingEvent(latest.key, latest.event_id, latest.event_type,
                                                            latest.payload)])  # fmt: skip
            assert (await redrive(bus, LEDGER_EVENTS, "rules-gamification", idle_seconds=0.5)).sent == 1
            await pos.post("/v1/purchases", json=purchase_body(gw, member, "RD-3", 100), headers=idem())
            shown = []
            async with asyncio.timeout(5.0):
                while not shown or shown[-1]["type"] != "purchase_recorded":
                    m = json.loads(await ws.recv())
                    if m["type"] != "pong":
                        shown.append(m)
            assert [m["event_id"] for m in shown if m["event_id"] in (first["event_id"], second["event_id"])] == []
            assert all(m["balance"]["version"] > newest["version"] for m in shown), shown
    finally:
        await redis.aclose()
