"""Cassandra lists purchases from its purchase_days partitions: archived purchases stay listed,
a pointer whose purchase never committed costs the page nothing, and `backfill` brings a ledger
written by an earlier release up to date (listings, and TTLs on its retention rows)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from ledger_svc.store.base import ShardTx, to_us
from ledger_svc.store.cassandra import CassandraLedgerStore
from ledger_svc.store.cassandra_schema import listing_bucket
from tests.conftest import CassandraSession, pointmesh_cli

NOON = datetime(2025, 3, 10, 12, tzinfo=UTC)
DAY = (NOON - timedelta(hours=12), NOON + timedelta(hours=12))


def body(purchase_id: str, store_id: str) -> str:
    return f'{{"purchase_id": "{purchase_id}", "channel": "pos", "store_id": "{store_id}"}}'


def _record(status: str, rows: list[tuple[str, str, str, datetime]]) -> Callable[[ShardTx], None]:
    def unit(tx: ShardTx) -> None:
        for purchase_id, member, store_id, at in rows:
            tx.get_purchase(purchase_id)
            tx.put_purchase(purchase_id, member, status, at, body(purchase_id, store_id), "pos", store_id)

    return unit


async def _listed(store: CassandraLedgerStore, shard: int, store_id: str, limit: int = 100) -> list[str]:
    rows = await store.scan(shard, lambda tx: tx.list_purchases("pos", store_id, *DAY, None, limit))
    return [purchase_id for _, purchase_id, _ in rows]


async def test_archived_purchases_stay_listed_and_backfill_lists_earlier_ones(
    cassandra_session: CassandraSession,
) -> None:
    store = cassandra_session.open_store("lst" + uuid.uuid4().hex[:12], 2)
    session, ks = store.session, store.keyspace
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

        # A pointer whose purchase never committed (its unit failed after the side tables went
        # in) is skipped, and the page is still full.
        at = to_us(NOON + timedelta(minutes=30))
        store.q("listing_put", (store.ledger, 1, "pos", "s1", listing_bucket("s1", at), at, "pu_0", "1/m9"))
        assert await _listed(store, 1, "s1", limit=2) == ["pu_3", "pu_4"]

        # The ledger as an earlier release left it: no listing rows.
        session.execute(f"DELETE FROM {ks}.purchase_days WHERE ledger=%s AND shard=0 AND channel='pos'"
                        " AND store_id='' AND bucket=%s", (store.ledger, listing_bucket("", to_us(NOON))))  # fmt: skip
        session.execute(f"DELETE FROM {ks}.purchase_days WHERE ledger=%s AND shard=0 AND channel='pos'"
                        " AND store_id='s1' AND bucket=%s", (store.ledger, listing_bucket("s1", to_us(NOON))))  # fmt: skip
        assert await _listed(store, 0, "") == []
        done = [store.backfill(shard) for shard in range(2)]
        assert [d["listed"] for d in done] == [2, 2]
        assert await store.scan(0, lambda tx: tx.list_purchases("pos", "", *DAY, None, 100)) == before
        assert await _listed(store, 0, "s1") == ["pu_1"]
        assert await _listed(store, 1, "s1") == ["pu_3", "pu_4"]
    finally:
        await store.close()


async def test_backfill_gives_earlier_retention_rows_a_ttl_or_deletes_them(cassandra_session: CassandraSession) -> None:
    store = cassandra_session.open_store("bf" + uuid.uuid4().hex[:12], 1)
    now_us = int(time.time() * 1e6)
    old_us, recent_us = now_us - 40 * 86_400_000_000, now_us - 5 * 86_400_000_000
    try:
        # Rows as the earlier release wrote them: no TTL.
        for id_, at in (("old", old_us), ("recent", recent_us)):
            store.q("put", (store.ledger, "0/m1", "idem", id_, json.dumps(["Earn", "fp", "{}", at])))
            store.q("owner_put", (store.ledger, 0, id_, "0/m1"))
            store.q("put", (store.ledger, "0/m1", "sent", f"ev_{id_}", json.dumps(["ev", "{}", at])))
        store.q("members_put", (store.ledger, 0, "0/m1"))

        assert store.backfill(0) == {"listed": 0, "expiring": 2, "deleted": 2, "tiers": 0}
        idem = {r.id: r.ttl for r in store.q("kind_ttl", (store.ledger, "0/m1", "idem"))}
        sent = {r.id: r.ttl for r in store.q("kind_ttl", (store.ledger, "0/m1", "sent"))}
        assert list(idem) == ["recent"] and list(sent) == ["ev_recent"]
        # 35 days of retention, 5 gone: about 30 left.
        assert 29 * 86_400 < idem["recent"] <= 30 * 86_400 and 29 * 86_400 < sent["ev_recent"] <= 30 * 86_400
        assert store.q("owner_get", (store.ledger, 0, "old")).one() is None
        assert store.q("owner_get", (store.ledger, 0, "recent")).one() is not None
        # Run again: nothing left without a TTL.
        assert store.backfill(0) == {"listed": 0, "expiring": 0, "deleted": 0, "tiers": 0}
    finally:
        await store.close()


async def test_the_backfill_command_lists_earlier_purchases(cassandra_session: CassandraSession) -> None:
    ledger = "cli" + uuid.uuid4().hex[:12]
    store = cassandra_session.open_store(ledger, 1)
    try:
        await store.write(0, _record("EARNED", [("pu_1", "m1", "s1", NOON)]))
        for scope in ("s1", ""):  # as an earlier release left it: no listing rows
            store.session.execute(
                f"DELETE FROM {store.keyspace}.purchase_days WHERE ledger=%s AND shard=0 AND channel='pos'"
                " AND store_id=%s AND bucket=%s", (ledger, scope, listing_bucket(scope, to_us(NOON))),
            )  # fmt: skip
        assert await _listed(store, 0, "s1") == []
        env = {
            "POINTMESH_STORE": "cassandra", "POINTMESH_LEDGER_SHARDS": "1", "POINTMESH_CASSANDRA_LEDGER": ledger,
            "POINTMESH_CASSANDRA_CONTACT_POINTS": cassandra_session.settings.cassandra_contact_points,
            "POINTMESH_CASSANDRA_KEYSPACE": cassandra_session.settings.cassandra_keyspace,
        }  # fmt: skip
        done = pointmesh_cli("ledger", "backfill", env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "backfill: shard 0: listed 1, expiring 0, deleted 0, tiers 0" in done.stdout
        assert await _listed(store, 0, "s1") == ["pu_1"]
    finally:
        await store.close()


async def test_a_quiet_channel_month_lists_in_order_across_hundreds_of_empty_buckets(
    cassandra_session: CassandraSession,
) -> None:
    store = cassandra_session.open_store("sparse" + uuid.uuid4().hex[:12], 1)
    month = (NOON - timedelta(days=1), NOON + timedelta(days=30))
    times = {"pu_a": NOON, "pu_b": NOON + timedelta(days=5, hours=1), "pu_c": NOON + timedelta(days=29, hours=11)}
    try:
        await store.write(0, _record("EARNED", [(pid, "m1", "s1", at) for pid, at in times.items()]))

        async def pages(limit: int) -> list[list[str]]:
            out: list[list[str]] = []
            after: tuple[datetime, str] | None = None
            while True:
                rows = await store.scan(0, lambda tx, after=after: tx.list_purchases("pos", "", *month, after, limit))
                out.append([pid for _, pid, _ in rows])
                if len(rows) < limit:
                    return out
                after = rows[-1][:2]

        assert await pages(1) == [["pu_a"], ["pu_b"], ["pu_c"], []]
        assert await pages(2) == [["pu_a", "pu_b"], ["pu_c"]]
        assert await pages(10) == [["pu_a", "pu_b", "pu_c"]]
    finally:
        await store.close()


async def test_a_listing_row_with_no_purchase_does_not_hide_the_rest_of_its_hour(
    cassandra_session: CassandraSession,
) -> None:
    """A listing row goes in before its purchase's conditional batch; one that did not apply
    leaves the row with no purchase. Read as the second of several buckets in one pass, the
    row was skipped, the page came back short, and the purchases after it in its hour were
    never listed: ListPurchases ended there and settlement missed them."""
    store = cassandra_session.open_store("ghost" + uuid.uuid4().hex[:12], 1)
    times = {"pu_a": NOON, "pu_b": NOON + timedelta(hours=1), "pu_c": NOON + timedelta(hours=2, minutes=10),
             "pu_d": NOON + timedelta(hours=2, minutes=20)}  # fmt: skip
    try:
        await store.write(0, _record("EARNED", [(pid, f"m_{pid}", "s1", at) for pid, at in times.items()]))
        at = to_us(NOON + timedelta(hours=2, minutes=5))  # ahead of pu_c in its hour
        store.q("listing_put", (store.ledger, 0, "pos", "", listing_bucket("", at), at, "pu_ghost", "0/m_x"))
        first = await store.scan(0, lambda tx: tx.list_purchases("pos", "", *DAY, None, 3))
        assert [pid for _, pid, _ in first] == ["pu_a", "pu_b", "pu_c"]
        rest = await store.scan(0, lambda tx: tx.list_purchases("pos", "", *DAY, first[-1][:2], 3))
        assert [pid for _, pid, _ in rest] == ["pu_d"]
    finally:
        await store.close()


async def test_backfill_makes_the_tiers_told_before_tiers_were_watched_due(
    cassandra_session: CassandraSession,
) -> None:
    """A member state an earlier release wrote names the tier it told and no due time: the pass
    makes it due now (the maintenance job then looks at it), leaves a merged-away member's and
    one already watched alone, and does nothing the second time."""
    store = cassandra_session.open_store("bt" + uuid.uuid4().hex[:12], 1)
    later = datetime.now(UTC) + timedelta(days=400)
    try:
        for member, state in (
            ("told", {"tier": "gold"}),
            ("entry", {"tier": ""}),
            ("gone", {"tier": "gold", "merged_into": "told"}),
            ("watched", {"tier": "gold"}),
        ):
            store.q("put", (store.ledger, f"0/{member}", "state", "", json.dumps(state)))
            store.q("members_put", (store.ledger, 0, f"0/{member}"))
        await store.write(0, lambda tx: tx.set_tier_due("watched", later))

        assert store.backfill(0)["tiers"] == 1
        due = await store.read(0, lambda tx: tx.tiers_due_by(datetime.now(UTC) + timedelta(seconds=1), 10))
        assert due == ["told"]
        assert store.backfill(0)["tiers"] == 0
        assert await store.read(0, lambda tx: tx.tiers_due_by(later, 10)) == ["told", "watched"]
    finally:
        await store.close()
