"""The relay's queue and the 'due' index on Cassandra: every event goes out once even when two
share a sequence, a pointer to an event that never committed holds back only its member (and
never empties a page), a unit that lost its condition takes its pointers back, and a finished
saga does not keep its member in the 'due' index."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import uuid
import zlib
from datetime import UTC, datetime

import pytest

from ledger_svc.domain import SagaState
from ledger_svc.outbox import BATCH, _mark
from ledger_svc.store import cassandra as cassandra_store
from ledger_svc.store.base import SagaRecord
from ledger_svc.store.cassandra import SEQ_TAGS, CassandraLedgerStore, CassandraShardTx, _bucket
from tests.conftest import CassandraSession

NOW = datetime.now(UTC)


def _colliding_members() -> tuple[str, str]:
    """Two member ids whose partitions get the same sequence tag."""
    seen: dict[int, str] = {}
    for n in range(100_000):
        member = f"m{n}"
        tag = zlib.crc32(f"0/{member}".encode()) % SEQ_TAGS
        if tag in seen:
            return seen[tag], member
        seen[tag] = member
    raise AssertionError("no collision found")


class _FrozenTime:
    """The store module's clock with time_ns held still (sequences are microseconds)."""

    def __init__(self, ns: int) -> None:
        self.ns = ns

    def time_ns(self) -> int:
        return self.ns

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def _event(event_id: str, member: str, tx: CassandraShardTx) -> None:
    tx.add_outbox(event_id, member, "{}", NOW)


async def _relay_pass(store: CassandraLedgerStore, published: list[str], batch: int = BATCH) -> None:
    """What ledger_svc/outbox.py's relay_once does for shard 0, publishing into a list."""
    while True:
        rows = await store.read(0, lambda tx: tx.unrelayed_outbox(batch))
        if not rows:
            return
        published += [r.event_id for r in rows]
        await store.write(0, functools.partial(_mark, [r.seq for r in rows], datetime.now(UTC)))
        if len(rows) < batch:
            return


async def test_two_events_sharing_a_sequence_are_each_published_once(
    cassandra_session: CassandraSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = cassandra_session.open_store("q" + uuid.uuid4().hex[:12], 1)
    first, second = _colliding_members()
    try:
        with monkeypatch.context() as frozen:
            frozen.setattr(cassandra_store, "time", _FrozenTime(time.time_ns()))
            await store.write(0, functools.partial(_event, "ev_a", first))
            await store.write(0, functools.partial(_event, "ev_b", second))
        rows = await store.read(0, lambda tx: tx.unrelayed_outbox(10))
        assert len({r.seq for r in rows}) == 1 and len(rows) == 2  # the collision this test is about
        published: list[str] = []
        for _ in range(3):
            await _relay_pass(store, published)
        assert sorted(published) == ["ev_a", "ev_b"]
        assert await store.read(0, lambda tx: tx.outbox_backlog()) == 0
    finally:
        await store.close()


async def test_a_pointer_to_an_uncommitted_event_never_empties_a_page(cassandra_session: CassandraSession) -> None:
    store = cassandra_session.open_store("q" + uuid.uuid4().hex[:12], 1)
    try:
        # A unit of m1's wrote its pointer and never committed (it crashed, or lost a race).
        now_us = time.time_ns() // 1000
        at = (now_us - 1_000) * SEQ_TAGS
        bucket = _bucket("outbox", at)
        store.session.execute(
            f"INSERT INTO {store.keyspace}.queue (ledger, shard, kind, bucket, at, p, id, w)"
            " VALUES (%s, 0, 'outbox', %s, %s, '0/m1', %s, %s)",
            (store.ledger, bucket, at, f"{at:020d}", now_us),
        )
        store.q("buckets_put", (store.ledger, 0, "outbox", bucket, now_us))
        for n in range(3):
            await store.write(0, functools.partial(_event, f"ev_m1_{n}", "m1"))
        await store.write(0, functools.partial(_event, "ev_m2", "m2"))
        page = await store.read(0, lambda tx: tx.unrelayed_outbox(2))
        assert [r.event_id for r in page] == ["ev_m2"]  # m1's wait; m2's goes out
        published: list[str] = []
        await _relay_pass(store, published, batch=2)
        assert published == ["ev_m2"]
    finally:
        await store.close()


async def test_a_unit_that_lost_its_condition_takes_its_event_pointers_back(
    cassandra_session: CassandraSession,
) -> None:
    ledger = "q" + uuid.uuid4().hex[:12]
    first, second = cassandra_session.open_store(ledger, 1), cassandra_session.open_store(ledger, 1)
    looked, other_done = threading.Event(), threading.Event()
    attempts: list[int] = []

    def slow(tx: CassandraShardTx) -> None:
        attempts.append(1)
        tx.get_member_state("m1")  # the partition's version is read now
        if len(attempts) == 1:
            looked.set()  # another process posts for m1 now: this attempt loses its condition
            assert other_done.wait(20)
        tx.add_outbox(f"ev_slow_{len(attempts)}", "m1", "{}", NOW)

    try:
        slow_run = asyncio.ensure_future(first.write(0, slow))
        await asyncio.to_thread(looked.wait, 20)
        await second.write(0, functools.partial(_event, "ev_other", "m1"))
        other_done.set()
        await slow_run
        assert len(attempts) == 2
        # Every pointer left points at an event that committed: none holds m1 back.
        pointers = first.queue_due(0, "outbox", 2**62, 100)
        found = first.run_many([("row", (ledger, p.p, "outbox", p.id)) for p in pointers])
        assert len(pointers) == 2 and all(row is not None for row in found)
        published: list[str] = []
        await _relay_pass(first, published)
        assert published == ["ev_other", "ev_slow_2"]
    finally:
        await first.close()
        await second.close()


def _saga(saga_id: str, member: str, state: SagaState) -> SagaRecord:
    return SagaRecord(saga_id, "transfer", state, member, "m_dest", "points", 10, "", "{}", NOW, NOW)


async def test_a_member_whose_sagas_are_done_leaves_the_due_index(
    cassandra_session: CassandraSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cassandra_store, "INDEX_GRACE_US", 0)  # pointers of any age may go
    store = cassandra_session.open_store("q" + uuid.uuid4().hex[:12], 1)
    try:
        await store.write(0, lambda tx: tx.add_saga(_saga("s_done", "m1", SagaState.HELD)))
        await store.write(0, lambda tx: tx.add_saga(_saga("s_open", "m2", SagaState.HELD)))
        await store.write(0, lambda tx: tx.set_saga_state("s_done", SagaState.DONE, NOW))
        assert [p for p, _ in store.partitions(0, "due")] == ["0/m1", "0/m2"]
        for _ in range(2):  # a maintenance pass, then the next one
            sagas = await store.read(0, lambda tx: tx.open_sagas())
            assert [s.saga_id for s in sagas] == ["s_open"]
        assert [p for p, _ in store.partitions(0, "due")] == ["0/m2"]
        assert (await store.read(0, lambda tx: tx.get_saga("s_done"))).state == SagaState.DONE
    finally:
        await store.close()
