"""A Redis connection that goes silent without closing (a Redis pod replaced behind its address,
a NAT entry dropped) must not stop the readers on it for good: the gateway's live tail and a
consumer group each notice within the Redis timeout plus one blocking read, reconnect, and
deliver what was published meanwhile.

The silence is real: a TCP relay between the bus and a real redis-server stops forwarding on
every connection it has (keeping them open, as a vanished peer does), while connections made
after that go through."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from gateway.live import LiveHub
from pointmesh.config import load_settings
from pointmesh.consumers import run_group
from pointmesh.events import LEDGER_EVENTS, BusMessage, OutgoingEvent, RedisStreamBus, open_bus
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import ledger_pb2

WITHIN = 15.0  # the relay's silence is noticed after 0.5 s + 1 s; generous for a busy box


class SilencingRelay:
    """Forwards TCP to Redis; `silence()` makes every connection made so far a dead peer."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.generation = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    def silence(self) -> None:
        self.generation += 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):  # torn down with the test
            await self._relay(reader, writer)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        born = self.generation
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    if self.generation == born:  # silenced: swallowed, and nothing closes
                        dst.write(data)
                        await dst.drain()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()


@pytest.fixture
async def relay(redis_server: RedisServer) -> AsyncIterator[SilencingRelay]:
    r = SilencingRelay(redis_server.port)
    await r.start()
    yield r
    await r.stop()


def _event(member: str, n: int) -> OutgoingEvent:
    event = ledger_pb2.LedgerEvent(event_id=f"ev-{member}-{n}", member_id=member,
                                   points_redeemed=ledger_pb2.PointsRedeemed(transaction_id=f"tx-{n}", points=-n))  # fmt: skip
    return OutgoingEvent(member, event.event_id, "points_redeemed", event.SerializeToString())


async def test_the_live_tail_reconnects_after_its_redis_connection_goes_silent(
    relay: SilencingRelay, redis_server: RedisServer, tmp_path: Path
) -> None:
    hub = LiveHub(open_bus(load_settings({}, redis_url=f"redis://127.0.0.1:{relay.port}/0")), 100)
    direct = Redis.from_url(redis_server.url)
    follower = asyncio.create_task(hub.run())
    try:
        with hub.member("m-silent") as sub:
            await asyncio.sleep(0.3)  # the tail has pinned its position
            await RedisStreamBus(direct).publish(LEDGER_EVENTS, [_event("m-silent", 1)])
            assert (await asyncio.wait_for(sub.queue.get(), WITHIN))["event_id"] == "ev-m-silent-1"

            relay.silence()
            await RedisStreamBus(direct).publish(LEDGER_EVENTS, [_event("m-silent", 2)])

            assert (await asyncio.wait_for(sub.queue.get(), WITHIN))["event_id"] == "ev-m-silent-2"
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await hub.bus.close()
        await direct.aclose()


async def test_a_consumer_group_reconnects_after_its_redis_connection_goes_silent(
    relay: SilencingRelay, redis_server: RedisServer
) -> None:
    bus = open_bus(load_settings({}, redis_url=f"redis://127.0.0.1:{relay.port}/0"))
    direct = Redis.from_url(redis_server.url)
    topic = "test.dead-peer"
    got: asyncio.Queue[str] = asyncio.Queue()

    async def handle(messages: list[BusMessage]) -> None:
        for m in messages:
            got.put_nowait(m.event_id)

    stop = asyncio.Event()
    consumer = asyncio.create_task(run_group(bus, topic, "g", "c1", handle, stop=stop))
    try:
        await RedisStreamBus(direct).publish(topic, [_event("m-1", 1)])
        assert await asyncio.wait_for(got.get(), WITHIN) == "ev-m-1-1"

        relay.silence()
        await RedisStreamBus(direct).publish(topic, [_event("m-1", 2)])

        # The first event's acknowledgement may have gone into the silence: it comes again then
        # (at least once), before or with the second.
        async def second() -> None:
            while await got.get() != "ev-m-1-2":
                pass

        await asyncio.wait_for(second(), WITHIN)
    finally:
        stop.set()
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        await bus.close()
        await direct.aclose()
