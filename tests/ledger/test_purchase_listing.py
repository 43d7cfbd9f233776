"""ListPurchases as the service answers it: each shard's next page merged, in receipt order,
page after page, whichever shard a purchase lives on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ledger_svc import codec
from ledger_svc.app import policy_from
from ledger_svc.domain import InvalidArgument, Money, bucket_of
from ledger_svc.purchases import PurchaseRecord, PurchaseStatus, purchase_id_for
from ledger_svc.service import LedgerService
from ledger_svc.store.base import ShardTx
from ledger_svc.store.sqlite import SqliteLedgerStore
from pointmesh.clock import SystemClock
from pointmesh.config import load_settings

SHARDS = 4
DAY = datetime(2026, 11, 27, tzinfo=UTC)
WINDOW = (DAY, DAY + timedelta(days=1))


def _purchase(i: int) -> PurchaseRecord:
    member = f"m{i % 7}"
    # Every third one shares its receipt time with the one before: the id breaks the tie.
    at = DAY + timedelta(minutes=10 * (i - (i % 3 == 2)))
    return PurchaseRecord(
        purchase_id_for(member, "aurora", f"r-{i}"), member, "aurora", "web" if i % 5 == 0 else "pos",
        f"s{i % 2}", f"r-{i}", Money(1_000 + i, "EUR"), (), at, at, PurchaseStatus.EARNED,
    )  # fmt: skip


def _write(records: list[PurchaseRecord]) -> Callable[[ShardTx], None]:
    def unit(tx: ShardTx) -> None:
        for r in records:
            tx.put_purchase(r.purchase_id, r.member_id, r.status.value, r.receipt_time, codec.dumps(r), r.channel,
                            r.store_id)  # fmt: skip

    return unit


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[LedgerService, list[PurchaseRecord]]]:
    store = SqliteLedgerStore(tmp_path, SHARDS)
    records = [_purchase(i) for i in range(40)]
    # One purchase of store s1 just outside the window on each side.
    records += [
        replace(_purchase(41), receipt_time=WINDOW[0] - timedelta(microseconds=1)),
        replace(_purchase(43), receipt_time=WINDOW[1]),
    ]
    for shard in range(SHARDS):
        await store.write(shard, _write([r for r in records if bucket_of(r.member_id) % SHARDS == shard]))
    assert len({bucket_of(r.member_id) % SHARDS for r in records}) > 1
    yield LedgerService(store, SystemClock(), policy_from(load_settings()), card_secret="t"), records
    await store.close()


async def _pages(svc: LedgerService, store_id: str, size: int) -> list[list[str]]:
    pages, token = [], ""
    while True:
        page, token = await svc.accrual.list_purchases("pos", store_id, *WINDOW, size, token)
        pages.append([r.purchase_id for r in page])
        if not token:
            return pages


@pytest.mark.parametrize("store_id", ["s1", ""])
async def test_pages_merge_every_shard_in_receipt_order(
    service: tuple[LedgerService, list[PurchaseRecord]], store_id: str
) -> None:
    svc, records = service
    wanted = sorted(
        (r.receipt_time, r.purchase_id)
        for r in records
        if r.channel == "pos" and store_id in ("", r.store_id) and WINDOW[0] <= r.receipt_time < WINDOW[1]
    )
    pages = await _pages(svc, store_id, 4)
    assert [pid for page in pages for pid in page] == [pid for _, pid in wanted]
    assert all(len(page) == 4 for page in pages[:-1]) and 0 < len(pages[-1]) <= 4


async def test_a_token_this_api_did_not_return_is_refused(service: tuple[LedgerService, list[PurchaseRecord]]) -> None:
    svc, _ = service
    with pytest.raises(InvalidArgument) as refused:
        await svc.accrual.list_purchases("pos", "s1", *WINDOW, 4, "yesterday|pu_nope")
    assert refused.value.field == "page_token"
