"""The velocity stores the fraud tests run against: every semantic test runs on both."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from redis.asyncio import Redis

from fraud_svc.app import build
from fraud_svc.velocity import MemoryVelocity, Velocity
from fraud_svc.velocity_redis import RedisVelocity
from pointmesh.clock import ManualClock
from pointmesh.config import load_settings
from pointmesh.redis_server import RedisServer
from pointmesh.rpc import client_channel
from pointmesh.v1 import fraud_pb2_grpc

# The clock of the module-scoped fraud_svc `stub` serves on.
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["memory", "redis"])
async def velocity(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[Velocity]:
    """Each semantic test runs against both stores."""
    if request.param == "memory":
        yield MemoryVelocity()
        return
    client = Redis.from_url(redis_server.url)
    yield RedisVelocity(client, prefix=f"test:{uuid.uuid4().hex}:")
    await client.aclose()


@pytest.fixture(scope="module")
async def stub(
    tmp_path_factory: pytest.TempPathFactory, fraud_models: Path, redis_server: RedisServer
) -> AsyncIterator[fraud_pb2_grpc.FraudServiceStub]:
    """A real fraud_svc over gRPC on a clock stopped at NOW, one per test module."""
    tmp = tmp_path_factory.mktemp("fraud-stub")
    shutil.copytree(fraud_models, tmp / "models")
    settings = load_settings({}, data_dir=tmp, redis_url=redis_server.url, models_dir=str(tmp / "models"),
                             fraud_addr="127.0.0.1:0", grace_seconds=1.0)  # fmt: skip
    app = await build(settings, clock=ManualClock(NOW))
    await app.start()
    channel = client_channel(f"127.0.0.1:{app.port}", default_timeout_seconds=10.0)
    yield fraud_pb2_grpc.FraudServiceStub(channel)
    await channel.close()
    await app.stop(grace=1.0)
