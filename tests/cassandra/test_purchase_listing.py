"""Cassandra lists purchases from its purchase_days partitions: archived purchases stay listed,
and a keyspace from before those partitions existed gets them filled by `migrate`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from ledger_svc.store.base import ShardTx
from ledger_svc.store.cassandra import CassandraLedgerStore
from ledger_svc.store.cassandra_schema import migrate
from tests.conftest import CassandraSession

KEYSPACE = "pointmesh_listing"
NOON = datetime(2025, 3, 10, 12, tzinfo=UTC)
DAY = (NOON - timedelta(hours=12), NOON + timedelta(hours=12))


@pytest.fixture
def keyspace(cassandra_session: CassandraSession) -> Iterator[str]:
    cassandra_session.reconnected()
    session = cassandra_session.session
    session.execute(f"DROP KEYSPACE IF EXISTS {KEYSPACE}")
    migrate(session, KEYSPACE, "simple:1")
    yield KEYSPACE
    session.execute(f"DROP KEYSPACE IF EXISTS {KEYSPACE}")


def _record(status: str, rows: list[tuple[str, str, str, datetime]]) -> Callable[[ShardTx], None]:
    def unit(tx: ShardTx) -> None:
        for purchase_id, member, store_id, at in rows:
            tx.get_purchase(purchase_id)
            tx.put_purchase(purchase_id, member, status, at, body(purchase_id, store_id), "pos", store_id)

    return unit


def body(purchase_id: str, store_id: str) -> str:
    return f'{{"purchase_id": "{purchase_id}", "channel": "pos", "store_id": "{store_id}"}}'


async def _listed(store: CassandraLedgerStore, shard: int, store_id: str) -> list[str]:
    rows = await store.scan(shard, lambda tx: tx.list_purchases("pos", store_id, *DAY, None, 100))
    return [purchase_id for _, purchase_id, _ in rows]


async def test_archived_purchases_stay_listed_and_migrate_lists_earlier_ones(
    cassandra_session: CassandraSession, keyspace: str
) -> None:
    session = cassandra_session.session
    store = CassandraLedgerStore(session, keyspace, "shop", 2)
    try:
        await store.write(0, _record("EARNED", [("pu_1", "m1", "s1", NOON), ("pu_2", "m2", "s2", NOON)]))
        await store.write(1, _record("EARNED", [("pu_3", "m3", "s1", NOON + timedelta(hours=1))]))
        # Still waiting for rules_svc: never archived, listed from the live partition.
        await store.write(1, _record("PENDING_ACCRUAL", [("pu_4", "m4", "s1", NOON + timedelta(hours=2))]))
        assert await store.archive(NOON + timedelta(days=1)) == 3
        assert await _listed(store, 0, "s1") == ["pu_1"]
        assert await _listed(store, 0, "") == ["pu_1", "pu_2"]
        assert await _listed(store, 1, "s1") == ["pu_3", "pu_4"]
        before = await store.scan(0, lambda tx: tx.list_purchases("pos", "", *DAY, None, 100))

        # The keyspace as an earlier release left it: no listing rows, migration 3 not applied.
        session.execute(f"TRUNCATE {keyspace}.purchase_days")
        session.execute(f"DELETE FROM {keyspace}.schema_migrations WHERE version = 3")
        assert await _listed(store, 0, "") == []
        assert migrate(session, keyspace, "simple:1") == [3]
        assert await store.scan(0, lambda tx: tx.list_purchases("pos", "", *DAY, None, 100)) == before
        assert await _listed(store, 1, "s1") == ["pu_3", "pu_4"]
        assert await _listed(store, 1, "s2") == []
        assert migrate(session, keyspace, "simple:1") == []
    finally:
        await store.close()
