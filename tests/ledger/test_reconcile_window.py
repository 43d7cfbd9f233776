"""Reconciliation's lost-event check on SQLite examines only the transactions recorded in the
EVENT_CHECK_WINDOW (24 hours) up to a shard's newest event, so an hourly pass reads a day of
events instead of the whole retention period. The documented trade: an event lost from an
older transaction is not reported."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from ledger_svc.reconcile import reconcile
from ledger_svc.store.sqlite import EVENT_CHECK_CLOCK_SLACK, EVENT_CHECK_WINDOW
from pointmesh.redis_server import RedisServer
from tests.conftest import LedgerUnderTest, start_ledger, stop_ledger
from tests.ledger.helpers import create_member, earn, redeem


@pytest.fixture
async def sqlite_ledger(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[LedgerUnderTest]:
    running = await start_ledger(tmp_path / "data", redis_server.url, store="sqlite")
    yield running
    await stop_ledger(running)


def _shard_db(ledger: LedgerUnderTest, member_id: str) -> sqlite3.Connection:
    path = Path(ledger.app.store.data_dir) / f"ledger-shard-{ledger.app.service.shard_of(member_id):03d}.sqlite"
    return sqlite3.connect(path, isolation_level=None)


def _lose_event(db: sqlite3.Connection, member_id: str, tx_id: str) -> None:
    gone = db.execute(
        "DELETE FROM outbox WHERE json_extract(payload, '$.data.transaction_id')=? AND member_id=?", (tx_id, member_id)
    ).rowcount
    assert gone == 1


async def _differences(ledger: LedgerUnderTest) -> list[str]:
    report = await reconcile(ledger.app.store, ledger.clock.now())
    return [d.describe() for d in report.differences]


async def test_a_transaction_older_than_the_window_is_not_examined(sqlite_ledger: LedgerUnderTest) -> None:
    """A transaction recorded a day and more before the shard's newest event has its event
    lost: not reported (before the bound it was, the check reaching back to the earliest
    idempotency record, i.e. the whole retention period). The same loss inside the window is."""
    ledger = sqlite_ledger
    m = (await create_member(ledger.stub)).member_id
    old = (await earn(ledger.stub, m, 100)).transaction.transaction_id
    ledger.clock.advance(EVENT_CHECK_WINDOW + EVENT_CHECK_CLOCK_SLACK + timedelta(minutes=5))
    recent = (await earn(ledger.stub, m, 40)).transaction.transaction_id
    await redeem(ledger.stub, m, 5)
    db = _shard_db(ledger, m)
    assert await _differences(ledger) == []

    _lose_event(db, m, old)
    assert await _differences(ledger) == []  # beyond the window: not examined

    _lose_event(db, m, recent)
    assert await _differences(ledger) == [
        f"shard {ledger.app.service.shard_of(m)}: transaction without its outbox event (never published) {recent}:"
        " expected 1, found 0"
    ]
