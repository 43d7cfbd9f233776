"""The write path's tombstones on a store the replicas share (RedisBalanceCache.settle), with a
real redis-server that stops answering (SIGSTOP). Each write waits for the sends in flight, its
own included, but never past SETTLE_SECONDS: the first version chained the sends one after the
other, each with its own bound, so the twelfth write of a stall waited twelve bounds (3 s) and
every ledger write on Cassandra ran into its gRPC deadline while Redis hung. When Redis answers
again, the entries are tombstoned."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from redis.asyncio import Redis

from ledger_svc.cache import SETTLE_SECONDS, RedisBalanceCache, cache_key
from pointmesh.redis_server import RedisServer, free_port


async def test_writes_during_a_redis_stall_each_wait_one_bound_at_most_and_tombstones_land_after(
    tmp_path: Path,
) -> None:
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    redis = Redis.from_url(server.url, socket_timeout=5)
    cache = RedisBalanceCache(redis, shared=True)
    cache.enable()  # as the relay does once it drained
    try:
        await redis.ping()
        os.kill(server.pid, signal.SIGSTOP)

        async def write(n: int) -> float:
            await asyncio.sleep(0.01 * n)
            cache.invalidate(f"m{n}", "points", 1)
            started = time.monotonic()
            await cache.settle()
            return time.monotonic() - started

        waits = await asyncio.gather(*(write(n) for n in range(12)))
        # One bound each, with room for a slow machine; chained, the last waited 12 bounds.
        assert max(waits) < 3 * SETTLE_SECONDS, waits
        assert not any(cache.usable_for(f"m{n}", "points") for n in range(12))  # still dirty here

        os.kill(server.pid, signal.SIGCONT)
        cache.invalidate("m0", "points", 2)
        await cache.settle()
        assert await redis.get(cache_key("m0", "points")) == b"2|"
    finally:
        os.kill(server.pid, signal.SIGCONT)
        await redis.aclose()
        server.stop()
