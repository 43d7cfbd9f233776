"""Settlement reconciliation: a store's end-of-day receipts file against what the ledger posted.

A POS that was offline, a feed that dropped a message: the ledger can miss receipts that the
store's own export has. Reading the export through the legacy adapters, this posts every
receipt the ledger lacks (through the importer, so by natural key: running it again posts
nothing twice), sends the receipts it already has through the importer too (the ledger compares
them: the same contents are duplicates, other contents are refused and quarantined), and reports
the purchases the ledger has for those stores and days that the file does not (which need a
person: a test receipt, a wrong store id, a file cut short). Returns are listed for a person,
not posted: the ledger knows a return by the idempotency key of the transport that sent it, so
one that also came live from the till would be taken back twice. A store the ledger refuses to
list (an id it does not take) has its receipts quarantined with the ledger's reason, as an
import would; the other stores go on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from pathlib import Path

import grpc

from gateway.legacy.importer import (
    REFUSAL_CODES,
    RETRYABLE_CODES,
    ImportInterrupted,
    ImportReport,
    import_records,
    quarantine_path,
    read_source,
    refused_lines,
    write_quarantine,
)
from gateway.legacy.records import LegacyPurchase, LegacyReturn, Parsed, Quarantined
from pointmesh.clients import closing, ledger_stub
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import ledger_pb2, ledger_pb2_grpc

ReceiptKey = tuple[str, str, str]  # channel, store_id, receipt_id
PAGE = 500
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS.name  # a receipt the ledger has with other contents
_LAST_INSTANT = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class LedgerOnly:
    channel: str
    store_id: str
    receipt_id: str
    purchase_id: str
    member_id: str
    total_minor: int
    currency: str


@dataclass(frozen=True, slots=True)
class UnsettledReturn:
    """A return in the file, left for a person to check against the ledger."""

    channel: str
    store_id: str
    return_id: str
    original_channel: str
    original_store_id: str
    original_receipt_id: str
    lines: tuple[int, ...]  # source line numbers


@dataclass(slots=True)
class SettlementReport:
    receipts_in_file: int = 0
    already_posted: int = 0
    # Receipts the ledger lacked and this run posted (or a concurrent run did: duplicates).
    posted: ImportReport | None = None
    # Receipts the ledger had, sent again for the ledger to compare: duplicates when equal,
    # quarantined (ALREADY_EXISTS) when the file says otherwise.
    compared: ImportReport | None = None
    ledger_only: list[LedgerOnly] = field(default_factory=list)
    returns: list[UnsettledReturn] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    quarantine_file: Path | None = None

    @property
    def resolved(self) -> bool:
        """Nothing left for a person: every receipt posted and equal to the ledger's, nothing only
        in the ledger, no return to check."""
        return not self.ledger_only and not self.quarantined and not self.returns

    @property
    def differing(self) -> list[Quarantined]:
        """Lines of receipts the ledger has with other contents: compared and refused, or sent as
        missing and refused because the ledger has them on another day than the file says."""
        sent = [
            *(self.posted.quarantined if self.posted else ()),
            *(self.compared.quarantined if self.compared else ()),
        ]
        return sorted((q for q in sent if q.code == ALREADY_EXISTS), key=lambda q: q.line)

    def lines(self) -> list[str]:
        posted = self.posted.accepted if self.posted else 0
        differing = self.differing
        out = [
            f"settlement: {self.receipts_in_file} receipts in file, {self.already_posted} already posted,"
            f" {posted} posted now, {len(self.ledger_only)} only in the ledger,"
            f" {len(self.quarantined)} lines quarantined"
            + (f" -> {self.quarantine_file}" if self.quarantine_file else "")
            + (f", {len(self.returns)} returns not settled" if self.returns else "")
        ]
        out += [f"DIFFERS FROM THE LEDGER {q.source}:{q.line}: {q.reason}" for q in differing]
        out += [
            f"LEDGER ONLY {o.channel}/{o.store_id}/{o.receipt_id} purchase {o.purchase_id} member {o.member_id}"
            f" total {o.total_minor} {o.currency}"
            for o in self.ledger_only
        ]
        out += [
            f"RETURN NOT SETTLED {r.channel}/{r.store_id}/{r.return_id} of {r.original_channel}/"
            f"{r.original_store_id}/{r.original_receipt_id} (line(s) {', '.join(map(str, r.lines))}): check it"
            " in the ledger; `pointmesh legacy import` posts it if missing"
            for r in self.returns
        ]
        return out


LIST_WINDOW = timedelta(days=31)


def _spans(days: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """Sorted [start, end) days as spans, joining days at most a listing window apart."""
    spans: list[tuple[datetime, datetime]] = []
    for start, end in days:
        if spans and start - spans[-1][1] <= LIST_WINDOW:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    return spans


def _days(times: list[datetime]) -> list[tuple[datetime, datetime]]:
    """The [start, end) instants of the receipts' business days: each receipt's local day, by the
    UTC offset the file gives its time. A store open past midnight UTC (Helsinki at 00:30 is
    22:30 UTC the day before) or one east of UTC (Tokyo opens at 08:00, 23:00 UTC) would
    otherwise bring the previous day's settled receipts into its listing, reported as the
    ledger's only. A day starts at midnight by its earliest receipt's offset and ends at the
    next by its latest one's: the day summer time starts is 23 hours, the day it ends 25."""
    by_date: dict[date, list[datetime]] = {}
    for when in times:
        by_date.setdefault(when.date(), []).append(when)
    return sorted(
        (_midnight(d, min(found).tzinfo), _midnight(d, max(found).tzinfo, after=True)) for d, found in by_date.items()
    )


