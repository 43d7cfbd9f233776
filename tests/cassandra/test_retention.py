"""Retention on Cassandra is a TTL on each row it covers: idempotency records and relayed events
disappear by themselves (their owner rows a day later), while unrelayed events and the journal
stay."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from ledger_svc.domain import TxKind
from ledger_svc.store.base import IdemRecord, ShardTx, TxRecord
from ledger_svc.store.cassandra import CassandraLedgerStore, _idem_id
from tests.conftest import CassandraSession

NOW = datetime.now(UTC)


def _posting(tx: ShardTx) -> None:
    record = TxRecord("tx_1", TxKind.EARN, "m1", "points", 10, NOW, NOW)
    tx.add_transaction(record)
    tx.add_entries(record, [("member:m1:points", 10), ("funding:program:points", -10)])
    row = tx.get_accounts(["member:m1:points"])[0]
    row.balance, row.version = 10, 1
    tx.put_account(row)
    tx.put_idempotency("pos", "k1", IdemRecord("Earn", "fp", "{}", NOW))
    tx.add_outbox("ev_sent", "m1", "{}", NOW)
    tx.add_outbox("ev_waiting", "m1", "{}", NOW)


async def test_retention_rows_expire_by_ttl_and_the_rest_stays(cassandra_session: CassandraSession) -> None:
    cassandra_session.reconnected()
    store = CassandraLedgerStore(
        cassandra_session.session, cassandra_session.settings.cassandra_keyspace, "ret" + uuid.uuid4().hex[:12], 1,
        retention=timedelta(seconds=6),
    )  # fmt: skip
    owner_key = (store.ledger, 0, _idem_id("pos", "k1"))
    try:
        await store.write(0, _posting)
        sent = [r.seq for r in await store.read(0, lambda tx: tx.unrelayed_outbox(10)) if r.event_id == "ev_sent"]
        await store.write(0, lambda tx: tx.mark_relayed(sent, NOW))
        assert await store.read(0, lambda tx: tx.get_idempotency("pos", "k1")) is not None
        assert store.q("owner_get", owner_key).one() is not None
        ttls = [r.ttl for kind in ("idem", "sent") for r in store.q("kind_ttl", (store.ledger, "0/m1", kind))]
        assert len(ttls) == 2 and all(0 < ttl <= 6 for ttl in ttls)
        # Nothing else in the partition expires: balances, journal, the unrelayed event.
        for kind in ("acct", "tx", "outbox"):
            assert [r.ttl for r in store.q("kind_ttl", (store.ledger, "0/m1", kind))] == [None]

        await asyncio.sleep(7)
        assert await store.read(0, lambda tx: tx.get_idempotency("pos", "k1")) is None
        # Its owner row outlives it by a day, so a replay never finds the owner gone first.
        owner_ttl = store.session.execute(
            f"SELECT TTL(p) AS ttl FROM {store.keyspace}.owners WHERE ledger=%s AND shard=%s AND id=%s", owner_key
        ).one()
        assert 86_000 < owner_ttl.ttl <= 86_406  # a day and 6 s, less the time since
        assert list(store.q("kind", (store.ledger, "0/m1", "sent"))) == []
        # An event not yet relayed never expires; the journal and balances are not retention's.
        waiting = await store.read(0, lambda tx: tx.unrelayed_outbox(10))
        assert [r.event_id for r in waiting] == ["ev_waiting"]
        assert await store.read(0, lambda tx: tx.get_transaction("tx_1")) is not None
        assert (await store.read(0, lambda tx: tx.get_accounts(["member:m1:points"])))[0].balance == 10
    finally:
        await store.close()
