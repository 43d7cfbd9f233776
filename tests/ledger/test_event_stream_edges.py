"""What a member's event stream says of a transfer whatever the shards, and how WatchEvents ends
when the bus goes away (docs/events.md, ledger.proto)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from redis.asyncio import Redis

from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import ledger_pb2
from tests.conftest import LedgerUnderTest, start_ledger, stop_ledger
from tests.ledger.helpers import create_member, earn, key
from tests.ledger.test_outbox_and_cache import _outbox_backlog, _stream_events


async def _events_of(ledger: LedgerUnderTest, redis_url: str, member_id: str) -> list[ledger_pb2.LedgerEvent]:
    for _ in range(500):
        if not await _outbox_backlog(ledger):
            break
        await asyncio.sleep(0.02)
    client = Redis.from_url(redis_url)
    try:
        return await _stream_events(client, member_id)
    finally:
        await client.aclose()


def _kinds(events: list[ledger_pb2.LedgerEvent]) -> list[str]:
    return [e.WhichOneof("payload") or "" for e in events]


@pytest.mark.parametrize("same_shard", [True, False])
async def test_a_transfer_tells_its_sender_points_transferred_between_shards_as_within_one(
    ledger: LedgerUnderTest, redis_server: RedisServer, same_shard: bool
) -> None:
    """Between shards (every transfer on Cassandra) the sender's points are reserved first, then
    taken: the taking said hold_captured, with no transfer id or recipient, and was counted as
    points spent. It names the hold it settles, so a consumer watching holds sees it closed."""
    s, svc = ledger.stub, ledger.app.service
    a = (await create_member(s)).member_id
    b = (await create_member(s)).member_id
    while (svc.shard_of(a) == svc.shard_of(b)) != same_shard:
        b = (await create_member(s)).member_id
    await earn(s, a, 100)

    done = await s.Transfer(ledger_pb2.TransferRequest(
        idempotency_key=key(), source_member_id=a, destination_member_id=b, points=50))  # fmt: skip

    sender = (await _events_of(ledger, redis_server.url, a))[1:]  # after the earn
    receiver = await _events_of(ledger, redis_server.url, b)
    assert _kinds(receiver) == ["points_transferred"] and receiver[0].points_transferred.points == 50
    assert "hold_captured" not in _kinds(sender) and _kinds(sender)[-1] == "points_transferred", _kinds(sender)
    told = sender[-1].points_transferred
    assert (told.points, told.transfer_id, told.counterparty_member_id) == (-50, done.transfer_id, b)
    assert told.transaction_id == done.debit.transaction_id
    assert sender[-1].balance_after.balance_points == 50
    # Between shards (on Cassandra, every transfer) it settles the hold_placed before it: it
    # names that hold. Within one shard nothing was held.
    placed = [e.hold_placed.hold_id for e in sender if e.WhichOneof("payload") == "hold_placed"]
    assert told.hold_id == (placed[0] if placed else "") and len(placed) <= 1, (placed, told.hold_id)
    assert placed or same_shard


async def test_a_watch_opened_while_the_bus_is_away_is_refused_unavailable(tmp_path: Path) -> None:
    redis = RedisServer(free_port(), tmp_path / "redis")
    redis.start()
    ledger = await start_ledger(tmp_path / "data", redis.url)
    try:
        redis.stop()
        call = ledger.stub.WatchEvents(ledger_pb2.WatchEventsRequest())
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await asyncio.wait_for(anext(aiter(call)), timeout=20)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
        assert "event bus" in failed.value.details()
    finally:
        await stop_ledger(ledger)
        redis.stop()


async def test_a_watch_the_bus_drops_ends_unavailable_naming_the_position_to_resume_from(tmp_path: Path) -> None:
    redis = RedisServer(free_port(), tmp_path / "redis", appendonly=True)
    redis.start()
    ledger = await start_ledger(tmp_path / "data", redis.url)
    try:
        member = (await create_member(ledger.stub)).member_id
        await earn(ledger.stub, member, 10)
        call = ledger.stub.WatchEvents(ledger_pb2.WatchEventsRequest(member_id=member, after_position="0"))
        stream = aiter(call)
        first = await asyncio.wait_for(anext(stream), timeout=10)
        assert first.event.points_earned.points == 10
        redis.stop()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(anext(stream), timeout=20)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value.details()
        assert first.position in ended.value.details()
    finally:
        await stop_ledger(ledger)
        redis.stop()
