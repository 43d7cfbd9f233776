"""A live client that stops reading is dropped once its queue overflows, even while a send to it
is stuck behind its full socket buffer; an upload with a large quarantine neither holds the
gateway's event loop for seconds nor answers with every quarantined line."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import connect

from gateway.live import Subscription
from pointmesh.events import LEDGER_EVENTS, OutgoingEvent, RedisStreamBus
from pointmesh.redis_server import RedisServer
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import ledger_pb2
from tests.gateway.conftest import GatewayUnderTest, start_gateway
from tests.gateway.test_api import enrol
from tests.gateway.test_auth_and_live import member_token
from tests.mesh.conftest import Mesh


@pytest.fixture
async def small_queue_gw(tmp_path: Path, mesh: Mesh, redis_server: RedisServer) -> AsyncIterator[GatewayUnderTest]:
    running = await start_gateway(tmp_path / "gateway", mesh, redis_server.url, live_queue_max=4)
    yield running
    running.uvicorn.should_exit = True
    await running.task


async def _silent_subscriber(gw: GatewayUnderTest, member: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A websocket handshake by hand: after it the client reads nothing (a phone in a tunnel)."""
    token = await member_token(gw, member)
    reader, writer = await asyncio.open_connection("127.0.0.1", int(gw.url.rsplit(":", 1)[1]))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /v1/members/{member}/live?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())  # fmt: skip
    await writer.drain()
    assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
    return reader, writer


def _big_event(gw: GatewayUnderTest, member: str, n: int) -> OutgoingEvent:
    """~200 kB: a handful fill the socket's buffers."""
    event = ledger_pb2.LedgerEvent(event_id=f"ev-slow-{n}", member_id=member, unit="points",
                                   occurred_at=to_timestamp(gw.mesh.clock.now()),
                                   points_earned=ledger_pb2.PointsEarned(points=1, reference="x" * 200_000))  # fmt: skip
    return OutgoingEvent(member, event.event_id, "points_earned", event.SerializeToString())


async def _fall_behind(redis_url: str, gw: GatewayUnderTest, sub: Subscription, member: str) -> None:
    """Publishes one event at a time until the queue keeps one (a send to the silent client is
    stuck behind its full buffers), then enough more to overflow the queue of 4 meanwhile."""
    redis = Redis.from_url(redis_url)
    bus = RedisStreamBus(redis)
    try:
        for n in range(100):
            await bus.publish(LEDGER_EVENTS, [_big_event(gw, member, n)])
            await asyncio.sleep(0.2)
            if sub.queue.qsize():
                break
        assert sub.queue.qsize(), "20 MB went to a client that reads nothing: the send never got stuck"
        await bus.publish(LEDGER_EVENTS, [_big_event(gw, member, 100 + n) for n in range(10)])
    finally:
        await redis.aclose()


def _open_sockets(gw: GatewayUnderTest) -> int:
    """Websocket connections the server still holds (a gracefully closed one stays until its
    buffer drains, so for good when the client reads nothing)."""
    return sum(1 for c in gw.uvicorn.server_state.connections if "WebSocket" in type(c).__name__)


async def _eventually(condition: Callable[[], bool], seconds: int) -> bool:
    for _ in range(seconds * 20):
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


async def _until_closed(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True once the server has ended the connection (EOF or reset), reading what it had sent."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(1 << 20):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def _new_member(gw: GatewayUnderTest) -> str:
    async with gw.client("pos") as pos:
        return await enrol(pos)


async def test_a_client_that_stops_reading_is_dropped_once_its_queue_overflows(
    small_queue_gw: GatewayUnderTest, redis_server: RedisServer
) -> None:
    gw = small_queue_gw
    hub, member = gw.uvicorn.config.app.state.gateway.hub, await _new_member(gw)
    reader, writer = await _silent_subscriber(gw, member)
    try:
        assert await _eventually(lambda: member in hub.members, 5), "the socket never subscribed"
        [sub] = hub.members[member]
        await _fall_behind(redis_server.url, gw, sub, member)
        # docs/gateway.md: "a client that falls that far behind is closed"; a send stuck behind its
        # full buffer must not keep it open and subscribed (before the fix: still so after 50 s).
        assert await _eventually(lambda: member not in hub.members, 15), (
            "the queue overflowed and the socket is still subscribed"
        )
        assert hub.dropped > 0, "the queue never overflowed: the test did not fall behind"
        # Aborted, not closed gracefully: a close would wait behind the unread buffer for good.
        assert await _eventually(lambda: not _open_sockets(gw), 15), (
            "unsubscribed, but the server still holds the connection"
        )
        assert await _until_closed(reader, 30), "the client never saw its connection end"
    finally:
        writer.close()


async def test_a_client_that_reads_still_gets_every_update_in_order(
    small_queue_gw: GatewayUnderTest, redis_server: RedisServer
) -> None:
    """The normal path: sends that go through are neither cut short nor reordered by the race."""
    gw = small_queue_gw
    hub, member = gw.uvicorn.config.app.state.gateway.hub, await _new_member(gw)
    token = await member_token(gw, member)
    async with connect(f"{gw.ws_url}/v1/members/{member}/live?token={token}", max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "subscribed"
        redis = Redis.from_url(redis_server.url)
        for n in range(3):
            await RedisStreamBus(redis).publish(LEDGER_EVENTS, [_big_event(gw, member, n)])
        await redis.aclose()
        async with asyncio.timeout(20):
            got = [json.loads(await ws.recv()) for _ in range(3)]
            await ws.send(json.dumps({"type": "ping"}))
            got.append(json.loads(await ws.recv()))
        assert [m.get("event_id", m["type"]) for m in got] == ["ev-slow-0", "ev-slow-1", "ev-slow-2", "pong"]
        assert member in hub.members and hub.dropped == 0


async def test_a_large_quarantine_neither_stalls_the_gateway_nor_is_answered_whole(gw: GatewayUnderTest) -> None:
    row = b"P,HEL-01,R-00000001,1,2026-01-02T10:15:00+02:00,4000-000001,EUR,SKU-1,misc,1,12.50\n"
    data = b"record_type;store_id\n" + row * 250_000  # 20 MiB whose header is unusable: every line quarantined
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:  # stands in for every other till's request on the gateway's loop
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with gw.client("franchise") as franchise:
        ticking = asyncio.create_task(ticker())
        answer = await franchise.post("/v1/legacy/imports", params={"adapter": "csv"},
                                      files={"file": ("drop.csv", data, "text/csv")}, timeout=120)  # fmt: skip
        done.set()
        await ticking
    assert answer.status_code == 200, answer.text[:300]
    report = answer.json()
    # Before the fix the loop stood still for 2.7-4 s (fsync and a 32 MB report on it).
    assert max(gaps) < 1.0, f"the event loop stood still for {max(gaps):.2f} s"
    assert len(answer.content) < 1_000_000, f"a {len(answer.content)}-byte report"
    assert len(report["quarantined"]) == 1_000  # ImportReport.MAX_LISTED
    assert [q["line"] for q in report["quarantined"][:2]] == [1, 2]
    assert (report["quarantined_total"], report["quarantined_truncated"]) == (250_001, True)
    quarantine = gw.settings.data_dir / "quarantine" / report["quarantine_file"]
    with quarantine.open("rb") as written:  # the file still holds every line
        assert sum(1 for _ in written) == 250_001