def _midnight(d: date, zone: tzinfo | None, *, after: bool = False) -> datetime:
    """Midnight starting `d` (`after`: the day after it) at the zone's offset, in UTC; before year
    1 or after 9999 the first or last instant there is."""
    try:
        return datetime.combine(d + timedelta(days=after), time(0), zone).astimezone(UTC)
    except OverflowError:
        return datetime.min.replace(tzinfo=UTC) if d.year == 1 and not after else _LAST_INSTANT


async def _posted(
    stub: ledger_pb2_grpc.LedgerServiceStub, channel: str, store_id: str, start: datetime, end: datetime
) -> list[ledger_pb2.Purchase]:
    found: list[ledger_pb2.Purchase] = []
    token = ""
    while True:
        request = ledger_pb2.ListPurchasesRequest(
            channel=channel, store_id=store_id, receipt_time_from=to_timestamp(start),
            receipt_time_until=to_timestamp(end), page_size=PAGE, page_token=token,
        )  # fmt: skip
        try:
            page = await stub.ListPurchases(request)
        except grpc.aio.AioRpcError as error:
            if error.code() in REFUSAL_CODES:  # about the file's store (an id the ledger refuses)
                raise
            # Not about the file: stop, like an import does.
            code = error.code()
            raise ImportInterrupted(
                code, error.details() or "", retryable=code in RETRYABLE_CODES, partial=ImportReport("", channel)
            ) from error
        found += page.purchases
        token = page.next_page_token
        if not token:
            return found


async def _store_posted(
    stub: ledger_pb2_grpc.LedgerServiceStub, channel: str, store_id: str, times: list[datetime]
) -> list[ledger_pb2.Purchase]:
    """The ledger's purchases of one store over its days in the file (see reconcile_records)."""
    found: list[ledger_pb2.Purchase] = []
    for start, end in _spans(_days(times)):
        while start < end:
            stop = start + LIST_WINDOW if end - start > LIST_WINDOW else end
            found += await _posted(stub, channel, store_id, start, stop)
            start = stop
    return found


