"""Live updates after a bus error: the gateway's tail resumes where it was, so an event published
while it could not read still reaches the socket, on a stream that was quiet until then too (ops
alerts are rare; a new gateway has read no ledger event yet). And a frame no JSON parser should
recurse through is ignored like any other, not the end of the socket.

The read failure is a real one from the real redis-server: for a while the ACL refuses XREAD
(`NOPERM`, which redis-py does not retry, where it rides out a dropped connection itself), so
the tail's reads fail exactly while the test publishes, and succeed again once it is lifted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import connect

from pointmesh.events import LEDGER_EVENTS, OPS_ALERTS, OutgoingEvent, RedisStreamBus
from pointmesh.redis_server import RedisServer
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import common_pb2
from tests.gateway.conftest import GatewayUnderTest
from tests.gateway.test_api import idem, purchase_body
from tests.gateway.test_auth_and_live import member_stream, next_message


class TailFailures:
    """Counts the live hub's "following <stream> failed" warnings, one per failed read."""

    def __init__(self, caplog: pytest.LogCaptureFixture, stream: str) -> None:
        caplog.set_level(logging.WARNING, logger="gateway.live")
        self.caplog, self.prefix = caplog, f"following {stream} failed"

    def count(self) -> int:
        warnings = [r.getMessage() for r in self.caplog.records if r.name == "gateway.live"]
        return sum(1 for message in warnings if message.startswith(self.prefix))

    async def more_than(self, seen: int, within: float = 5.0) -> int:
        for _ in range(int(within / 0.02)):
            if self.count() > seen:
                return self.count()
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {self.prefix!r} warning past {seen} within {within}s")


@contextlib.asynccontextmanager
async def xread_refused(redis: Redis) -> AsyncIterator[None]:
    """Every XREAD fails with NOPERM until the block ends; the rest of Redis keeps working."""
    await redis.execute_command("ACL", "SETUSER", "default", "-xread")
    try:
        yield
    finally:
        await redis.execute_command("ACL", "SETUSER", "default", "+xread")


async def published(redis: Redis, stream: str, key: str, within: float = 5.0) -> None:
    """Waits until the stream's newest entries include one keyed `key`."""
    for _ in range(int(within / 0.02)):
        if any(fields.get(b"key") == key.encode() for _id, fields in await redis.xrevrange(stream, count=20)):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"nothing keyed {key} reached {stream} within {within}s")


async def test_an_alert_published_while_the_tail_cannot_read_still_arrives(
    gw: GatewayUnderTest, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    failures = TailFailures(caplog, OPS_ALERTS)
    redis = Redis.from_url(redis_server.url)
    try:
        async with connect(f"{gw.ws_url}/v1/ops/alerts?token={gw.keys['ops']}") as ws:
            assert json.loads(await ws.recv())["type"] == "subscribed"
            async with xread_refused(redis):
                seen = await failures.more_than(failures.count())  # the tail is down
                alert = common_pb2.OpsAlert(alert_id="al-resume", occurred_at=to_timestamp(gw.mesh.clock.now()),
                                            kind="velocity", severity="high", member_id="m_resume")  # fmt: skip
                await RedisStreamBus(redis).publish(
                    OPS_ALERTS, [OutgoingEvent("m_resume", "al-resume", "ops_alert", alert.SerializeToString())]
                )
                await failures.more_than(seen)  # and has retried since the alert went out
            got = await next_message(ws, "ops_alert", within=5.0)
            assert got["alert_id"] == "al-resume"
    finally:
        await redis.aclose()


async def test_a_purchase_recorded_while_the_tail_cannot_read_still_reaches_the_member(
    gw: GatewayUnderTest, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway is new and has read no ledger event yet: the same quiet-stream case."""
    failures = TailFailures(caplog, LEDGER_EVENTS)
    redis = Redis.from_url(redis_server.url)
    try:
        async with gw.client("pos") as pos, member_stream(gw, pos) as (member, ws):
            async with xread_refused(redis):
                seen = await failures.more_than(failures.count())
                response = await pos.post("/v1/purchases", json=purchase_body(gw, member, "RESUME-1", 1000),
                                          headers=idem())  # fmt: skip
                assert response.status_code in (200, 201), response.text
                await published(redis, LEDGER_EVENTS, member)  # the ledger's relay sent it
                await failures.more_than(seen)
            got = await next_message(ws, "purchase_recorded", within=5.0)
            assert got["member_id"] == member
    finally:
        await redis.aclose()


async def test_a_deeply_nested_frame_is_ignored_and_the_socket_still_answers_a_ping(gw: GatewayUnderTest) -> None:
    """json.loads recurses once per "[": this frame raised RecursionError, not ValueError, and the
    socket went down with no close frame."""
    async with gw.client("pos") as pos, member_stream(gw, pos) as (member, ws):
        await ws.send("[" * 100_000)
        await ws.send(b"[" * 100_000)
        await ws.send(json.dumps({"type": "ping"}))
        await next_message(ws, "pong", within=3.0)
        await pos.post("/v1/purchases", json=purchase_body(gw, member, "NEST-1", 1000), headers=idem())
        assert (await next_message(ws, "purchase_recorded", within=3.0))["member_id"] == member
