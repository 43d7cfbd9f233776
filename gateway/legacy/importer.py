"""Sends parsed legacy records to the ledger and accounts for every one of them.

Each record ends as exactly one of: accepted (the ledger recorded it now), duplicate (the
ledger already had it, from this file or any other transport), or quarantined (the adapter
could not read it, or the ledger refused it for a reason about the record). A failure that
says nothing about the record - the ledger unreachable or out of time - stops the whole
import instead: every command is idempotent, so running the file again is the retry, and
nothing is quarantined for an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2

from gateway.legacy.base import Adapter
from gateway.legacy.csv_drop import CsvDropAdapter
from gateway.legacy.fixed_width import FixedWidthAdapter
from gateway.legacy.records import LegacyPurchase, LegacyReturn, Member, Parsed, Quarantined, quarantine_all
from gateway.legacy.webhook import WebhookAdapter
from pointmesh.bounds import KEY_PATTERN, key_digest
from pointmesh.clients import closing, ledger_stub
from pointmesh.errors import status_details
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc

ADAPTERS: dict[str, Adapter] = {a.name: a for a in (CsvDropAdapter(), FixedWidthAdapter(), WebhookAdapter())}

# Refusals about the record itself: fix the record and send it again.
REFUSAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
# Failures of the moment: run the same import again later.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
# Returns from every legacy adapter share one namespace: the same slip arriving in two
# formats is one return (or, with different contents, a conflict a person must look at).
RETURN_KEY_NAMESPACE = "legacy"
# Purchases per IngestBatch stream, sent in pages of INGEST_PAGE; a run of purchases longer
# than this goes in several streams, still in file order.
PURCHASE_BATCH = 2_000
INGEST_PAGE = 500
# A stream's chunks wait up to POINTMESH_BATCH_DEADLINE_SECONDS each for rules_svc and fraud_svc.
BATCH_TIMEOUT_SECONDS = 300
# Seconds before each resend of a stream the ledger could not take (UNAVAILABLE: restarting,
# unreachable). Not for a stream that ran out of time: a slow ledger gets no second load.
STREAM_RETRY_DELAYS = (0.5, 2.0, 5.0)


@dataclass(frozen=True, slots=True)
class ImportReport:
    """Counts are of records (a receipt or a return); `quarantined` lists source lines."""

    adapter: str
    channel: str
    accepted: int = 0
    duplicates: int = 0
    # Accepted purchases waiting for rules_svc; they earn when it is back, with no re-send.
    pending_accrual: int = 0
    quarantined: tuple[Quarantined, ...] = ()
    quarantine_file: Path | None = None

    def summary(self) -> str:
        where = f" -> {self.quarantine_file}" if self.quarantine_file else ""
        return (
            f"{self.adapter}: {self.accepted} accepted ({self.pending_accrual} pending accrual), "
            f"{self.duplicates} duplicates, {len(self.quarantined)} lines quarantined{where}"
        )


class ImportInterrupted(RuntimeError):
    """The import stopped on a failure that is not about a record. `partial` says what was sent
    before it; since every command is idempotent, the remedy is to run the whole import again."""

    def __init__(self, code: grpc.StatusCode, message: str, *, retryable: bool, partial: ImportReport) -> None:
        kind = "retry the import later" if retryable else "not retryable as is"
        super().__init__(f"import stopped: ledger {code.name}: {message} ({kind})")
        self.code = code
        self.retryable = retryable
        self.partial = partial


@dataclass(frozen=True, slots=True)
class _Refusal:
    code: str
    field: str
    reason: str


class _Refused(Exception):
    def __init__(self, refusal: _Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


class _Stopped(Exception):
    """A failure that says nothing about a record: the import stops."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Session:
    ledger: ledger_pb2_grpc.LedgerServiceStub
    channel: str
    members: dict[str, str | _Refusal] = field(default_factory=dict)  # card -> member id, per import
    queued: list[tuple[LegacyPurchase, ledger_pb2.RecordPurchaseRequest]] = field(default_factory=list)
    accepted: int = 0
    duplicates: int = 0
    pending: int = 0
    resend_delays: tuple[float, ...] = STREAM_RETRY_DELAYS

    async def member_of(self, who: Member) -> str:
        if who.member_id:
            return who.member_id
        known = self.members.get(who.card_number)
        if known is None:
            try:
                with _unsendable("card_number"):
                    request = ledger_pb2.LookupMemberRequest(
                        external_id=common_pb2.ExternalId(kind="card", value=who.card_number)
                    )
                found = await self.ledger.LookupMember(request)
                known = found.member.member_id
            except _Refused as refused:
                known = refused.refusal
            except grpc.aio.AioRpcError as error:
                if error.code() not in REFUSAL_CODES:
                    raise
                cause = _refusal(error)
                known = _Refusal(cause.code, "card_number", f"card_number {who.card_number!r}: {cause.reason}")
            self.members[who.card_number] = known  # an unknown card is looked up once per import
        if isinstance(known, _Refusal):
            raise _Refused(known)
        return known

    async def purchase(self, p: LegacyPurchase) -> None:
        """Queues the purchase for the next `send_purchases`."""
        member_id = await self.member_of(p.member)
        with _unsendable():
            request = _purchase_request(p, member_id, self.channel)
        # No transport key: the receipt's natural key is the dedupe, and a key made from a
        # source id (a line number, a batch id) could only add false conflicts.
        self.queued.append((p, request))

    async def send_purchases(self) -> list[tuple[LegacyPurchase, _Refusal]]:
        """The queued purchases in one IngestBatch stream of pages, in file order (the ledger's
        batch accrual path, a few times faster than RecordPurchase one by one, same results);
        returns the ones refused. Raises _Stopped on a failure that is not about a record."""
        queued, self.queued = self.queued, []
        if not queued:
            return []
        pages = [
            ledger_pb2.IngestBatchRequest(page=ledger_pb2.IngestPage(
                items=[ledger_pb2.IngestBatchRequest(purchase=r) for _, r in queued[first : first + INGEST_PAGE]]))
            for first in range(0, len(queued), INGEST_PAGE)
        ]  # fmt: skip
        response = await self._ingest(pages)
        for done in response.purchases:
            if done.replayed:
                self.duplicates += 1
                continue
            self.accepted += 1
            if done.status == ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL:
                self.pending += 1
        refused: list[tuple[LegacyPurchase, _Refusal]] = []
        for failure in response.failures:
            code = grpc.StatusCode[failure.code]
            text = f"{failure.field}: {failure.message}" if failure.field else failure.message
            if code not in REFUSAL_CODES:
                raise _Stopped(code, text)
            refused.append((queued[failure.index][0], _refused_as(code, failure.field, text)))
        return refused

    async def _ingest(self, pages: list[ledger_pb2.IngestBatchRequest]) -> ledger_pb2.IngestBatchResponse:
        """One stream, sent again when the ledger could not take it (the client channel retries
        unary calls only): every purchase in it is idempotent, so a resend replays what an
        earlier attempt posted (counted as duplicates) and posts the rest."""
        for delay in self.resend_delays:
            try:
                response: ledger_pb2.IngestBatchResponse = await self.ledger.IngestBatch(
                    iter(pages), timeout=BATCH_TIMEOUT_SECONDS
                )
                return response
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            await asyncio.sleep(delay)
        response = await self.ledger.IngestBatch(iter(pages), timeout=BATCH_TIMEOUT_SECONDS)
        return response

    async def return_(self, r: LegacyReturn) -> None:
        member_id = await self.member_of(r.member)
        with _unsendable():
            request = _return_request(r, member_id, self.channel)
        response = await self.ledger.RecordReturn(request)
        if response.replayed:
            self.duplicates += 1
        else:
            self.accepted += 1


