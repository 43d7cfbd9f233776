"""POINTMESH_EVENT_BUS=kafka end to end: a purchase through the gateway reaches the member's
websocket, through the ledger's outbox relay, a real Kafka broker and the gateway's
broadcast subscription."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from pointmesh.clock import ManualClock
from pointmesh.redis_server import RedisServer, free_port
from tests.conftest import start_ledger, start_rules, stop_ledger, stop_rules
from tests.gateway.conftest import GatewayUnderTest, start_gateway
from tests.gateway.test_api import enrol, idem, purchase_body
from tests.mesh.conftest import PROGRAM, START, Mesh


@pytest.fixture
async def kafka_gw(tmp_path: Path, redis_server: RedisServer, kafka_bootstrap: str) -> AsyncIterator[GatewayUnderTest]:
    clock = ManualClock(START)
    port = free_port()
    bus = {"event_bus": "kafka", "kafka_bootstrap": kafka_bootstrap}
    rules = await start_rules(tmp_path / "rules", clock, rules_addr=f"127.0.0.1:{port}", rules_seed_file=str(PROGRAM))
    ledger = await start_ledger(tmp_path / "ledger", redis_server.url, clock, rules_addr=f"127.0.0.1:{port}",
                                program="meshmart", **bus)  # fmt: skip
    running = await start_gateway(tmp_path / "gw", Mesh(rules, ledger, clock, port, tmp_path), redis_server.url, **bus)
    yield running
    running.uvicorn.should_exit = True
    await running.task
    await stop_ledger(ledger)
    await stop_rules(rules)


async def test_a_purchase_through_the_gateway_reaches_the_members_websocket_over_kafka(
    kafka_gw: GatewayUnderTest,
) -> None:
    gw = kafka_gw
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        async with connect(f"{gw.ws_url}/v1/members/{member}/live?token={gw.keys['pos']}") as ws:
            assert json.loads(await ws.recv())["type"] == "subscribed"
            ready = (await pos.get("/readyz")).json()
            assert ready["checks"]["kafka"] == "ok"
            # The gateway's subscription starts at the end of the topic; it is placed lazily, so
            # send receipts until the first one shows (each is its own receipt).
            seen: dict[str, object] = {}
            for i in range(40):
                sent = await pos.post("/v1/purchases", json=purchase_body(gw, member, f"K-{i}", 4200), headers=idem())
                assert sent.status_code == 201, sent.text
                try:
                    while True:
                        message = json.loads(await _recv(ws, 0.5))
                        if message["type"] == "purchase_recorded":
                            seen = message
                            break
                except TimeoutError:
                    continue
                break
            assert seen and seen["member_id"] == member
            assert seen["balance"]["balance_points"] >= 142  # type: ignore[index]


async def _recv(ws: object, within: float) -> str:
    import asyncio

    async with asyncio.timeout(within):
        return str(await ws.recv())  # type: ignore[attr-defined]
