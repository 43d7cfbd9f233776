"""Two ledger replicas on one Cassandra ledger and one Redis, as the prod overlay runs them
(3 to 20 pods, round-robin gRPC). Before, each replica relayed every shard: two relays read
the same rows before either marked them, so a member's events went out twice and out of order
(the live feed showed an older balance after a newer one). Now one replica relays a shard at a
time (a lease in Redis), and another takes it over when the holder stops."""

from __future__ import annotations

import asyncio
from pathlib import Path

from redis.asyncio import Redis

from pointmesh.events import LEDGER_EVENTS
from pointmesh.redis_server import RedisServer
from pointmesh.v1 import ledger_pb2
from tests.conftest import CassandraSession, LedgerUnderTest, fresh_cassandra_ledger, start_ledger, stop_ledger
from tests.ledger.helpers import key
from tests.waiting import until


async def _versions(redis: Redis, member: str) -> list[int]:
    return [
        ledger_pb2.LedgerEvent.FromString(fields[b"payload"]).balance_after.version
        for _id, fields in await redis.xrange(LEDGER_EVENTS)
        if fields[b"key"].decode() == member
    ]


async def _count_at_least(redis: Redis, member: str, n: int) -> bool:
    return len(await _versions(redis, member)) >= n


async def test_two_replicas_publish_a_members_events_once_each_in_order_and_survive_one_stopping(
    tmp_path: Path, redis_server: RedisServer, cassandra_session: CassandraSession
) -> None:
    shared = fresh_cassandra_ledger(cassandra_session)
    replicas: list[LedgerUnderTest] = [
        await start_ledger(tmp_path / "a", redis_server.url, **shared),
        await start_ledger(tmp_path / "b", redis_server.url, **shared),
    ]
    redis = Redis.from_url(redis_server.url)
    try:
        stubs = [r.stub for r in replicas]
        member = (await stubs[0].CreateMember(ledger_pb2.CreateMemberRequest(idempotency_key=key()))).member.member_id
        for i in range(30):  # round-robin, as the prod gRPC clients do
            await stubs[i % 2].Earn(ledger_pb2.EarnRequest(idempotency_key=key(), member_id=member, points=1))
        await until(lambda: _count_at_least(redis, member, 30), 10)
        await asyncio.sleep(0.5)  # anything published twice would be in by now
        versions = await _versions(redis, member)
        assert versions == sorted(versions) and len(versions) == len(set(versions)) == 30

        # The replica holding the leases stops; the other takes the shards over.
        await stop_ledger(replicas.pop(0))
        await stubs[1].Earn(ledger_pb2.EarnRequest(idempotency_key=key(), member_id=member, points=1))
        await until(lambda: _count_at_least(redis, member, 31), 20)
        assert (await _versions(redis, member))[-1] == versions[-1] + 1
    finally:
        await redis.aclose()
        for replica in replicas:
            await stop_ledger(replica)
