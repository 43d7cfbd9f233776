"""Every ledger behaviour test runs on each store: the embedded SQLite one and a real Cassandra."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pointmesh.redis_server import RedisServer
from tests.conftest import LedgerUnderTest, start_ledger, stop_ledger, store_settings


@pytest.fixture(params=["sqlite", "cassandra"])
async def ledger(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[LedgerUnderTest]:
    """A fresh ledger_svc (4 shards, ManualClock) on loopback, once per store."""
    running = await start_ledger(tmp_path / "data", redis_server.url, **store_settings(request, request.param))
    yield running
    await stop_ledger(running)
