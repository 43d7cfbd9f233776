"""The backlog of observations fraud_svc missed while away, drained by every ledger replica's
maintenance pass at once: each entry is told (or kept), never dropped untold, and one that
fraud_svc keeps failing on is dropped after a bounded number of attempts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from redis.asyncio import Redis

from fraud_svc.app import FraudApp
from fraud_svc.app import build as build_fraud
from fraud_svc.domain import TxContext, TxKind
from fraud_svc.features import featurize
from fraud_svc.velocity_redis import RedisVelocity
from ledger_svc.fraud_client import FraudScreenerClient
from ledger_svc.screening import (
    MAX_TELL_ATTEMPTS,
    FraudScreen,
    ObservationBacklog,
    ScreenedKind,
    ScreenerUnavailable,
    Screening,
    ScreeningContext,
    ScreeningRequest,
    UnavailablePolicy,
    Verdict,
)
from pointmesh.config import load_settings
from pointmesh.redis_server import RedisServer, free_port

NOW = datetime.now(UTC).replace(microsecond=0)


def _return(member: str, i: int) -> ScreeningRequest:
    return ScreeningRequest(
        event_id=f"return:{member}:{i}", kind=ScreenedKind.RETURN, member_id=member,
        occurred_at=NOW - timedelta(minutes=10, seconds=i), context=ScreeningContext(channel="pos"), points=10,
        amount=None, balance_points=0, member_since=None,
    )  # fmt: skip


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@contextlib.asynccontextmanager
async def running_fraud(tmp_path: Path, fraud_models: Path, redis_url: str) -> AsyncIterator[str]:
    """A real fraud_svc (a copy of the session's trained models, velocity at `redis_url`); its
    address."""
    models = tmp_path / "models"
    shutil.copytree(fraud_models, models)
    address = f"127.0.0.1:{free_port()}"
    settings = load_settings({}, redis_url=redis_url, models_dir=str(models), fraud_addr=address,
                             grace_seconds=0.5)  # fmt: skip
    app: FraudApp = await build_fraud(settings)
    await app.start()
    try:
        yield address
    finally:
        await app.stop(grace=0.5)


@pytest.fixture
async def fraud(tmp_path: Path, redis_server: RedisServer, fraud_models: Path) -> AsyncIterator[str]:
    """A real fraud_svc with its velocity in the shared Redis; its address."""
    async with running_fraud(tmp_path, fraud_models, redis_server.url) as address:
        yield address


async def test_two_replicas_draining_the_backlog_at_once_tell_every_observation(
    redis: Redis, fraud: str, request: pytest.FixtureRequest
) -> None:
    """A real fraud_svc and two replicas' FraudScreens (each its own client and backlog object)
    on one Redis, running the maintenance pass together with a page smaller than the backlog:
    every kept return reaches fraud_svc's velocity state, and the backlog ends empty. Before
    the fix each replica read the same oldest page and popped one entry per observation it
    told, so the two popped two pages while telling one: 12 of 24 returns were lost untold."""
    member = f"m_backlog_{request.node.name[-12:]}"
    name = f"pm:test:backlog:{member}"
    await redis.delete(name)
    kept = ObservationBacklog(redis, key=name)
    for i in range(24):
        await kept.keep(_return(member, i))
    replicas = [
        FraudScreen(FraudScreenerClient(fraud, 5.0, 5.0), UnavailablePolicy(), ObservationBacklog(redis, key=name))
        for _ in range(2)
    ]
    for _ in range(2):
        await asyncio.gather(*(replica.tell_backlog(limit=6) for replica in replicas))

    assert await redis.llen(name) == 0  # type: ignore[misc]
    probe = TxContext(f"probe-{member}", TxKind.REDEMPTION, member, NOW, points=10)
    features = await featurize(probe, RedisVelocity(redis))
    assert features["member_returns_24h"] == 24


class _Answering:
    """A minimal Screener (a real fraud_svc cannot be made to fail on one event): it fails on
    the event ids in `failing` as fraud_client reports a gRPC status (`outage`: one of
    fraud_svc's own, like UNAVAILABLE), answers the rest, and counts the calls per event id."""

    def __init__(self, failing: set[str], failure: str, *, outage: bool = False) -> None:
        self.failing, self.failure, self.outage = failing, failure, outage
        self.calls: dict[str, int] = {}

    async def screen(self, request: ScreeningRequest) -> Screening:
        self.calls[request.event_id] = self.calls.get(request.event_id, 0) + 1
        if request.event_id in self.failing:
            raise ScreenerUnavailable(self.failure, outage=self.outage)
        return Screening(Verdict.ALLOW, True)

    async def screen_many(self, requests: Sequence[ScreeningRequest]) -> list[Screening | ScreenerUnavailable]:
        raise NotImplementedError


async def _passes(screen: FraudScreen, n: int) -> None:
    for _ in range(n):
        screen._down_until = 0.0  # the breaker's second has passed before the next pass
        await screen.tell_backlog()


async def test_an_observation_fraud_svc_keeps_failing_on_is_dropped_after_bounded_attempts(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """fraud_svc answers INTERNAL for one entry (not INVALID_ARGUMENT, which counts as told):
    each pass that tries it trips the breaker. It does not hold up the others, and after
    MAX_TELL_ATTEMPTS failures it is dropped, logged at ERROR, so it stops tripping the
    breaker. Before the fix it stayed at the head for ever, and nothing behind it was told."""
    name = "pm:test:backlog:poison"
    await redis.delete(name)
    backlog = ObservationBacklog(redis, key=name)
    for i in range(3):
        await backlog.keep(_return("m_poison", i))
    screener = _Answering({"return:m_poison:0"}, "INTERNAL: boom")
    screen = FraudScreen(screener, UnavailablePolicy(), backlog)

    with caplog.at_level(logging.ERROR, logger="ledger_svc.screening"):
        await _passes(screen, MAX_TELL_ATTEMPTS + 5)

    assert screener.calls == {"return:m_poison:0": MAX_TELL_ATTEMPTS, "return:m_poison:1": 1, "return:m_poison:2": 1}
    assert await redis.llen(name) == 0  # type: ignore[misc]
    assert any("return:m_poison:0" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


async def test_an_outage_does_not_count_against_the_observations_it_holds_back(redis: Redis) -> None:
    """fraud_svc not there (UNAVAILABLE, or past the deadline) fails every entry alike: however
    many passes the outage lasts, nothing is dropped, and all are told once it is back."""
    name = "pm:test:backlog:outage"
    await redis.delete(name)
    backlog = ObservationBacklog(redis, key=name)
    for i in range(2):
        await backlog.keep(_return("m_outage", i))
    events = {"return:m_outage:0", "return:m_outage:1"}
    down = _Answering(set(events), "UNAVAILABLE: connection refused", outage=True)
    await _passes(FraudScreen(down, UnavailablePolicy(), backlog), MAX_TELL_ATTEMPTS * 3)
    assert sum(down.calls.values()) == MAX_TELL_ATTEMPTS * 3  # one try a pass, then the breaker

    stored = [json.loads(raw) for raw in await redis.lrange(name, 0, -1)]  # type: ignore[misc]
    assert sorted((e["request"]["event_id"], e["attempts"]) for e in stored) == sorted((e, 0) for e in events)
    back = _Answering(set(), "")
    await _passes(FraudScreen(back, UnavailablePolicy(), backlog), 1)
    assert back.calls == dict.fromkeys(events, 1)
    assert await redis.llen(name) == 0  # type: ignore[misc]


async def test_what_a_replica_took_and_never_settled_comes_back_when_its_lease_ends(redis: Redis) -> None:
    """A replica killed mid-pass took a page and told nothing: once the lease runs out, the next
    pass of another replica tells every entry. Before leases the page was popped for good."""
    name = "pm:test:backlog:died"
    await redis.delete(name, f"{name}:leases", f"{name}:lease-deadlines")
    dying = ObservationBacklog(redis, key=name, lease_seconds=0.2)
    for i in range(5):
        await dying.keep(_return("m_died", i))
    assert len((await dying.take(10)).entries) == 5  # ... and the replica dies here
    assert await redis.llen(name) == 0  # type: ignore[misc]

    survivor = _Answering(set(), "")
    screen = FraudScreen(survivor, UnavailablePolicy(), ObservationBacklog(redis, key=name))
    assert await screen.tell_backlog() == 0  # the lease still runs: nobody else takes them
    await asyncio.sleep(0.3)
    assert await screen.tell_backlog() == 5
    assert survivor.calls == {f"return:m_died:{i}": 1 for i in range(5)}
    assert await redis.llen(name) == 0 and await redis.hlen(f"{name}:leases") == 0  # type: ignore[misc]


async def test_a_lease_settled_after_it_ran_out_puts_nothing_on_the_backlog_twice(redis: Redis) -> None:
    name = "pm:test:backlog:late"
    await redis.delete(name, f"{name}:leases", f"{name}:lease-deadlines")
    slow = ObservationBacklog(redis, key=name, lease_seconds=0.2)
    for i in range(3):
        await slow.keep(_return("m_late", i))
    late = await slow.take(10)
    await asyncio.sleep(0.3)
    other = ObservationBacklog(redis, key=name)
    taken = await other.take(10)  # the ran-out lease came back, and is taken again
    assert sorted(e.request.event_id for e in taken.entries) == [f"return:m_late:{i}" for i in range(3)]
    await slow.settle(late, late.entries)  # too late: these are the other pass's now
    assert await redis.llen(name) == 0  # type: ignore[misc]
    await other.settle(taken, taken.entries[:1])  # told two of them
    assert [json.loads(raw)["request"]["event_id"] for raw in await redis.lrange(name, 0, -1)] == [  # type: ignore[misc]
        taken.entries[0].request.event_id
    ]
