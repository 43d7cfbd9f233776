"""The relay's shard leases on a real Redis: one holder at a time, renewed by it, taken over
once it lapses (the old holder then hears it lost it, so it stops relaying that shard at its
next page), given up on a clean stop only by the replica holding it."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from ledger_svc.outbox import RelayLeases
from pointmesh.redis_server import RedisServer


async def test_a_shard_lease_has_one_holder_renewed_by_it_and_taken_over_once_it_lapses(
    redis_server: RedisServer,
) -> None:
    redis = Redis.from_url(redis_server.url)
    try:
        a = RelayLeases(redis, "ks.lease-test-1", seconds=0.3)
        b = RelayLeases(redis, "ks.lease-test-1", seconds=0.3)
        other_ledger = RelayLeases(redis, "ks.lease-test-2", seconds=0.3)
        assert await a.hold(0) and not await b.hold(0)
        assert await other_ledger.hold(0)  # leases are per ledger
        for _ in range(3):  # renewed within its time, it stays A's
            await asyncio.sleep(0.2)
            assert await a.hold(0) and not await b.hold(0)
        await asyncio.sleep(0.4)  # A stalled past its lease
        assert await b.hold(0) and not await a.hold(0)

        assert await a.hold(1)
        await b.release_all(2)  # B gives up shard 0, not A's shard 1
        assert await a.hold(0) and not await b.hold(1)
    finally:
        await redis.aclose()
