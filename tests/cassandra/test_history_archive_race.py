"""A member's statement while an archive pass loses its write to a posting (another replica's)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from ledger_svc.store.cassandra import CassandraLedgerStore
from pointmesh.clock import ManualClock
from pointmesh.redis_server import RedisServer
from tests.cassandra.faults import WatchedSession
from tests.cassandra.test_history import entries_of
from tests.conftest import LedgerUnderTest, start_ledger, stop_ledger, store_settings
from tests.ledger.helpers import create_member, earn


@pytest.fixture
async def replicas(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[tuple[LedgerUnderTest, LedgerUnderTest]]:
    """Two replicas of one Cassandra ledger (same rows), on one clock."""
    settings = store_settings(request, "cassandra")
    clock = ManualClock()
    one = await start_ledger(tmp_path / "a", redis_server.url, clock, expiry_days=0, **settings)
    two = await start_ledger(tmp_path / "b", redis_server.url, clock, expiry_days=0, **settings)
    yield one, two
    await stop_ledger(two)
    await stop_ledger(one)


async def _statement(ledger: LedgerUnderTest, member: str) -> list[tuple[int, str, int]]:
    return [(e.entry_id, e.transaction_id, e.points) for e in await entries_of(ledger, member, 50)]


async def test_an_archive_pass_that_loses_to_a_posting_shows_no_entry_twice(
    replicas: tuple[LedgerUnderTest, LedgerUnderTest],
) -> None:
    one, two = replicas
    store = one.app.store
    assert isinstance(store, CassandraLedgerStore)
    member = (await create_member(one.stub)).member_id
    await earn(one.stub, member, 10)
    one.clock.advance(timedelta(days=2))
    await earn(one.stub, member, 20)
    one.clock.advance(timedelta(days=2))
    await earn(one.stub, member, 30)
    one.clock.advance(timedelta(days=400))

    # The first pass moves January's oldest rows: January is now one of the member's months.
    assert await store.archive(one.clock.now() - timedelta(days=403)) > 0
    before = await _statement(one, member)
    assert [p for _, _, p in before] == [30, 20, 10]

    # The next pass copies more January rows to history; meanwhile another replica serves a
    # posting for the member, so the pass's delete of the live rows loses ("the rows move on
    # the next pass", ledger_svc/store/cassandra.py `_archive_partition`).
    loop = asyncio.get_running_loop()
    watched = WatchedSession.on(store)
    posted: list[Any] = []

    def interleave(name: str, _args: tuple[Any, ...]) -> None:
        if name == "hist_put" and not posted:
            posted.append(asyncio.run_coroutine_threadsafe(earn(two.stub, member, 5), loop).result(timeout=20))
        return None

    watched.fault = interleave
    await store.archive(one.clock.now() - timedelta(days=401))
    watched.fault = None
    assert posted, "the pass copied no row"

    after = await _statement(one, member)
    ids = [entry_id for entry_id, _, _ in after]
    assert len(ids) == len(set(ids)), f"entries shown twice: {after}"
    assert [p for _, _, p in after] == [5, 30, 20, 10]
