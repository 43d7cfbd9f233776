"""Races between ledger processes that only the conditional batches can settle: two store
instances on one ledger (separate processes' worth of in-process locks and caches)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from datetime import UTC, datetime

from ledger_svc.domain import TxKind
from ledger_svc.store.base import AccountRow, TxRecord
from ledger_svc.store.cassandra import CassandraShardTx
from tests.conftest import CassandraSession

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ACCOUNT = "member:m1:points"


def _credit_once(tx: CassandraShardTx, tx_id: str) -> bool:
    """The saga-step pattern: post a deterministic transaction unless it exists already."""
    if tx.get_transaction(tx_id) is not None:
        return False
    row = tx.get_accounts([ACCOUNT])[0]
    tx.put_account(AccountRow(ACCOUNT, row.balance + 10, 0, row.lifetime_earned + 10, row.version + 1))
    tx.add_transaction(TxRecord(tx_id, TxKind.TRANSFER_IN, "m1", "points", 10, T0, T0))
    return True


async def test_an_object_found_absent_outside_the_version_check_is_still_created_once(
    cassandra_session: CassandraSession,
) -> None:
    ledger = "r" + uuid.uuid4().hex[:12]
    first, second = cassandra_session.open_store(ledger, 4), cassandra_session.open_store(ledger, 4)
    looked, other_done = threading.Event(), threading.Event()
    attempts = []

    def slow(tx: CassandraShardTx) -> bool:
        attempts.append(1)
        if tx.get_transaction("tx_in") is not None:
            return False
        if len(attempts) == 1:
            looked.set()  # the other process creates it now, after this unit saw it absent
            assert other_done.wait(20)
        row = tx.get_accounts([ACCOUNT])[0]  # first touch of the partition: its version is new
        tx.put_account(AccountRow(ACCOUNT, row.balance + 10, 0, row.lifetime_earned + 10, row.version + 1))
        tx.add_transaction(TxRecord("tx_in", TxKind.TRANSFER_IN, "m1", "points", 10, T0, T0))
        return True

    try:
        slow_run = asyncio.ensure_future(first.write(0, slow))
        await asyncio.to_thread(looked.wait, 20)
        assert await second.write(0, lambda tx: _credit_once(tx, "tx_in")) is True
        other_done.set()
        assert await slow_run is False  # ran again and found it
        assert len(attempts) == 2
        balance = await second.read(0, lambda tx: tx.get_accounts([ACCOUNT])[0].balance)
        assert balance == 10
    finally:
        await first.close()
        await second.close()
