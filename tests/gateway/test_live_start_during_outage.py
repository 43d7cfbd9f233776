"""A gateway started while Redis is away (a pod rescheduled during an outage), with a member
already connected (member tokens need no Redis): when Redis returns and the ledger's relay
publishes what waited in its outbox, the member gets it. Before, the hub pinned "now" only
once Redis answered again, after that backlog, and the member never saw it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from redis.asyncio import Redis

from gateway.live import LiveHub
from pointmesh.events import LEDGER_EVENTS, OutgoingEvent, RedisStreamBus
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import ledger_pb2


async def _publish(url: str, member: str, event_id: str) -> None:
    event = ledger_pb2.LedgerEvent(event_id=event_id, member_id=member, unit="points")
    event.points_earned.points = 10
    bus = RedisStreamBus(Redis.from_url(url), owns_client=True)
    try:
        await bus.publish(LEDGER_EVENTS, [OutgoingEvent(member, event_id, "points_earned", event.SerializeToString())])
    finally:
        await bus.close()


async def test_a_hub_started_while_redis_is_away_delivers_what_is_published_when_it_returns(tmp_path: Path) -> None:
    redis = RedisServer(free_port(), tmp_path / "redis", appendonly=True)
    redis.start()
    member = "m_livestart000000000000000001"
    await _publish(redis.url, "m_other", "ev_before")  # the stream exists, with history
    redis.stop()
    hub = LiveHub(RedisStreamBus(Redis.from_url(redis.url, socket_connect_timeout=0.2), owns_client=True), 100)
    task = asyncio.create_task(hub.run())
    try:
        with hub.member(member) as sub:
            await asyncio.sleep(0.3)  # the hub has tried to find its start and failed
            redis.start()
            await _publish(redis.url, member, "ev_backlog")  # the relay's backlog, at once
            got = await asyncio.wait_for(sub.queue.get(), 5.0)
            assert got["event_id"] == "ev_backlog"
            assert sub.queue.empty()  # and nothing from before the hub started
    finally:
        task.cancel()
        redis.stop()
