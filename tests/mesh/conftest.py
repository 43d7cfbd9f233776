"""The mesh under test: rules_svc and ledger_svc as real gRPC servers on loopback, sharing a
test clock, the ledger calling rules_svc for every purchase."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pointmesh.clock import ManualClock, SystemClock
from pointmesh.redis_server import RedisServer, free_port
from tests.conftest import (
    LedgerUnderTest,
    RulesUnderTest,
    start_ledger,
    start_rules,
    stop_ledger,
    stop_rules,
    store_settings,
)

PROGRAM = Path(__file__).with_name("program.yaml")
LOADGEN = Path(__file__).resolve().parents[2] / "loadtests" / "programs" / "loadgen.yaml"
# A Monday in winter: Helsinki is UTC+2, Lisbon UTC+0.
START = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)


@dataclass
class Mesh:
    rules: RulesUnderTest
    ledger: LedgerUnderTest
    clock: ManualClock
    rules_port: int
    data_dir: Path

    async def stop_rules(self) -> None:
        await stop_rules(self.rules)

    async def restart_rules(self) -> None:
        self.rules = await start_rules(self.data_dir / "rules", self.clock, rules_addr=f"127.0.0.1:{self.rules_port}")


@pytest.fixture(params=["sqlite", "cassandra"])
async def mesh(request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Mesh]:
    """Purchases, returns and outages are store behaviour too: each test runs on both stores."""
    async with running_mesh(tmp_path, redis_server, PROGRAM, **store_settings(request, request.param)) as running:
        yield running


@contextlib.asynccontextmanager
async def running_mesh(tmp_path: Path, redis_server: RedisServer, seed: Path, **settings: Any) -> AsyncIterator[Mesh]:
    """A mesh whose rules_svc starts on the program document `seed` (meshmart) at START."""
    clock = ManualClock(START)
    port = free_port()
    rules = await start_rules(tmp_path / "rules", clock, rules_addr=f"127.0.0.1:{port}", rules_seed_file=str(seed))
    ledger = await start_ledger(
        tmp_path / "ledger", redis_server.url, clock, rules_addr=f"127.0.0.1:{port}", program="meshmart",
        rules_deadline_seconds=2.0, **settings,
    )  # fmt: skip
    running = Mesh(rules, ledger, clock, port, tmp_path)
    try:
        yield running
    finally:
        await stop_ledger(running.ledger)
        if running.rules.app.server.port:
            await stop_rules(running.rules)


@pytest.fixture
async def plain_mesh(
    tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[tuple[LedgerUnderTest, RulesUnderTest]]:
    port = free_port()
    clock = SystemClock()  # receipts are stamped from the wall clock, over the last day
    rules = await start_rules(tmp_path / "rules", clock, rules_addr=f"127.0.0.1:{port}", rules_seed_file=str(LOADGEN))
    ledger = await start_ledger(tmp_path / "ledger", redis_server.url, clock, rules_addr=f"127.0.0.1:{port}",
                                program="loadgen", rules_deadline_seconds=5.0)  # fmt: skip
    yield ledger, rules
    await stop_ledger(ledger)
    await stop_rules(rules)