def _purchase_request(p: LegacyPurchase, member_id: str, channel: str) -> ledger_pb2.RecordPurchaseRequest:
    return ledger_pb2.RecordPurchaseRequest(
        member_id=member_id, channel=p.channel or channel, store_id=p.store_id, receipt_id=p.receipt_id,
        total=common_pb2.Money(amount_minor=p.total_minor, currency=p.currency),
        lines=[
            ledger_pb2.PurchaseLine(
                sku=ln.sku, category=ln.category, quantity=ln.quantity,
                amount=common_pb2.Money(amount_minor=ln.amount_minor, currency=p.currency),
            )
            for ln in p.lines
        ],
        receipt_time=to_timestamp(p.receipt_time),
    )  # fmt: skip


def _return_request(r: LegacyReturn, member_id: str, channel: str) -> ledger_pb2.RecordReturnRequest:
    return ledger_pb2.RecordReturnRequest(
        idempotency_key=common_pb2.IdempotencyKey(namespace=RETURN_KEY_NAMESPACE, key=return_key(r, channel)),
        member_id=member_id, original_channel=r.original_channel or channel,
        original_store_id=r.original_store_id, original_receipt_id=r.original_receipt_id,
        channel=r.channel or channel, store_id=r.store_id,
        lines=[ledger_pb2.ReturnLine(line_index=ln.line_index, quantity=ln.quantity) for ln in r.lines],
        refund=(
            common_pb2.Money(amount_minor=r.refund_minor, currency=r.currency)
            if r.refund_minor is not None else None
        ),
        return_time=to_timestamp(r.return_time),
    )  # fmt: skip


