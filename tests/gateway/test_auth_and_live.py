"""Who may do what (API key scopes, channel and store binding, member tokens), and the live
websockets fed by the event stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.live import LiveHub
from pointmesh.events import OPS_ALERTS, OutgoingEvent, RedisStreamBus
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import common_pb2
from tests.conftest import REPO, wait_for_port
from tests.gateway.conftest import GatewayUnderTest
from tests.gateway.test_api import enrol, idem, problem, purchase_body


async def member_token(gw: GatewayUnderTest, member_id: str) -> str:
    async with gw.client("pos") as pos:
        response = await pos.post(f"/v1/members/{member_id}/tokens")
        assert response.status_code == 201, response.text
        return str(response.json()["token"])


@contextlib.asynccontextmanager
async def member_stream(gw: GatewayUnderTest, pos: Any) -> AsyncIterator[tuple[str, ClientConnection]]:
    """A new member and their live socket, subscribed, on a member token."""
    member = await enrol(pos)
    token = await member_token(gw, member)
    async with connect(f"{gw.ws_url}/v1/members/{member}/live?token={token}") as ws:
        assert json.loads(await ws.recv())["type"] == "subscribed"
        yield member, ws


async def test_scope_channel_and_store_matrix(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos, gw.client("reader") as reader, gw.client("web") as web, gw.client() as nobody:
        member = await enrol(pos)
        assert (await reader.get(f"/v1/members/{member}")).status_code == 200
        problem(await nobody.get(f"/v1/members/{member}"), 401)
        async with gw.client(token="pmk_deadbeef0000_not-a-real-secret") as forged:
            problem(await forged.get(f"/v1/members/{member}"), 401)
        denied = problem(
            await reader.post("/v1/purchases", json=purchase_body(gw, member, "A-1", 100), headers=idem()), 403
        )
        assert "lacks scope purchases:write" in denied["detail"]
        problem(await reader.post("/v1/members", json={}, headers=idem()), 403)
        problem(await web.post("/v1/redemptions", json={"member_id": member, "points": 1}, headers=idem()), 403)
        elsewhere = purchase_body(gw, member, "A-2", 100, store_id="LIS-01")
        assert "not LIS-01" in problem(await pos.post("/v1/purchases", json=elsewhere, headers=idem()), 403)["detail"]
        claimed = purchase_body(gw, member, "A-3", 100, channel="web")
        assert "channel pos" in problem(await pos.post("/v1/purchases", json=claimed, headers=idem()), 403)["detail"]
        online = await web.post(
            "/v1/purchases", json=purchase_body(gw, member, "W-1", 100, store_id=""), headers=idem()
        )
        assert online.status_code == 201 and online.json()["channel"] == "web"
        balance = (await pos.get(f"/v1/members/{member}/balance")).json()
        assert balance["balance_points"] == 1 + 100  # only the web purchase went through


async def test_a_revoked_key_is_refused(gw: GatewayUnderTest) -> None:
    keys = gw.uvicorn.config.loaded_app  # the app as served
    store = gw.uvicorn.config.app.state.gateway.keys
    assert keys is not None
    async with gw.client("reader") as reader:
        member_missing = "m_" + "0" * 28
        problem(await reader.get(f"/v1/members/{member_missing}"), 404)
        store.revoke(gw.keys["reader"].split("_")[1])
        problem(await reader.get(f"/v1/members/{member_missing}"), 401)


async def test_member_tokens_read_only_their_own_member_and_expire(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        alice, bob = await enrol(pos), await enrol(pos)
    token = await member_token(gw, alice)
    async with gw.client(token=token) as app:
        assert (await app.get(f"/v1/members/{alice}/balance")).status_code == 200
        assert (await app.get(f"/v1/members/{alice}/history")).status_code == 200
        problem(await app.get(f"/v1/members/{bob}"), 403)
        problem(await app.post("/v1/redemptions", json={"member_id": alice, "points": 1}, headers=idem()), 403)
    async with gw.client(token=token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")) as tampered:
        problem(await tampered.get(f"/v1/members/{alice}"), 401)
    gw.mesh.clock.advance(timedelta(hours=2))
    async with gw.client(token=token) as late:
        assert "expired" in problem(await late.get(f"/v1/members/{alice}"), 401)["detail"]


async def next_message(ws: ClientConnection, wanted: str, within: float = 1.0) -> dict[str, Any]:
    """The next message of type `wanted`, which must arrive within `within` seconds."""
    async with asyncio.timeout(within):
        while True:
            message: dict[str, Any] = json.loads(await ws.recv())
            if message["type"] == wanted:
                return message


async def test_a_member_sees_their_purchase_live_within_a_second(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos, member_stream(gw, pos) as (member, ws):
        await pos.post("/v1/purchases", json=purchase_body(gw, member, "L-1", 4200), headers=idem())
        earned = await next_message(ws, "purchase_recorded")
        assert earned["member_id"] == member
        assert earned["details"]["earned"]["points"] == "142"  # protobuf JSON writes int64 as text
        assert earned["balance"]["balance_points"] == 142


async def test_a_member_token_cannot_watch_another_member(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        alice, bob = await enrol(pos), await enrol(pos)
    token = await member_token(gw, alice)
    for url in (f"/v1/members/{bob}/live?token={token}", f"/v1/members/{bob}/live"):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(gw.ws_url + url) as ws:
                await ws.recv()
        assert refused.value.response.status_code == 403  # the handshake is refused before any event


async def test_ops_alerts_stream_to_ops_keys_only(gw: GatewayUnderTest, redis_server: RedisServer) -> None:
    from redis.asyncio import Redis

    with pytest.raises(InvalidStatus):
        async with connect(f"{gw.ws_url}/v1/ops/alerts?token={gw.keys['pos']}") as ws:
            await ws.recv()
    async with connect(f"{gw.ws_url}/v1/ops/alerts?token={gw.keys['ops']}") as ws:
        assert json.loads(await ws.recv())["type"] == "subscribed"
        alert = common_pb2.OpsAlert(alert_id="al-1", occurred_at=to_timestamp(gw.mesh.clock.now()), kind="velocity",
                                    severity="high", member_id="m_x", reasons=["12 purchases in 5 minutes"])  # fmt: skip
        redis = Redis.from_url(redis_server.url)
        await RedisStreamBus(redis).publish(
            OPS_ALERTS, [OutgoingEvent("m_x", "al-1", "ops_alert", alert.SerializeToString())]
        )
        await redis.aclose()
        got = await next_message(ws, "ops_alert")
        assert (got["alert_id"], got["severity"], got["reasons"]) == ("al-1", "high", ["12 purchases in 5 minutes"])


async def test_an_open_ops_alert_stream_ends_when_its_key_is_revoked(
    gw: GatewayUnderTest, redis_server: RedisServer
) -> None:
    from redis.asyncio import Redis

    store = gw.uvicorn.config.app.state.gateway.keys  # the key store the gateway serves from
    async with connect(f"{gw.ws_url}/v1/ops/alerts?token={gw.keys['ops']}") as ws:
        assert json.loads(await ws.recv())["type"] == "subscribed"
        store.revoke(gw.keys["ops"].split("_")[1])
        alert = common_pb2.OpsAlert(alert_id="al-2", occurred_at=to_timestamp(gw.mesh.clock.now()), kind="velocity",
                                    severity="high", member_id="m_victim", reasons=["held"])  # fmt: skip
        redis = Redis.from_url(redis_server.url)
        await RedisStreamBus(redis).publish(OPS_ALERTS, [OutgoingEvent("m_victim", "al-2", "ops_alert",
                                                                       alert.SerializeToString())])  # fmt: skip
        await redis.aclose()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), 3.0))
                assert message["type"] != "ops_alert", "an alert went out on a revoked key"
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert "revoked" in closed.value.rcvd.reason


def test_a_slow_consumer_is_dropped_not_buffered_without_bound() -> None:
    hub = LiveHub(bus=None, limit=3)  # type: ignore[arg-type]
    with hub.member("m_1") as sub:
        for i in range(10):
            hub._deliver(hub.members["m_1"], {"type": "x", "n": i})
        assert sub.queue.qsize() == 3 and sub.overflowed.is_set()
    assert "m_1" not in hub.members


async def test_two_gateway_processes_each_deliver_every_event_of_their_members(
    gw: GatewayUnderTest, tmp_path: Path, redis_server: RedisServer
) -> None:
    ports = [free_port(), free_port()]
    env = {
        **os.environ, "POINTMESH_DATA_DIR": str(gw.settings.data_dir), "POINTMESH_REDIS_URL": redis_server.url,
        "POINTMESH_LEDGER_ADDR": gw.settings.ledger_addr, "POINTMESH_RULES_ADDR": gw.settings.rules_addr,
        "POINTMESH_PROGRAM": "meshmart", "POINTMESH_LOG_LEVEL": "WARNING",
    }  # fmt: skip
    procs = []
    for port in ports:
        gateway_env = {**env, "POINTMESH_GATEWAY_ADDR": f"127.0.0.1:{port}"}
        command = [sys.executable, "-m", "pointmesh.cli", "gateway", "serve"]
        procs.append(subprocess.Popen(command, env=gateway_env, cwd=REPO))  # noqa: ASYNC220
    try:
        for port in ports:
            await asyncio.to_thread(wait_for_port, port)
        async with gw.client("pos") as pos:
            member = await enrol(pos)
            key = gw.keys["reader"]
            async with (
                connect(f"ws://127.0.0.1:{ports[0]}/v1/members/{member}/live?token={key}") as one,
                connect(f"ws://127.0.0.1:{ports[1]}/v1/members/{member}/live?token={key}") as two,
            ):
                for ws in (one, two):
                    assert json.loads(await ws.recv())["type"] == "subscribed"
                for n in range(3):
                    await pos.post("/v1/purchases", json=purchase_body(gw, member, f"B-{n}", 1000), headers=idem())
                for ws in (one, two):
                    seen = [
                        (await next_message(ws, "purchase_recorded", 3.0))["details"]["purchase_id"] for _ in range(3)
                    ]
                    assert len(set(seen)) == 3
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=15)
