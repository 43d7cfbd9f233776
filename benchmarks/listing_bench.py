"""What one page of ListPurchases costs on a busy day, printed as figures; never a pass/fail.

Settlement compares a store's end-of-day file with the ledger a page at a time
(`Accrual.list_purchases`, what the gRPC method calls). This fills a SQLite ledger of 4 shards
with one day of purchases over many stores and two channels (records shaped like real ones,
~1.5 KB each), then times, in the same process:
  * a store's day, pages of 500 (the settlement read);
  * the whole channel's day, the first page and a page from the middle;
  * the baseline: what every page cost before keyset paging, the whole window's bodies read,
    decoded and filtered on every shard. (That code had an index on receipt_time alone; with
    the whole file inside one day's window it would read the same rows.)

    python -m benchmarks.listing_bench [--purchases 200000] [--stores 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ledger_svc import codec
from ledger_svc import commands as c
from ledger_svc.app import policy_from
from ledger_svc.domain import Money, bucket_of
from ledger_svc.purchases import Part, PurchaseRecord, PurchaseStatus, purchase_id_for
from ledger_svc.service import LedgerService
from ledger_svc.store.base import ShardTx, to_us
from ledger_svc.store.sqlite import SqliteLedgerStore
from pointmesh.clock import SystemClock
from pointmesh.config import load_settings

SHARDS = 4
DAY = datetime(2026, 11, 27, tzinfo=UTC)
PAGE = 500


def _record(i: int, purchases: int, stores: int) -> PurchaseRecord:
    at = DAY + timedelta(microseconds=i * (86_400_000_000 // purchases))
    lines = tuple(c.PurchaseLine(f"sku-{i % 997}-{n}", "grocery", 1 + n, 250 * (n + 1)) for n in range(4))
    parts = tuple(Part(f"rule-{n}", "points", 10 * (n + 1), n, "base earn, 1 point per euro") for n in range(3))
    member = f"m{i % 50_000:06d}"
    return PurchaseRecord(
        purchase_id_for(member, "aurora", f"r-{i}"), member, "aurora", "pos" if i % 10 else "web", f"store-{i % stores:04d}",
        f"r-{i}", Money(2_500, "EUR"), lines, at, at, PurchaseStatus.EARNED, parts=parts,
        earn_transactions={"points": f"tx_{i:012d}"}, purchase_number=i % 40,
    )  # fmt: skip


async def _fill(store: SqliteLedgerStore, purchases: int, stores: int) -> None:
    def unit(records: list[PurchaseRecord]) -> Callable[[ShardTx], None]:
        def write(tx: ShardTx) -> None:
            for r in records:
                tx.put_purchase(r.purchase_id, r.member_id, r.status.value, r.receipt_time, codec.dumps(r),
                                r.channel, r.store_id)  # fmt: skip

        return write

    for start in range(0, purchases, 20_000):
        by_shard: dict[int, list[PurchaseRecord]] = {}
        for i in range(start, min(start + 20_000, purchases)):
            record = _record(i, purchases, stores)
            by_shard.setdefault(bucket_of(record.member_id) % SHARDS, []).append(record)
        for shard, records in by_shard.items():
            await store.write(shard, unit(records))


async def _timed(runs: int, call: Callable[[], Awaitable[None]]) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        await call()
        out.append((time.perf_counter() - t) * 1000)
    return out


def _show(name: str, ms: list[float]) -> float:
    ms = sorted(ms)
    p50 = statistics.median(ms)
    print(f"{name:<58} p50 {p50:8.1f} ms   max {ms[-1]:8.1f} ms   ({len(ms)} runs)")
    return p50


async def main(purchases: int, stores: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteLedgerStore(Path(tmp), SHARDS)
        t = time.perf_counter()
        await _fill(store, purchases, stores)
        body = len(codec.dumps(_record(1, purchases, stores)))
        print(f"filled {purchases:,} purchases of one day, {stores:,} stores, ~{body:,} B each, in"
              f" {time.perf_counter() - t:.1f} s")  # fmt: skip
        settings = load_settings(data_dir=Path(tmp))
        service = LedgerService(store, SystemClock(), policy_from(settings), card_secret="bench")
        accrual = service.accrual
        end = DAY + timedelta(days=1)

        async def store_day() -> None:
            token, seen = "", 0
            while True:
                page, token = await accrual.list_purchases("pos", "store-0007", DAY, end, PAGE, token)
                seen += len(page)
                if not token:
                    break
            assert seen > 0

        async def channel_first() -> None:
            page, _ = await accrual.list_purchases("pos", "", DAY, end, PAGE, "")
            assert len(page) == PAGE

        async def channel_middle() -> None:
            middle = f"{(DAY + timedelta(hours=12)).isoformat()}|pu_{'0' * 28}"
            page, _ = await accrual.list_purchases("pos", "", DAY, end, PAGE, middle)
            assert len(page) == PAGE

        async def old_page() -> None:
            """The read every page made before keyset paging (the same query and filter)."""
            found = []
            for shard in range(SHARDS):

                def window(tx: ShardTx) -> list[str]:
                    rows = tx.c.execute(  # type: ignore[attr-defined]
                        "SELECT body FROM purchases WHERE receipt_time>=? AND receipt_time<?"
                        " ORDER BY receipt_time, purchase_id",
                        (to_us(DAY), to_us(end)),
                    ).fetchall()
                    return [str(r[0]) for r in rows]

                for b in await store.scan(shard, window):
                    r = codec.loads(PurchaseRecord, b)
                    if r.channel == "pos" and r.store_id == "store-0007":
                        found.append(r)
            found.sort(key=lambda r: (r.receipt_time, r.purchase_id))

        per_store = purchases // stores
        new = _show(f"a store's day (~{per_store} purchases), pages of {PAGE}", await _timed(20, store_day))
        _show(f"channel's day, first page of {PAGE}", await _timed(20, channel_first))
        _show("channel's day, a page from mid-day", await _timed(20, channel_middle))
        old = _show("baseline: one page before keyset paging (whole day read)", await _timed(3, old_page))
        print(f"store's day: {old / new:,.0f}x faster than the baseline in this run")
        await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--purchases", type=int, default=200_000)
    parser.add_argument("--stores", type=int, default=1_000)
    args = parser.parse_args()
    asyncio.run(main(args.purchases, args.stores))