@contextlib.contextmanager
def _unsendable(field: str = "") -> Iterator[None]:
    """A record the adapter read but no ledger request can carry (a number past its integer
    field, a time no Timestamp holds, text UTF-8 cannot encode) is refused like any bad record:
    quarantined, never a crash halfway through the file. Adapters refuse these by field first;
    this is the net behind them. `field` names the one value the request holds, if it is one."""
    try:
        yield
    except (ValueError, TypeError, OverflowError) as error:
        where = f"{field}: " if field else ""
        raise _Refused(_Refusal("PARSE", field, f"{where}cannot be sent to the ledger: {error}")) from None


def return_key(r: LegacyReturn, channel: str) -> str:
    """The return's own identity: where it happened, its slip, and the receipt it returns."""
    raw = "/".join(
        (
            "return", r.channel or channel, r.store_id, r.return_receipt_id,
            r.original_channel or channel, r.original_store_id, r.original_receipt_id,
        )
    )  # fmt: skip
    return raw if KEY_PATTERN.match(raw) else key_digest(raw)


def _refusal(error: grpc.aio.AioRpcError) -> _Refusal:
    """The ledger's refusal as a quarantine reason, naming the request field it blamed."""
    code = error.code()
    field = ""
    for detail in status_details(error):
        if isinstance(detail, error_details_pb2.ErrorInfo) and detail.metadata.get("field"):
            field = detail.metadata["field"]
        elif isinstance(detail, error_details_pb2.BadRequest) and detail.field_violations and not field:
            field = detail.field_violations[0].field
    return _refused_as(code, field, error.details() or "")


def _refused_as(code: grpc.StatusCode, field: str, details: str) -> _Refusal:
    """One wording for a refusal, whether a unary call's status or a batch item's failure said it."""
    where = f" on {field}" if field else ""
    return _Refusal(code.name, field, f"ledger refused ({code.name}{where}): {details}")


# Records an adapter parses per hop to a worker thread.
PARSE_CHUNK = 256


async def _parsed_off_the_loop(records: Iterable[Parsed]) -> AsyncIterator[Parsed]:
    """The records as the adapter parses them, on a worker thread a chunk at a time: reading a
    large file (tens of MB are seconds of CPU, the CSV adapter's first pass reads it whole) must
    not stop the gateway's event loop, where every till's request waits meanwhile. A list or
    tuple is parsed already."""
    if isinstance(records, list | tuple):
        for item in records:
            yield item
        return
    source = iter(records)
    while chunk := await asyncio.to_thread(lambda: list(itertools.islice(source, PARSE_CHUNK))):
        for item in chunk:
            yield item


async def import_records(
    records: Iterable[Parsed],
    ledger: ledger_pb2_grpc.LedgerServiceStub,
    *,
    adapter: str,
    channel: str,
    resend_delays: tuple[float, ...] = STREAM_RETRY_DELAYS,
) -> ImportReport:
    """Sends records in file order: runs of purchases in IngestBatch streams of up to
    PURCHASE_BATCH, each return after the purchases before it (so a return finds its purchase
    from the same file); `channel` is used wherever a record names none. A stream the ledger
    could not take is resent after each of `resend_delays` (none: an HTTP caller waiting on
    the import gets its 503 at once). Raises ImportInterrupted on a failure that is not about
    a record."""
    session = _Session(ledger, channel, resend_delays=resend_delays)
    quarantined: list[Quarantined] = []
    try:
        async for item in _parsed_off_the_loop(records):
            if isinstance(item, Quarantined):
                quarantined.append(item)
            elif isinstance(item, LegacyPurchase):
                quarantined.extend(await _sent(item, session.purchase))
                if len(session.queued) >= PURCHASE_BATCH:
                    quarantined.extend(await _sent_purchases(session))
            else:
                quarantined.extend(await _sent_purchases(session))
                quarantined.extend(await _sent(item, session.return_))
        quarantined.extend(await _sent_purchases(session))
    except _Stopped as stop:
        partial = _report(session, adapter, channel, quarantined)
        raise ImportInterrupted(
            stop.code, stop.message, retryable=stop.code in RETRYABLE_CODES, partial=partial
        ) from stop
    return _report(session, adapter, channel, quarantined)


