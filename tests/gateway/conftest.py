"""The whole mesh for gateway tests: redis-server, rules_svc, ledger_svc and the gateway served
by uvicorn on a real loopback port, with API keys for each kind of caller."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn

from gateway.app import create_app, key_store, server
from pointmesh.config import Settings, load_settings
from pointmesh.redis_server import RedisServer, free_port
from tests.mesh.conftest import Mesh, mesh  # noqa: F401  (the fixture, reused here)

ALL_POS = ["purchases:write", "members:read", "members:write", "redemptions:write", "transfers:write", "program:read"]
KEYS: dict[str, tuple[str, list[str], list[str]]] = {
    # name: (channel, scopes, stores)
    "pos": ("pos", ALL_POS, ["HEL-01"]),
    "pos_lisbon": ("pos", ALL_POS, ["LIS-01"]),
    "web": ("web", ["purchases:write", "members:read", "members:write"], []),
    "reader": ("call_centre", ["members:read"], []),
    "ops": ("ops", ["ops:read"], []),
    "fraud_desk": ("ops", ["ops:read", "ops:write"], []),
    "franchise": ("pos", ["legacy:write", "members:read"], ["HEL-01"]),
}


@dataclass
class GatewayUnderTest:
    mesh: Mesh
    settings: Settings
    url: str
    uvicorn: uvicorn.Server
    task: asyncio.Task[None]
    keys: dict[str, str] = field(default_factory=dict)

    def client(self, key: str | None = None, token: str | None = None) -> httpx.AsyncClient:
        credential = token or (self.keys[key] if key else None)
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=10.0)

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://")


def gateway_settings(tmp: Path, services: Mesh, redis_url: str, port: int, **overrides: object) -> Settings:
    return load_settings(
        {}, data_dir=tmp, redis_url=redis_url, ledger_addr=services.ledger.address,
        rules_addr=f"127.0.0.1:{services.rules_port}", gateway_addr=f"127.0.0.1:{port}", program="meshmart",
        grace_seconds=1.0, **overrides,
    )  # fmt: skip


async def start_gateway(tmp: Path, services: Mesh, redis_url: str, **overrides: object) -> GatewayUnderTest:
    port = free_port()
    settings = gateway_settings(tmp, services, redis_url, port, **overrides)
    store = key_store(settings)
    keys = {name: store.create(channel, scopes, stores, name)[0] for name, (channel, scopes, stores) in KEYS.items()}
    store.close()
    srv = server(settings, create_app(settings, clock=services.clock))
    task = asyncio.create_task(srv.serve())
    for _ in range(200):
        if srv.started:
            break
        await asyncio.sleep(0.02)
    return GatewayUnderTest(services, settings, f"http://127.0.0.1:{port}", srv, task, keys)


@pytest.fixture
async def gw(tmp_path: Path, mesh: Mesh, redis_server: RedisServer) -> AsyncIterator[GatewayUnderTest]:  # noqa: F811
    running = await start_gateway(tmp_path / "gateway", mesh, redis_server.url)
    yield running
    running.uvicorn.should_exit = True
    await running.task


@pytest.fixture
async def keys_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server of the API keys' own, which a test may stop or pause (SIGSTOP)."""
    own = RedisServer(free_port(), tmp_path / "keys-redis")
    own.start()
    yield own
    own.stop()  # continues it first if a test left it paused
