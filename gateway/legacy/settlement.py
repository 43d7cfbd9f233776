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
import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

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
from pointmesh.clients import closing, ledger_stub, rules_stub
from pointmesh.currencies import format_minor
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import ledger_pb2, ledger_pb2_grpc, rules_pb2

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


@dataclass(frozen=True, slots=True)
class StoreZones:
    """Each store's time zone as the program publishes it: a business day starts at the store's
    own midnight, which on the day summer time starts or ends no receipt's UTC offset gives for
    the whole day. Stores the program does not list keep the file's offsets."""

    by_store: dict[str, ZoneInfo] = field(default_factory=dict)
    default: ZoneInfo | None = None  # channels without a store (web, app)

    def of(self, store_id: str) -> ZoneInfo | None:
        return self.by_store.get(store_id) if store_id else self.default


async def read_store_zones(rules_target: str, program: str) -> tuple[StoreZones | None, str]:
    """The program's store zones from rules_svc (the version in effect now), or None and why not:
    settlement then takes each day from the file's UTC offsets, as it says in its report."""
    async with closing(rules_stub(rules_target)) as stub:
        try:
            reply = await stub.GetProgram(rules_pb2.GetProgramRequest(program=program))
        except grpc.aio.AioRpcError as error:
            return None, f"rules_svc at {rules_target}: {error.code().name} {error.details() or ''}".rstrip()
    try:
        document = json.loads(reply.document_json)
        default = ZoneInfo(document["default_timezone"])
        by_store = {s["id"]: ZoneInfo(s["timezone"]) for s in document.get("stores", ())}
    except (ValueError, KeyError, TypeError, ZoneInfoNotFoundError) as error:
        return None, f"program {program!r} version {reply.version.version}: no store time zones ({error})"
    return StoreZones(by_store, default), ""


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
    # Why the stores' time zones were not known ('' when they were): days then start at the
    # file's own UTC offsets, which misplace the hour a summer-time change moves.
    zones_unknown: str = ""

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
        if self.zones_unknown:
            out.append(f"STORE TIME ZONES UNKNOWN ({self.zones_unknown}): days taken from the file's UTC offsets")
        out += [f"DIFFERS FROM THE LEDGER {q.source}:{q.line}: {q.reason}" for q in differing]
        out += [
            f"LEDGER ONLY {o.channel}/{o.store_id}/{o.receipt_id} purchase {o.purchase_id} member {o.member_id}"
            f" total {format_minor(o.total_minor, o.currency)}"
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


def _days(times: list[datetime], zone: ZoneInfo | None = None) -> list[tuple[datetime, datetime]]:
    """The [start, end) instants of the receipts' business days: each receipt's local day in the
    store's zone (without one, by the UTC offset the file gives its time). A store open past
    midnight UTC (Helsinki at 00:30 is 22:30 UTC the day before) or one east of UTC (Tokyo opens
    at 08:00, 23:00 UTC) would otherwise bring the previous day's settled receipts into its
    listing, reported as the ledger's only. In the zone a day runs from its midnight to the
    next, 23 hours the day summer time starts and 25 the day it ends. By offsets alone a day
    starts at midnight by its earliest receipt's offset and ends at the next by its latest
    one's, which is right only if the file has receipts from both sides of the change."""
    if zone is not None:
        local_days = {when.astimezone(zone).date() for when in times}
        return sorted((_midnight(d, zone), _midnight(d, zone, after=True)) for d in local_days)
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
    stub: ledger_pb2_grpc.LedgerServiceStub, channel: str, store_id: str, times: list[datetime],
    zone: ZoneInfo | None,
) -> list[ledger_pb2.Purchase]:  # fmt: skip
    """The ledger's purchases of one store over its days in the file (see reconcile_records)."""
    found: list[ledger_pb2.Purchase] = []
    for start, end in _spans(_days(times, zone)):
        while start < end:
            stop = start + LIST_WINDOW if end - start > LIST_WINDOW else end
            found += await _posted(stub, channel, store_id, start, stop)
            start = stop
    return found


async def reconcile_records(
    records: list[Parsed], stub: ledger_pb2_grpc.LedgerServiceStub, *, adapter: str, channel: str,
    zones: StoreZones | None = None,
) -> SettlementReport:  # fmt: skip
    """Compares the file's receipts with the ledger's for the same stores and business days
    (each receipt's local day in its store's zone, or by its UTC offset without `zones`)."""
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
    unlisted: list[str] = []  # stores the program gives no zone
    for (ch, store_id), store_times in sorted(times.items()):
        try:
            zone = zones.of(store_id) if zones else None
            if zones and zone is None:
                unlisted.append(f"the program lists no store {store_id!r}")
            store_posted = await _store_posted(stub, ch, store_id, store_times, zone)
        except grpc.aio.AioRpcError as error:  # a refusal: _posted raises ImportInterrupted for the rest
            refused[(ch, store_id)] = error
            continue
        in_ledger.update({(p.channel, p.store_id, p.receipt_id): p for p in store_posted})
    report.zones_unknown = ", ".join(unlisted)
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
    path: Path | str, adapter_name: str, ledger_target: str, quarantine_dir: Path | str, channel: str | None = None,
    *, rules_target: str = "", program: str = "",
) -> SettlementReport:  # fmt: skip
    """`pointmesh ledger reconcile --settlement FILE --adapter NAME`. The stores' time zones come
    from rules_svc at `rules_target` (the program `program`); without it, from the file."""
    adapter, source, records = await read_source(path, adapter_name)
    zones, why_not = await read_store_zones(rules_target, program) if rules_target else (None, "no rules_svc given")
    async with closing(ledger_stub(ledger_target)) as stub:
        report = await reconcile_records(
            records, stub, adapter=adapter.name, channel=channel or adapter.default_channel, zones=zones
        )
    report.zones_unknown = why_not or report.zones_unknown
    if report.quarantined:
        report.quarantine_file = quarantine_path(Path(quarantine_dir), source)
        await asyncio.to_thread(write_quarantine, report.quarantined, report.quarantine_file, adapter=adapter.name)
    return report