async def _sent(item: Any, send: Callable[[Any], Awaitable[None]]) -> list[Quarantined]:
    """Sends (or queues) one record; its lines when the ledger refused it."""
    try:
        await send(item)
    except _Refused as refused:
        return _held_back(item, refused.refusal)
    except grpc.aio.AioRpcError as error:
        if error.code() in REFUSAL_CODES:
            return _held_back(item, _refusal(error))
        raise _Stopped(error.code(), error.details() or "") from error
    return []


async def _sent_purchases(session: _Session) -> list[Quarantined]:
    try:
        refused = await session.send_purchases()
    except grpc.aio.AioRpcError as error:
        raise _Stopped(error.code(), error.details() or "") from error
    return [line for purchase, refusal in refused for line in _held_back(purchase, refusal)]


def refused_lines(item: LegacyPurchase | LegacyReturn, error: grpc.aio.AioRpcError) -> list[Quarantined]:
    """Every source line of a record the ledger refused with `error` (one of REFUSAL_CODES),
    quarantined as an import quarantines a refused record: the ledger's code, field and reason."""
    return _held_back(item, _refusal(error))


def _held_back(item: LegacyPurchase | LegacyReturn, refusal: _Refusal) -> list[Quarantined]:
    return quarantine_all(item.origin, refusal.reason, code=refusal.code, field=refusal.field)


def _report(session: _Session, adapter: str, channel: str, quarantined: list[Quarantined]) -> ImportReport:
    # A line two records held back (a return slip naming two refused receipts) is listed once,
    # with the first reason: the list is what the quarantine file holds and ops re-import.
    once: dict[tuple[str, int], Quarantined] = {}
    for q in quarantined:
        once.setdefault((q.source, q.line), q)
    return ImportReport(
        adapter, channel, session.accepted, session.duplicates, session.pending,
        tuple(sorted(once.values(), key=lambda q: (q.source, q.line))),
    )  # fmt: skip


def write_quarantine(entries: Iterable[Quarantined], path: Path, *, adapter: str) -> int:
    """Appends one JSON line per entry and syncs it to disk; returns how many were written.
    Each run appends its own block, stamped with the time, so ops see every attempt."""
    at = datetime.now(UTC).isoformat(timespec="seconds")
    lines = [
        json.dumps(
            {
                "quarantined_at": at, "adapter": adapter, "file": q.source, "line": q.line, "code": q.code,
                "field": q.field, "reason": q.reason, "raw": q.raw,
            },
            ensure_ascii=False,
        )
        for q in entries
    ]  # fmt: skip
    if not lines:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
        out.flush()
        os.fsync(out.fileno())
    return len(lines)


def quarantine_path(quarantine_dir: Path, source: Path) -> Path:
    return quarantine_dir / f"{source.name}.quarantine.jsonl"


async def read_source(path: Path | str, adapter_name: str) -> tuple[Adapter, Path, list[Parsed]]:
    """The adapter by name and what it reads from the file (bad lines as Quarantined records);
    ValueError when the file cannot be read at all."""
    adapter = ADAPTERS.get(adapter_name)
    if adapter is None:
        raise ValueError(f"unknown adapter {adapter_name!r}; known: {', '.join(sorted(ADAPTERS))}")
    source = Path(path)
    data = await asyncio.to_thread(source.read_bytes)
    try:
        return adapter, source, list(adapter.parse(str(source), data))
    except (LookupError, ArithmeticError, RecursionError, TypeError, ValueError) as error:
        # An adapter quarantines bad data; one that raises instead has a bug. The file is read
        # whole before anything is sent, so nothing of it was imported: say so, not a traceback.
        raise ValueError(
            f"{source}: the {adapter.name} reader failed ({type(error).__name__}: {error}); nothing was imported"
        ) from error


async def import_file(
    path: Path | str,
    adapter_name: str,
    ledger_target: str,
    quarantine_dir: Path | str,
    channel: str | None = None,
) -> ImportReport:
    """`pointmesh legacy import FILE --adapter NAME`: parse, send, and write the quarantine file
    (only when the import finished; an interrupted import writes nothing and is simply re-run)."""
    adapter, source, records = await read_source(path, adapter_name)
    async with closing(ledger_stub(ledger_target)) as stub:
        report = await import_records(records, stub, adapter=adapter.name, channel=channel or adapter.default_channel)
    if not report.quarantined:
        return report
    target = quarantine_path(Path(quarantine_dir), source)
    await asyncio.to_thread(write_quarantine, report.quarantined, target, adapter=adapter.name)
    return replace(report, quarantine_file=target)
