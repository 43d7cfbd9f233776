"""Settlement reconciliation: a store's end-of-day receipts file against what the ledger posted.

A POS that was offline, a feed that dropped a message: the ledger can miss receipts that the
store's own export has. Reading the export through the legacy adapters, this posts every
receipt the ledger lacks (through the importer, so by natural key: running it again posts
nothing twice) and reports the purchases the ledger has for those stores and days that the
file does not (which need a person: a test receipt, a wrong store id, a file cut short).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.legacy.importer import (
    ImportReport,
    import_records,
    ledger_stub,
    quarantine_path,
    read_source,
    write_quarantine,
)
from gateway.legacy.records import LegacyPurchase, Parsed, Quarantined
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import ledger_pb2, ledger_pb2_grpc

ReceiptKey = tuple[str, str, str]  # channel, store_id, receipt_id
PAGE = 500


@dataclass(frozen=True, slots=True)
class LedgerOnly:
    channel: str
    store_id: str
    receipt_id: str
    purchase_id: str
    member_id: str
    total_minor: int
    currency: str


@dataclass(slots=True)
class SettlementReport:
    receipts_in_file: int = 0
    already_posted: int = 0
    # Receipts the ledger lacked and this run posted (or a concurrent run did: duplicates).
    posted: ImportReport | None = None
    ledger_only: list[LedgerOnly] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    quarantine_file: Path | None = None

    @property
    def resolved(self) -> bool:
        """Nothing left for a person: every receipt posted, nothing only in the ledger."""
        return not self.ledger_only and not self.quarantined

    def lines(self) -> list[str]:
        posted = self.posted.accepted if self.posted else 0
        out = [
            f"settlement: {self.receipts_in_file} receipts in file, {self.already_posted} already posted,"
            f" {posted} posted now, {len(self.ledger_only)} only in the ledger,"
            f" {len(self.quarantined)} lines quarantined"
            + (f" -> {self.quarantine_file}" if self.quarantine_file else "")
        ]
        out += [
            f"LEDGER ONLY {o.channel}/{o.store_id}/{o.receipt_id} purchase {o.purchase_id} member {o.member_id}"
            f" total {o.total_minor} {o.currency}"
            for o in self.ledger_only
        ]
        return out


def _day(when: datetime) -> datetime:
    return when.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


async def _posted(
    stub: ledger_pb2_grpc.LedgerServiceStub, channel: str, store_id: str, start: datetime, end: datetime
) -> list[ledger_pb2.Purchase]:
    found: list[ledger_pb2.Purchase] = []
    token = ""
    while True:
        page = await stub.ListPurchases(
            ledger_pb2.ListPurchasesRequest(
                channel=channel, store_id=store_id, receipt_time_from=to_timestamp(start),
                receipt_time_until=to_timestamp(end), page_size=PAGE, page_token=token,
            )
        )  # fmt: skip
        found += page.purchases
        token = page.next_page_token
        if not token:
            return found


async def reconcile_records(
    records: list[Parsed], stub: ledger_pb2_grpc.LedgerServiceStub, *, adapter: str, channel: str
) -> SettlementReport:
    """Compares the file's receipts with the ledger's for the same stores and UTC days."""
    report = SettlementReport()
    receipts = [r for r in records if isinstance(r, LegacyPurchase)]
    report.quarantined = [r for r in records if isinstance(r, Quarantined)]
    report.receipts_in_file = len(receipts)
    if not receipts:
        return report
    key_of = {id(r): (r.channel or channel, r.store_id, r.receipt_id) for r in receipts}
    in_file: set[ReceiptKey] = set(key_of.values())
    start = _day(min(r.receipt_time for r in receipts))
    end = _day(max(r.receipt_time for r in receipts)) + timedelta(days=1)
    in_ledger: dict[ReceiptKey, ledger_pb2.Purchase] = {}
    for ch, store_id in sorted({(k[0], k[1]) for k in in_file}):
        for p in await _posted(stub, ch, store_id, start, end):
            in_ledger[(p.channel, p.store_id, p.receipt_id)] = p
    missing = [r for r in receipts if key_of[id(r)] not in in_ledger]
    report.already_posted = len(receipts) - len(missing)
    report.posted = await import_records(missing, stub, adapter=adapter, channel=channel)
    report.quarantined += report.posted.quarantined
    report.ledger_only = [
        LedgerOnly(k[0], k[1], k[2], p.purchase_id, p.member_id, p.total.amount_minor, p.total.currency)
        for k, p in sorted(in_ledger.items())
        if k not in in_file
    ]
    return report


async def reconcile_file(
    path: Path | str, adapter_name: str, ledger_target: str, quarantine_dir: Path | str, channel: str | None = None
) -> SettlementReport:
    """`pointmesh ledger reconcile --settlement FILE --adapter NAME`."""
    adapter, source, records = await read_source(path, adapter_name)
    async with ledger_stub(ledger_target) as stub:
        report = await reconcile_records(
            records, stub, adapter=adapter.name, channel=channel or adapter.default_channel
        )
    if report.quarantined:
        report.quarantine_file = quarantine_path(Path(quarantine_dir), source)
        await asyncio.to_thread(write_quarantine, report.quarantined, report.quarantine_file, adapter=adapter.name)
    return report
