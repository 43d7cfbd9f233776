"""Retention of directory claims at volume: each page reads a day's index on from where the
last one stopped, also after a failed pass (never through the tombstones of the rows it
already deleted), with a bounded number of deletes in flight; and in ledger_svc a failing retention pass neither stops
archiving nor runs again every maintenance interval."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cassandra import OperationTimedOut

from ledger_svc.domain import Unavailable
from ledger_svc.store import cassandra as cassandra_store
from ledger_svc.store.cassandra import CLAIM_PURGE_IN_FLIGHT
from ledger_svc.store.cassandra_schema import DAY_US
from tests.cassandra.faults import WatchedSession
from tests.conftest import CassandraSession

DAY0 = datetime(2026, 3, 1, tzinfo=UTC)
PER_DAY = 300
PAGE = 100


async def test_claims_purge_reads_on_from_its_watermark_with_bounded_writes_in_flight(
    cassandra_session: CassandraSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = cassandra_session.open_store("p" + uuid.uuid4().hex[:12], 1)
    ks, ledger = store.keyspace, store.ledger
    put = store.session.prepare(
        f"INSERT INTO {ks}.claims (ledger, namespace, key, operation, fingerprint, result, created_us)"
        " VALUES (?,?,?,'Earn','fp','',?)"
    )
    keys: list[tuple[str, int]] = []
    calls: list[tuple[str, tuple[Any, ...]]] = []
    for day in range(2):
        first_us = int(DAY0.timestamp() * 1e6) + day * DAY_US
        calls.append(("claim_days_list_put", (ledger, first_us // DAY_US)))
        for n in range(PER_DAY):
            at = first_us + (n // 3) * 1000  # three claims a millisecond: a page ends inside a tie
            keys.append((f"k{day}-{n}", at))
            calls.append(("claim_day_put", (ledger, first_us // DAY_US, at, "", f"k{day}-{n}")))
    for at in range(0, len(calls), 100):
        store.run_many(calls[at : at + 100])
    for at in range(0, len(keys), 100):
        futures = [store.session.execute_async(put, (ledger, "", k, us)) for k, us in keys[at : at + 100]]
        for f in futures:
            f.result()
    monkeypatch.setattr(cassandra_store, "CLAIM_PURGE_PAGE", PAGE)
    watched = WatchedSession.on(store)
    reads = 0

    def fourth_read_times_out(name: str, _params: tuple[Any, ...]) -> Exception | None:
        nonlocal reads
        reads += name == "claim_day_rows"
        return OperationTimedOut("claim_days read timed out") if name == "claim_day_rows" and reads == 4 else None

    watched.fault = fourth_read_times_out
    cut = DAY0 + timedelta(days=2, hours=1)
    try:
        with pytest.raises(Unavailable):
            await store.write_directory(lambda d: d.purge_claims_before(cut))
        purged = await store.write_directory(lambda d: d.purge_claims_before(cut))
        assert 0 < purged < 2 * PER_DAY  # the rest: the failed pass had deleted three pages
        assert await store.write_directory(lambda d: d.purge_claims_before(cut)) == 0
        assert watched.most_in_flight <= CLAIM_PURGE_IN_FLIGHT
        # Every read of a day after its first starts just after the last claim deleted there.
        deleted: dict[int, tuple[Any, ...]] = {}
        for name, params in watched.sent:
            if name == "claim_day_del":
                deleted[params[1]] = params[2:5]
            elif name == "claim_day_rows":
                day, start = params[1], params[2:5]
                assert start == deleted.get(day, (-1, "", "")), f"day {day} read again from {start}"
        left = store.run_many([("claim_get", (ledger, "", k)) for k, _ in keys])
        assert all(row is None for row in left)
        assert list(store.q("claim_days_list", (ledger,))) == []
    finally:
        await store.close()
