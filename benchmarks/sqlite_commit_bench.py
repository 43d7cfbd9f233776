"""What one SQLite commit costs on a ledger shard, and what spreads it; never a pass/fail.

A unary Earn is one posting per commit under load on this box (groups rarely fill), so the
commit's own cost bounds it. This writes the rows one Earn writes (ledger_bench's raw rows,
the shard schema and pragmas, automatic checkpoints off as in ledger_svc) into a shard that
already holds 20,000 postings, and prints microseconds per posting spent writing the rows and
committing, for page sizes 1-8 KiB and for 1, 8 and 32 postings a commit.

Measured 2026-12-05 on this 2-core box: 83-86 us a commit whatever the page size, i.e. the
commit is bound by its write calls (strace: ~35 pwrite a commit, one per dirty page, so one
per table or index leaf a posting touches), not by bytes; 8 postings a commit bring it to
~27 us a posting, 32 to ~17 us.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

from benchmarks.ledger_bench import _RAW_STATEMENTS, _raw_rows
from ledger_svc.store.sqlite import SHARD_SCHEMA
from ledger_svc.store.sqlite_worker import connect

PRELOADED = 20_000


def _write(conn: sqlite3.Connection, first: int, count: int) -> None:
    for i in range(first, first + count):
        for sql, rows in zip(_RAW_STATEMENTS, _raw_rows(i), strict=True):
            for row in rows:
                conn.execute(sql, row)


def measure(page_size: int, per_commit: int, postings: int) -> tuple[float, float]:
    """(us writing, us committing) per posting."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.sqlite"
        fresh = sqlite3.connect(path, isolation_level=None)
        fresh.execute(f"PRAGMA page_size={page_size}")
        fresh.close()
        conn = connect(path, "NORMAL", autocheckpoint=False)
        conn.executescript(SHARD_SCHEMA)
        conn.execute("BEGIN")
        _write(conn, 0, PRELOADED)
        conn.execute("COMMIT")
        writing = committing = 0.0
        for first in range(PRELOADED, PRELOADED + postings, per_commit):
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            _write(conn, first, per_commit)
            t1 = time.perf_counter()
            conn.execute("COMMIT")
            writing, committing = writing + t1 - t0, committing + time.perf_counter() - t1
        conn.close()
    return writing / postings * 1e6, committing / postings * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--postings", type=int, default=6_000)
    args = parser.parse_args()
    print(f"SQLite commit cost per posting ({args.postings} postings after {PRELOADED} preloaded)")
    cases = [(page, 1) for page in (1024, 2048, 4096, 8192)] + [(4096, 8), (4096, 32)]
    for page, per_commit in cases:
        writing, committing = measure(page, per_commit, args.postings)
        print(f"  page {page:5d} B, {per_commit:2d} a commit:  write {writing:6.1f} us   commit {committing:6.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
