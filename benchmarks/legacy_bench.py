"""Legacy file import on this machine, printed as figures; never a pass/fail.

rules_svc and ledger_svc run as subprocesses on loopback (fraud screening off), with Redis on
a free port. A franchise CSV drop of `--receipts` one-line receipts over `--members` cards is
imported with `import_file` (runs of purchases in IngestBatch streams of pages, the ledger's
batch accrual path), then the same number of other receipts is sent the way the importer sent
them before: one RecordPurchase at a time, in file order. Both figures are receipts/s in the
same run; the file import includes parsing and the card lookups.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchmarks.harness import rules_and_ledger
from gateway.legacy.importer import import_file
from pointmesh.clients import ledger_stub
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import common_pb2, ledger_pb2

HEADER = "record_type,store_id,receipt_id,line_no,receipt_time,card_number,currency,sku,category,quantity,amount"


def card(k: int) -> str:
    return f"7000-{k:06d}"


def write_drop(path: Path, receipts: int, members: int, start: datetime) -> None:
    rows = [HEADER]
    for i in range(receipts):
        at = (start + timedelta(seconds=i)).isoformat()
        rows.append(f"P,F-001,F-{i},1,{at},{card(i % members)},EUR,SKU-{i % 97},misc,1,{10 + i % 40}.50")
    path.write_text("\n".join(rows) + "\n")


async def measure(ledger_addr: str, tmp: Path, receipts: int, members: int) -> None:
    stub = ledger_stub(ledger_addr, default_timeout_seconds=30)
    ids = []
    for k in range(members):
        created = await stub.CreateMember(ledger_pb2.CreateMemberRequest(
            idempotency_key=common_pb2.IdempotencyKey(namespace="bench", key=f"m{k}"),
            external_ids=[common_pb2.ExternalId(kind="card", value=card(k))],
        ))  # fmt: skip
        ids.append(created.member.member_id)
    start = datetime.now(UTC) - timedelta(hours=receipts // 3600 + 2)
    drop = tmp / "drop.csv"
    write_drop(drop, receipts, members, start)

    t0 = time.perf_counter()
    report = await import_file(drop, "csv", ledger_addr, tmp / "quarantine")
    batched = receipts / (time.perf_counter() - t0)
    print(f"{'file import (IngestBatch pages)':38s} {batched:9.0f} receipts/s   ({report.summary()})")

    t0 = time.perf_counter()
    for i in range(receipts):
        amount = common_pb2.Money(amount_minor=(10 + i % 40) * 100 + 50, currency="EUR")
        await stub.RecordPurchase(ledger_pb2.RecordPurchaseRequest(
            member_id=ids[i % members], channel="pos", store_id="F-001", receipt_id=f"U-{i}", total=amount,
            lines=[ledger_pb2.PurchaseLine(sku=f"SKU-{i % 97}", category="misc", quantity=1, amount=amount)],
            receipt_time=to_timestamp(start + timedelta(seconds=i)),
        ))  # fmt: skip
    one_by_one = receipts / (time.perf_counter() - t0)
    print(f"{'one RecordPurchase at a time (before)':38s} {one_by_one:9.0f} receipts/s")
    print(f"{'  file import / one at a time':38s} {batched / one_by_one:9.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receipts", type=int, default=10_000)
    parser.add_argument("--members", type=int, default=1_000)
    args = parser.parse_args()
    print(f"legacy import benchmark: {os.cpu_count()} cores, SQLite ledger, rules_svc, fraud screening off")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        redis = RedisServer(free_port(), tmp / "redis", appendonly=False)
        redis.start()
        try:
            with rules_and_ledger(tmp, redis.url, POINTMESH_INGEST_CONSUMER="false") as ledger_addr:
                asyncio.run(measure(ledger_addr, tmp, args.receipts, args.members))
        finally:
            redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
