"""API keys in Redis while that Redis is down or paused: a key the gateway read within
STALE_GRACE_SECONDS is still accepted from its cache, a key it did not is a 503 as before, a
key it holds as revoked stays refused, and a Redis that does not answer holds at most one
request per RETRY_AFTER_FAILURE_SECONDS for its timeout. A real redis-server each test; the
key store's clock is moved by hand, the Redis timeouts are real."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import pytest
from fastapi import FastAPI
from websockets.asyncio.client import connect

from gateway.keys import (
    CACHE_SECONDS,
    RETRY_AFTER_FAILURE_SECONDS,
    STALE_GRACE_SECONDS,
    STALE_WARNING_SECONDS,
    ApiKey,
    KeyStore,
    KeyStoreUnavailable,
    RedisKeyRecords,
)
from pointmesh.redis_server import RedisServer
from tests.gateway.conftest import GatewayUnderTest, start_gateway
from tests.gateway.test_api import problem
from tests.gateway.test_key_store_outage import assert_key_store_unavailable
from tests.mesh.conftest import Mesh

REDIS_TIMEOUT_SECONDS = 0.5
MEMBER = "m_0123456789abcdef0123456789ab"


class Seconds:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Seconds:
    return Seconds()


@pytest.fixture
async def keys(keys_redis: RedisServer, clock: Seconds) -> AsyncIterator[KeyStore]:
    """The key store a gateway serves from, as gateway.app.key_store builds it, on a manual clock."""
    own = KeyStore(RedisKeyRecords(keys_redis.url, timeout_seconds=REDIS_TIMEOUT_SECONDS), clock=clock)
    yield own
    await own.aclose()


def new_key(store: KeyStore) -> str:
    return store.create("pos", ["members:read"], ["HEL-01"], "Helsinki tills")[0]


async def timed(call: Awaitable[ApiKey | None]) -> tuple[ApiKey | None, float]:
    started = time.perf_counter()
    found = await call
    return found, time.perf_counter() - started


async def test_a_key_read_within_the_grace_is_accepted_while_redis_is_down_and_not_after(
    keys: KeyStore, keys_redis: RedisServer, clock: Seconds
) -> None:
    key = new_key(keys)
    assert await keys.verify_async(key) is not None
    keys_redis.stop()
    clock.advance(CACHE_SECONDS + 1)
    assert await keys.verify_async(key) is not None
    clock.advance(STALE_GRACE_SECONDS - CACHE_SECONDS - 2)
    assert await keys.verify_async(key) is not None
    clock.advance(2)  # the key was read STALE_GRACE_SECONDS + 1 ago
    with pytest.raises(KeyStoreUnavailable):
        await keys.verify_async(key)


async def test_a_key_never_read_is_unavailable_while_redis_is_down(
    keys: KeyStore, keys_redis: RedisServer, clock: Seconds
) -> None:
    known, never_read = new_key(keys), new_key(keys)
    assert await keys.verify_async(known) is not None
    keys_redis.stop()
    clock.advance(CACHE_SECONDS + 1)
    assert await keys.verify_async(known) is not None
    with pytest.raises(KeyStoreUnavailable):
        await keys.verify_async(never_read)
    clock.advance(RETRY_AFTER_FAILURE_SECONDS)  # asked again: still down
    with pytest.raises(KeyStoreUnavailable):
        await keys.verify_async(never_read)


async def test_a_wrong_secret_for_a_key_read_recently_is_refused_while_redis_is_down(
    keys: KeyStore, keys_redis: RedisServer, clock: Seconds
) -> None:
    key = new_key(keys)
    assert await keys.verify_async(key) is not None
    keys_redis.stop()
    clock.advance(CACHE_SECONDS + 1)
    assert await keys.verify_async(key[:-4] + "AAAA") is None
    assert await keys.verify_async(key) is not None


async def test_a_key_the_cache_holds_as_revoked_stays_refused_while_redis_is_down(
    keys: KeyStore, keys_redis: RedisServer, clock: Seconds
) -> None:
    key = new_key(keys)
    assert await keys.verify_async(key) is not None
    other_pod = KeyStore(RedisKeyRecords(keys_redis.url))
    other_pod.revoke(key.split("_")[1])
    other_pod.close()
    clock.advance(CACHE_SECONDS + 1)
    assert await keys.verify_async(key) is None  # read again: revoked
    keys_redis.stop()
    clock.advance(CACHE_SECONDS + 1)
    assert await keys.verify_async(key) is None


async def test_a_revocation_takes_effect_once_redis_answers_again(
    keys: KeyStore, keys_redis: RedisServer, clock: Seconds
) -> None:
    key = new_key(keys)
    assert await keys.verify_async(key) is not None
    keys_redis.stop()
    clock.advance(CACHE_SECONDS + 1)
    assert await keys.verify_async(key) is not None  # from the stale cache
    keys_redis.start()  # the same port and data: the key is still there
    other_pod = KeyStore(RedisKeyRecords(keys_redis.url))
    other_pod.revoke(key.split("_")[1])
    other_pod.close()
    clock.advance(RETRY_AFTER_FAILURE_SECONDS)
    assert await keys.verify_async(key) is None


async def test_a_paused_redis_holds_one_request_per_retry_interval_not_every_request(
    keys: KeyStore, keys_redis: RedisServer, clock: Seconds
) -> None:
    key, never_read = new_key(keys), new_key(keys)
    assert await keys.verify_async(key) is not None
    keys_redis.pause()
    clock.advance(CACHE_SECONDS + 1)
    found, first_seconds = await timed(keys.verify_async(key))
    assert found is not None and first_seconds >= REDIS_TIMEOUT_SECONDS * 0.9  # it asked Redis, and waited
    for _ in range(20):
        found, seconds = await timed(keys.verify_async(key))
        assert found is not None and seconds < REDIS_TIMEOUT_SECONDS / 5
    started = time.perf_counter()
    with pytest.raises(KeyStoreUnavailable):
        await keys.verify_async(never_read)
    assert time.perf_counter() - started < REDIS_TIMEOUT_SECONDS / 5
    clock.advance(RETRY_AFTER_FAILURE_SECONDS)
    probe = asyncio.create_task(timed(keys.verify_async(key)))
    await asyncio.sleep(0.05)  # the probe waits on the paused Redis now
    found, seconds = await timed(keys.verify_async(key))
    assert found is not None and seconds < REDIS_TIMEOUT_SECONDS / 5
    found, probe_seconds = await probe
    assert found is not None and probe_seconds >= REDIS_TIMEOUT_SECONDS * 0.9


async def test_keys_served_from_the_stale_cache_warn_once_per_interval_not_per_request(
    keys: KeyStore, keys_redis: RedisServer, clock: Seconds, caplog: pytest.LogCaptureFixture
) -> None:
    key = new_key(keys)
    assert await keys.verify_async(key) is not None
    keys_redis.stop()
    clock.advance(CACHE_SECONDS + 1)
    caplog.set_level(logging.WARNING, logger="gateway.keys")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "gateway.keys" and r.levelno == logging.WARNING]

    for _ in range(50):
        assert await keys.verify_async(key) is not None
    assert len(warnings()) == 1 and "cannot be read" in warnings()[0]
    clock.advance(STALE_WARNING_SECONDS)
    for _ in range(50):
        assert await keys.verify_async(key) is not None
    assert len(warnings()) == 2
    keys_redis.start()
    clock.advance(RETRY_AFTER_FAILURE_SECONDS)
    assert await keys.verify_async(key) is not None
    assert len(warnings()) == 3 and "can be read again" in warnings()[2]


@pytest.fixture
async def gw_on_clock(
    tmp_path: Path, mesh: Mesh, keys_redis: RedisServer, clock: Seconds
) -> AsyncIterator[GatewayUnderTest]:
    running = await start_gateway(
        tmp_path / "gw", mesh, keys_redis.url, gateway_key_store="redis", redis_timeout_seconds=REDIS_TIMEOUT_SECONDS
    )
    app = running.uvicorn.config.app
    assert isinstance(app, FastAPI)
    state = app.state.gateway
    served = state.keys
    # The store gateway.app.key_store builds, on the manual clock; the app closes it at shutdown.
    state.keys = KeyStore(RedisKeyRecords(keys_redis.url, timeout_seconds=REDIS_TIMEOUT_SECONDS), clock=clock)
    await served.aclose()
    yield running
    running.uvicorn.should_exit = True
    await running.task


async def test_a_gateway_keeps_answering_keys_it_read_recently_while_redis_is_down(
    gw_on_clock: GatewayUnderTest, keys_redis: RedisServer, clock: Seconds
) -> None:
    gw = gw_on_clock
    async with gw.client("reader") as reader:
        assert problem(await reader.get(f"/v1/members/{MEMBER}"), 404)
    async with connect(f"{gw.ws_url}/v1/ops/alerts?token={gw.keys['ops']}") as ws:
        assert "subscribed" in str(await asyncio.wait_for(ws.recv(), 5))
    keys_redis.stop()
    clock.advance(CACHE_SECONDS + 1)
    async with gw.client("reader") as reader, gw.client("web") as never_read:
        assert problem(await reader.get(f"/v1/members/{MEMBER}"), 404)  # not a 503
        assert_key_store_unavailable(await never_read.get(f"/v1/members/{MEMBER}"))
    async with connect(f"{gw.ws_url}/v1/ops/alerts?token={gw.keys['ops']}") as ws:
        assert "subscribed" in str(await asyncio.wait_for(ws.recv(), 5))
    clock.advance(STALE_GRACE_SECONDS)
    async with gw.client("reader") as reader:
        assert_key_store_unavailable(await reader.get(f"/v1/members/{MEMBER}"))
