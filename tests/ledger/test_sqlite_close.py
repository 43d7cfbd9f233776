"""Closing a SQLite store answers every caller: a long read still running is interrupted, work
queued behind it fails with StoreClosed instead of waiting forever, and new work is refused."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ledger_svc.store.base import ShardTx, StoreClosed
from ledger_svc.store.sqlite import SqliteLedgerStore

ENDLESS = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"


async def test_closing_interrupts_a_running_scan_and_fails_the_queued_ones(tmp_path: Path) -> None:
    store = SqliteLedgerStore(tmp_path, 1)
    started = threading.Event()

    def endless(tx: object) -> object:
        started.set()
        time.sleep(1)  # between statements when close comes: an interrupt alone would miss it
        return tx.c.execute(ENDLESS).fetchone()  # type: ignore[attr-defined]

    running = asyncio.ensure_future(store.scan(0, endless))
    queued = asyncio.ensure_future(store.scan(0, lambda tx: tx.outbox_backlog()))
    await asyncio.to_thread(started.wait, 10)
    await store.close()

    with pytest.raises(StoreClosed) as stopped:
        await asyncio.wait_for(running, 10)
    assert isinstance(stopped.value.__cause__, sqlite3.OperationalError)
    assert "interrupted" in str(stopped.value.__cause__)
    with pytest.raises(StoreClosed):
        await asyncio.wait_for(queued, 10)
    with pytest.raises(StoreClosed):
        await asyncio.wait_for(store.scan(0, lambda tx: tx.outbox_backlog()), 10)
    with pytest.raises(StoreClosed):
        await asyncio.wait_for(store.read(0, lambda tx: tx.outbox_backlog()), 10)


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_writes_queued_before_close_still_commit(tmp_path: Path, synchronous: str) -> None:
    """Shutdown must not drop a posting a caller already handed over. FULL runs writes on a
    thread, which is kept busy so the five are surely queued; NORMAL on the event loop, where
    they wait for the next loop iteration."""
    store = SqliteLedgerStore(tmp_path, 1, synchronous)
    busy = threading.Event()

    def slow(tx: ShardTx) -> None:
        busy.set()
        time.sleep(0.3)

    first = asyncio.ensure_future(store.write(0, slow))
    if synchronous == "FULL":
        await asyncio.to_thread(busy.wait, 10)
    writes = [
        asyncio.ensure_future(store.write(0, lambda tx, i=i: tx.add_outbox(f"ev_{i}", "m1", "{}", datetime.now(UTC))))
        for i in range(5)
    ]
    await asyncio.sleep(0)  # handed over, not yet run
    await store.close()
    assert await asyncio.wait_for(asyncio.gather(first, *writes), 10) == [None] * 6
    reopened = SqliteLedgerStore(tmp_path, 1, synchronous)
    try:
        assert await reopened.read(0, lambda tx: tx.outbox_backlog()) == 5
    finally:
        await reopened.close()
