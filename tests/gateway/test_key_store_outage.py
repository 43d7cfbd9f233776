"""API keys in Redis (POINTMESH_GATEWAY_KEY_STORE=redis) while that Redis is slow or down: the
gateway keeps serving everything that does not need a key lookup, and a key it cannot look up
is a 503 with Retry-After (neither valid nor invalid), never a 500 or a 401."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from pointmesh.redis_server import RedisServer
from tests.gateway.conftest import GatewayUnderTest, start_gateway
from tests.gateway.test_api import problem
from tests.mesh.conftest import Mesh

REDIS_TIMEOUT_SECONDS = 2.0
MEMBER = "m_0123456789abcdef0123456789ab"


@pytest.fixture
async def gw_on_redis_keys(tmp_path: Path, mesh: Mesh, keys_redis: RedisServer) -> AsyncIterator[GatewayUnderTest]:
    running = await start_gateway(
        tmp_path / "gw", mesh, keys_redis.url, gateway_key_store="redis", redis_timeout_seconds=REDIS_TIMEOUT_SECONDS
    )
    yield running
    running.uvicorn.should_exit = True
    await running.task


def assert_key_store_unavailable(response: httpx.Response) -> None:
    body = problem(response, 503)
    assert response.headers["Retry-After"] == "1"
    assert body["type"].endswith("/service-unavailable")
    assert body["detail"] == "the API key store is unavailable; retry shortly"


async def test_a_paused_key_store_blocks_no_other_request_and_its_lookups_are_503(
    gw_on_redis_keys: GatewayUnderTest, keys_redis: RedisServer
) -> None:
    gw = gw_on_redis_keys
    async with gw.client("web") as web, httpx.AsyncClient(base_url=gw.url, timeout=10.0) as anonymous:

        async def healthz_seconds() -> float:
            started = time.perf_counter()
            assert (await anonymous.get("/healthz")).status_code == 200
            return time.perf_counter() - started

        keys_redis.pause()
        try:
            lookup = asyncio.create_task(web.get(f"/v1/members/{MEMBER}"))
            await asyncio.sleep(0.1)  # the lookup is waiting on the stopped Redis now
            # A blocked event loop would hold /healthz for the lookup's whole timeout.
            assert await healthz_seconds() < REDIS_TIMEOUT_SECONDS / 2
            assert_key_store_unavailable(await lookup)
        finally:
            keys_redis.resume()


async def test_a_key_store_that_is_down_answers_503_for_rest_and_websockets(
    gw_on_redis_keys: GatewayUnderTest, keys_redis: RedisServer
) -> None:
    gw = gw_on_redis_keys
    async with gw.client("reader") as reader:
        assert problem(await reader.get(f"/v1/members/{MEMBER}"), 404)  # the key works while Redis is up
    keys_redis.stop()
    async with gw.client("web") as web:
        assert_key_store_unavailable(await web.get(f"/v1/members/{MEMBER}"))
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{gw.ws_url}/v1/ops/alerts?token={gw.keys['ops']}"):
            pass
    assert refused.value.response.status_code == 503
    assert refused.value.response.headers["Retry-After"] == "1"


async def test_keys_in_sqlite_still_open_rest_and_websockets(gw: GatewayUnderTest) -> None:
    async with gw.client("reader") as reader:
        assert problem(await reader.get(f"/v1/members/{MEMBER}"), 404)
    async with connect(f"{gw.ws_url}/v1/ops/alerts?token={gw.keys['ops']}") as ws:
        assert "subscribed" in str(await asyncio.wait_for(ws.recv(), 5))