async def reconcile_records(
    records: list[Parsed], stub: ledger_pb2_grpc.LedgerServiceStub, *, adapter: str, channel: str
) -> SettlementReport:
    """Compares the file's receipts with the ledger's for the same stores and business days
    (each receipt's local day, by its UTC offset)."""
    report = SettlementReport()
    receipts = [r for r in records if isinstance(r, LegacyPurchase)]
    report.quarantined = [r for r in records if isinstance(r, Quarantined)]
    report.returns = [_unsettled(r, channel) for r in records if isinstance(r, LegacyReturn)]
    report.receipts_in_file = len(receipts)
    if not receipts:
        return report
    key_of = {id(r): (r.channel or channel, r.store_id, r.receipt_id) for r in receipts}
    in_file: set[ReceiptKey] = set(key_of.values())
    # A receipt whose lines are quarantined is in the file all the same (fix the line, not the ledger).
    in_file |= {(channel, *q.receipt) for q in report.quarantined if q.receipt}
    in_ledger: dict[ReceiptKey, ledger_pb2.Purchase] = {}
    # Each store's days in the file and the days between them (a day missing from the file is a
    # day the ledger may have receipts for; a gap longer than a listing window is not one
    # period, so a stray far-off date does not make the run list years), a window of at most
    # 31 days at a time: the ledger lists no more at once.
    times: dict[tuple[str, str], list[datetime]] = {}
    for r in receipts:
        times.setdefault(key_of[id(r)][:2], []).append(r.receipt_time)
    # A store the ledger refuses to list (an id it does not take, such as "HEL 02") holds back
    # that store's receipts, quarantined with the ledger's reason as `legacy import` would; the
    # other stores go on.
    refused: dict[tuple[str, str], grpc.aio.AioRpcError] = {}
    for (ch, store_id), store_times in sorted(times.items()):
        try:
            store_posted = await _store_posted(stub, ch, store_id, store_times)
        except grpc.aio.AioRpcError as error:  # a refusal: _posted raises ImportInterrupted for the rest
            refused[(ch, store_id)] = error
            continue
        in_ledger.update({(p.channel, p.store_id, p.receipt_id): p for p in store_posted})
    for r in receipts:
        if (refusal := refused.get(key_of[id(r)][:2])) is not None:
            report.quarantined += refused_lines(r, refusal)
    receipts = [r for r in receipts if key_of[id(r)][:2] not in refused]
    missing = [r for r in receipts if key_of[id(r)] not in in_ledger]
    # (A file has no tender column: the ledger takes a copy without the tender the till named
    # as the same receipt.)
    posted_before = [r for r in receipts if key_of[id(r)] in in_ledger]
    report.already_posted = len(posted_before)
    report.posted = await import_records(missing, stub, adapter=adapter, channel=channel)
    # A key alone does not make them equal: the ledger compares the file's copy with its own.
    report.compared = await import_records(posted_before, stub, adapter=adapter, channel=channel)
    # Refused as already recorded: the ledger has it, under another day than the file gives it.
    elsewhen = {(q.source, q.line) for q in report.posted.quarantined if q.code == ALREADY_EXISTS}
    report.already_posted += sum(
        any((r.origin.source, ln.number) in elsewhen for ln in r.origin.lines) for r in missing
    )
    report.quarantined += report.posted.quarantined + report.compared.quarantined
    report.ledger_only = [
        LedgerOnly(k[0], k[1], k[2], p.purchase_id, p.member_id, p.total.amount_minor, p.total.currency)
        for k, p in sorted(in_ledger.items())
        if k not in in_file
    ]
    return report


def _unsettled(r: LegacyReturn, channel: str) -> UnsettledReturn:
    return UnsettledReturn(
        r.channel or channel, r.store_id, r.return_receipt_id, r.original_channel or channel, r.original_store_id,
        r.original_receipt_id, tuple(line.number for line in r.origin.lines),
    )  # fmt: skip


async def reconcile_file(
    path: Path | str, adapter_name: str, ledger_target: str, quarantine_dir: Path | str, channel: str | None = None
) -> SettlementReport:
    """`pointmesh ledger reconcile --settlement FILE --adapter NAME`."""
    adapter, source, records = await read_source(path, adapter_name)
    async with closing(ledger_stub(ledger_target)) as stub:
        report = await reconcile_records(
            records, stub, adapter=adapter.name, channel=channel or adapter.default_channel
        )
    if report.quarantined:
        report.quarantine_file = quarantine_path(Path(quarantine_dir), source)
        await asyncio.to_thread(write_quarantine, report.quarantined, report.quarantine_file, adapter=adapter.name)
    return report
