"""A peak with more Redis calls in flight than a service's connection pool holds: each call
waits for a connection. Before, redis-py's pool refused every call past its 100th ("Too many
connections"): fraud_svc failed those Score calls, and the ledger, told fraud_svc was away, lost
the observations it meant to keep for later (gateway_bench at 250 purchases/s)."""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from fraud_svc.app import build as build_fraud
from fraud_svc.server import context
from ledger_svc.domain import Money
from ledger_svc.screening import ObservationBacklog, ScreenedKind
from pointmesh.clock import ManualClock
from pointmesh.config import load_settings
from pointmesh.events import OutgoingEvent, RedisStreamBus, bus_redis
from pointmesh.redis_client import POOL_CONNECTIONS, open_redis
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import common_pb2, ledger_pb2
from tests.conftest import start_ledger, stop_ledger
from tests.fraud.test_service_grpc import NOW, tx
from tests.screening.test_fraud_on_the_path import kept_for
from tests.screening.test_observation_backlog import _return
from tests.waiting import until

PEAK = 300  # past redis-py's refusing pool (100) and well past ours
assert PEAK > 2 * POOL_CONNECTIONS


async def test_fraud_svc_scores_every_call_of_a_peak_larger_than_its_pool(
    tmp_path: Path, fraud_models: Path, redis_server: RedisServer
) -> None:
    shutil.copytree(fraud_models, tmp_path / "models")
    settings = load_settings({}, data_dir=tmp_path, redis_url=redis_server.url, models_dir=str(tmp_path / "models"),
                             fraud_addr="127.0.0.1:0", grace_seconds=0.5)  # fmt: skip
    app = await build_fraud(settings, clock=ManualClock(NOW))
    await app.start()
    try:
        member = f"m_peak_{tmp_path.name[-8:]}"
        calls = [context(tx(f"peak-{member}-{i}", member=f"{member}-{i % 10}")) for i in range(PEAK)]
        results = await asyncio.gather(*(app.service.score(c) for c in calls), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, f"{len(failed)} of {PEAK} calls failed, the first: {failed[0]!r}"
        # Each member's ten purchases were all observed: the last one scored saw the nine others.
        again = await app.service.score(context(tx(f"peak-{member}-after", member=f"{member}-0")))
        assert again.features["member_purchases_1h"] == PEAK // 10 + 1  # type: ignore[attr-defined]
    finally:
        await app.stop(grace=0.5)


async def test_the_ledger_keeps_every_observation_of_a_peak_fraud_svc_missed(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """fraud_svc away (nothing listens on its port): every screened purchase is decided by the
    policy and kept for the maintenance pass, all of them."""
    ledger = await start_ledger(tmp_path, redis_server.url, fraud_screening=True, fraud_addr=f"127.0.0.1:{free_port()}")
    try:
        screen = ledger.app.service.fraud
        assert screen is not None and isinstance(screen.backlog, ObservationBacklog)
        member = f"m_peak_{tmp_path.name[-8:]}"
        requests = [replace(_return(member, i), event_id=f"purchase:{member}:{i}", kind=ScreenedKind.PURCHASE,
                            amount=Money(2500, "EUR")) for i in range(PEAK)]  # fmt: skip
        await asyncio.gather(*(screen.screen(r) for r in requests))
        kept = await kept_for(redis_server.url, screen.backlog, member)
        assert len(kept) == PEAK, f"{PEAK - len(kept)} of {PEAK} observations lost"
    finally:
        await stop_ledger(ledger)


async def test_a_bus_client_with_more_tails_than_a_pool_holds_still_publishes(redis_server: RedisServer) -> None:
    """Tails hold their connection while Redis blocks their read, give it back and take one again
    at once, so a command waiting for a connection was never served: on a pool of 64 the 64th
    tail stopped every publish of the process (the ledger's outbox relay shares its bus client
    with its WatchEvents streams). The bus client's pool is sized for tails."""
    client = bus_redis(SimpleNamespace(redis_url=redis_server.url, redis_timeout_seconds=0.5))
    bus = RedisStreamBus(client)
    topic, tails = f"peak-{time.time_ns()}", 2 * POOL_CONNECTIONS
    got = [0] * tails

    async def tail(k: int) -> None:
        async for _ in bus.subscribe(topic, "0"):
            got[k] += 1

    readers = [asyncio.create_task(tail(k)) for k in range(tails)]
    try:
        await asyncio.sleep(1.5)  # every tail blocked in Redis
        async with asyncio.timeout(30):
            for i in range(3):
                await bus.publish(topic, [OutgoingEvent(key="m1", event_id=f"e{i}", event_type="t", payload=b"x")])
        await until(lambda: min(got) >= 3, 30)
        assert got == [3] * tails
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await client.aclose()


async def test_a_client_waits_for_a_connection_only_as_long_as_it_says(redis_server: RedisServer) -> None:
    """A command finding every connection busy waits `wait` seconds for one, then fails; one
    released within the wait serves it, even past the socket timeout (a queue behind busy
    connections is not a dead peer)."""
    patient = open_redis(redis_server.url, timeout=0.5, connections=1)
    hasty = open_redis(redis_server.url, timeout=0.5, connections=1, wait=0.1)
    try:
        for client in (patient, hasty):
            await client.ping()  # its one connection is open
        held = await hasty.connection_pool.get_connection()
        try:
            with pytest.raises(RedisConnectionError, match="No connection available"):
                await hasty.get("k")
        finally:
            await hasty.connection_pool.release(held)
        held = await patient.connection_pool.get_connection()
        later = asyncio.get_running_loop().call_later(
            1.0, lambda: asyncio.ensure_future(patient.connection_pool.release(held))
        )
        try:
            assert await patient.set("k", "v") and await patient.get("k") == b"v"
        finally:
            later.cancel()
    finally:
        await patient.aclose()
        await hasty.aclose()


async def _connection(pool: Any) -> Any:
    """One of the pool's connections, taken to crowd it: the cache client's connect timeout is
    short, and opening 64 on a loaded machine may see one time out, which is not the test's."""
    for _ in range(4):
        try:
            return await pool.get_connection()
        except RedisTimeoutError:
            continue
    return await pool.get_connection()


async def test_a_crowded_cache_client_costs_no_kept_observation(tmp_path: Path, redis_server: RedisServer) -> None:
    """Every connection of the ledger's cache client busy: a balance read does not wait for one
    but answers from the store, and a purchase screened while fraud_svc is away is still kept,
    since the backlog has a client of its own."""
    ledger = await start_ledger(tmp_path, redis_server.url, fraud_screening=True, fraud_addr=f"127.0.0.1:{free_port()}")
    pool = ledger.app.redis.connection_pool
    held: list[Any] = []
    try:
        created = await ledger.stub.CreateMember(ledger_pb2.CreateMemberRequest(
            idempotency_key=common_pb2.IdempotencyKey(namespace="peak", key=tmp_path.name)))  # fmt: skip
        member = created.member.member_id
        await ledger.stub.Earn(ledger_pb2.EarnRequest(
            idempotency_key=common_pb2.IdempotencyKey(namespace="peak", key=f"earn-{member}"), member_id=member,
            points=120))  # fmt: skip
        # Until the relay has tombstoned the earn, reads skip the cache: the GET must be tried.
        await until(lambda: ledger.app.cache.usable_for(member, "points"), 10)
        for _ in range(POOL_CONNECTIONS):
            held.append(await _connection(pool))
        # Waiting 5 s for a connection, the cache read and its fill took 10 s between them.
        balance = await ledger.stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=member), timeout=4)
        assert balance.balance.balance_points == 120
        screen = ledger.app.service.fraud
        assert screen is not None and isinstance(screen.backlog, ObservationBacklog)
        request = replace(_return(member, 0), event_id=f"purchase:{member}:0", kind=ScreenedKind.PURCHASE,
                          amount=Money(2500, "EUR"))  # fmt: skip
        await screen.screen(request)
        assert len(await kept_for(redis_server.url, screen.backlog, member)) == 1
    finally:
        for conn in held:
            await pool.release(conn)
        await stop_ledger(ledger)
