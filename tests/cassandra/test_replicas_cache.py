"""Two ledger replicas on one Cassandra ledger share one Redis balance cache. Before, only the
writing replica knew its cached balance was stale (a dirty set in its memory) until its relay
tombstoned it; the other replica went on answering GetBalance from Redis with the balance from
before a write that had already answered (a member paying at the till and looking at the app
saw the old balance). Now the writer tombstones in Redis before it answers."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio import Redis

from pointmesh.events import LEDGER_EVENTS
from pointmesh.redis_server import RedisServer
from pointmesh.v1 import ledger_pb2
from tests.conftest import CassandraSession, LedgerUnderTest, fresh_cassandra_ledger, start_ledger, stop_ledger
from tests.ledger.helpers import balance, key
from tests.waiting import until


async def test_a_balance_read_on_one_replica_right_after_a_write_on_another_sees_the_write(
    tmp_path: Path, redis_server: RedisServer, cassandra_session: CassandraSession
) -> None:
    shared = fresh_cassandra_ledger(cassandra_session)
    replicas: list[LedgerUnderTest] = []
    redis = Redis.from_url(redis_server.url)
    try:
        # The reader starts first and relays every shard (it holds the relay leases), so the
        # writer's events reach Redis only on the reader's next poll, as with any two pods.
        reader = await start_ledger(tmp_path / "reader", redis_server.url, **shared)
        replicas.append(reader)
        member = (await reader.stub.CreateMember(ledger_pb2.CreateMemberRequest(idempotency_key=key()))).member
        await reader.stub.Earn(ledger_pb2.EarnRequest(idempotency_key=key(), member_id=member.member_id, points=5))

        async def relayed() -> bool:
            return await redis.xlen(LEDGER_EVENTS) >= 1

        await until(relayed, 10)
        writer = await start_ledger(tmp_path / "writer", redis_server.url, **shared)
        replicas.append(writer)

        expected = (await balance(reader.stub, member.member_id)).balance_points  # cached on the reader now
        assert expected == 5
        stale = []
        for i in range(20):
            await writer.stub.Earn(ledger_pb2.EarnRequest(idempotency_key=key(), member_id=member.member_id, points=1))
            expected += 1
            seen = [(await balance(reader.stub, member.member_id)).balance_points for _ in range(2)]  # then cached
            if seen != [expected, expected]:
                stale.append((i, seen, expected))
        assert stale == []
    finally:
        await redis.aclose()
        for replica in replicas:
            await stop_ledger(replica)
