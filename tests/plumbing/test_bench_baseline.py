"""The ledger benchmark's raw-SQLite baseline writes, per posting, the rows an Earn writes, into
the store's own schema. It had fallen behind the schema (the lots table gained a column) and
failed at its first insert, so `ledger_bench` stopped before printing its ratio."""

from __future__ import annotations

import sqlite3

from benchmarks.ledger_bench import _RAW_STATEMENTS, _raw_rows
from ledger_svc.store.sqlite import SHARD_SCHEMA


def test_the_baseline_rows_fit_the_store_schema_and_land_one_posting_each() -> None:
    conn = sqlite3.connect(":memory:")
    conn.executescript(SHARD_SCHEMA)
    postings = 10
    for i in range(postings):
        for sql, rows in zip(_RAW_STATEMENTS, _raw_rows(i), strict=True):
            conn.executemany(sql, rows)
    counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
              for t in ("transactions", "entries", "lots", "idempotency", "outbox")}  # fmt: skip
    assert counts == {"transactions": postings, "entries": 2 * postings, "lots": postings,
                      "idempotency": postings, "outbox": postings}  # fmt: skip
