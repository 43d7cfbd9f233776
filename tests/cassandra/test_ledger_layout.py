"""A ledger's first start claims its shard count and, for a new ledger, marks every shard's
reviews as indexed; a start that stops after its first write must not leave a new ledger that
lists reviews by scanning every member for good, nor mark a ledger from before migration 4."""

from __future__ import annotations

import uuid
from typing import Any

from cassandra import OperationTimedOut

from ledger_svc.store.cassandra import CassandraLedgerStore
from tests.conftest import CassandraSession

SHARDS = 3


class StopsAfterFirstWrite:
    """A driver session whose process stops right after its first prepared (or batch) statement
    went out: every later one fails, as the start of a process killed there would."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.stopped = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def _check(self, stmt: Any) -> None:
        if self.stopped:
            raise OperationTimedOut("the process stopped")
        self.stopped = not isinstance(stmt, str)  # plain strings: the schema version reads

    def execute(self, stmt: Any, *args: Any, **kwargs: Any) -> Any:
        self._check(stmt)
        return self._session.execute(stmt, *args, **kwargs)

    def execute_async(self, stmt: Any, *args: Any, **kwargs: Any) -> Any:
        self._check(stmt)
        return self._session.execute_async(stmt, *args, **kwargs)


async def test_a_new_ledger_is_marked_reviews_indexed_even_when_its_first_start_stops_after_one_write(
    cassandra_session: CassandraSession,
) -> None:
    cassandra_session.reconnected()
    ks, ledger = cassandra_session.settings.cassandra_keyspace, "lay" + uuid.uuid4().hex[:12]
    try:
        started = CassandraLedgerStore(StopsAfterFirstWrite(cassandra_session.session), ks, ledger, SHARDS)
    except OperationTimedOut:
        pass  # where the process stopped
    else:
        await started.close()
    store = cassandra_session.open_store(ledger, SHARDS)
    try:
        assert [store.reviews_indexed(shard) for shard in range(SHARDS)] == [True] * SHARDS
    finally:
        await store.close()


async def test_a_ledger_from_before_the_review_index_is_not_marked_by_a_start(
    cassandra_session: CassandraSession,
) -> None:
    """Its reviews are listed by scanning until `pointmesh ledger backfill` has run."""
    ks, ledger = cassandra_session.settings.cassandra_keyspace, "lay" + uuid.uuid4().hex[:12]
    cassandra_session.session.execute(f"INSERT INTO {ks}.meta (ledger, k, v) VALUES (%s, 'shards', %s)",
                                      (ledger, str(SHARDS)))  # fmt: skip
    store = cassandra_session.open_store(ledger, SHARDS)
    try:
        assert [store.reviews_indexed(shard) for shard in range(SHARDS)] == [False] * SHARDS
    finally:
        await store.close()
