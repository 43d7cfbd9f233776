"""The velocity stores the fraud tests run against: every semantic test runs on both."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from fraud_svc.velocity import MemoryVelocity, Velocity
from fraud_svc.velocity_redis import RedisVelocity
from pointmesh.redis_server import RedisServer


@pytest.fixture(params=["memory", "redis"])
async def velocity(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[Velocity]:
    """Each semantic test runs against both stores."""
    if request.param == "memory":
        yield MemoryVelocity()
        return
    client = Redis.from_url(redis_server.url)
    yield RedisVelocity(client, prefix=f"test:{uuid.uuid4().hex}:")
    await client.aclose()
