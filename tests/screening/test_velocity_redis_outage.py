"""fraud_svc whose velocity Redis is away fails every request alike, and says so (UNAVAILABLE, an
outage): the maintenance pass keeps the observation it was telling without counting an attempt
against it, however many passes the outage lasts, so fraud_svc's velocity state still learns of
it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from redis.asyncio import Redis

from ledger_svc import screening
from ledger_svc.fraud_client import FraudScreenerClient
from ledger_svc.screening import (
    MAX_TELL_ATTEMPTS,
    FraudScreen,
    ObservationBacklog,
    ScreenedKind,
    ScreeningContext,
    ScreeningRequest,
    UnavailablePolicy,
)
from pointmesh.redis_server import RedisServer, free_port
from tests.screening.test_observation_backlog import running_fraud

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
async def fraud_without_its_redis(tmp_path: Path, fraud_models: Path) -> AsyncIterator[str]:
    """A real fraud_svc whose velocity Redis is not there (a dedicated Redis down or restarting)."""
    async with running_fraud(tmp_path, fraud_models, f"redis://127.0.0.1:{free_port()}/0") as address:
        yield address


async def test_a_velocity_redis_outage_does_not_drop_kept_observations(
    redis_server: RedisServer, fraud_without_its_redis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(screening, "BREAKER_SECONDS", 0.0)  # passes a breaker's second apart
    redis = Redis.from_url(redis_server.url)
    name = "pm:test:backlog:velocity-outage"
    await redis.delete(name)
    backlog = ObservationBacklog(redis, key=name)
    kept = ScreeningRequest(
        event_id="redeem:pos:outage-1", kind=ScreenedKind.REDEMPTION, member_id="m_outage",
        occurred_at=NOW - timedelta(minutes=3), context=ScreeningContext(channel="pos"), points=500,
        amount=None, balance_points=4_000, member_since=None,
    )  # fmt: skip
    await backlog.keep(kept)
    client = FraudScreenerClient(fraud_without_its_redis, 5.0, 5.0)
    screen = FraudScreen(client, UnavailablePolicy(), backlog)
    try:
        for _ in range(MAX_TELL_ATTEMPTS + 5):
            await screen.tell_backlog()
        stored = [json.loads(raw) for raw in await redis.lrange(name, 0, -1)]  # type: ignore[misc]
    finally:
        await redis.delete(name)
        await redis.aclose()
    # An outage counts against no entry, however long (docs/fraud.md): still kept, untried.
    assert [(e["request"]["event_id"], e["attempts"]) for e in stored] == [("redeem:pos:outage-1", 0)]
