"""gRPC servicer for LedgerService: protobuf in, use case, protobuf out. No policy here."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import Message

from ledger_svc import commands as c
from ledger_svc import convert as cv
from ledger_svc import domain as d
from ledger_svc.purchases import PurchaseRecord
from ledger_svc.service import LedgerService
from pointmesh.consumers import check_schema
from pointmesh.errors import rich_status, translating
from pointmesh.events import LEDGER_EVENTS, BusMessage, EventBus
from pointmesh.tier_status import tier_status_pb
from pointmesh.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc, rules_pb2

log = logging.getLogger(__name__)
DOMAIN = "ledger.pointmesh.dev"
INGEST_CHUNK = 500
# What an IngestBatch answer lists at most (ledger.proto): the answer of a long stream must fit
# in one gRPC message (16 MiB), and the server holds it until the stream ends. A failure's
# message quotes the item (a whole row in a member id column), so it is cut too.
MAX_LISTED_BYTES = 12 * 2**20
MAX_FAILURE_MESSAGE = 1_000
# Event watches one ledger process serves at once. Each holds a connection of the process's one
# bus client while Redis blocks its read, and the outbox relay publishes through that client:
# past its pool (pointmesh/redis_client.py BUS_CONNECTIONS) a flood of watches would stall every
# event the ledger publishes. Members watch through a gateway's live stream, which reads the bus.
MAX_WATCHES = 1_024

# The one table from domain errors to gRPC codes; most specific class first.
ERROR_CODES: tuple[tuple[type[d.LedgerError], grpc.StatusCode], ...] = (
    (d.IdempotencyConflict, grpc.StatusCode.ALREADY_EXISTS),
    (d.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (d.NotFound, grpc.StatusCode.NOT_FOUND),
    (d.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (d.Unavailable, grpc.StatusCode.UNAVAILABLE),
)


def grpc_code(error: d.LedgerError) -> grpc.StatusCode:
    for cls, code in ERROR_CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def error_status(error: d.LedgerError) -> grpc.Status:
    details: list[Message] = []
    if isinstance(error, d.InsufficientPoints):
        details.append(common_pb2.InsufficientPoints(
            member_id=error.member_id, unit=error.unit, available_points=error.available, requested_points=error.requested,
        ))  # fmt: skip
    if isinstance(error, d.IdempotencyConflict):
        details.append(common_pb2.IdempotencyConflict(
            namespace=error.namespace, key=error.key, original_operation=error.original_operation,
            first_seen_at=cv.ts(error.first_seen_at),
        ))  # fmt: skip
    text = f"{error.field}: {error.message}" if error.field else error.message
    return rich_status(
        grpc_code(error), text, reason=error.code, domain=DOMAIN, field=error.field,
        metadata=error.metadata, details=details,
    )  # fmt: skip


translated = translating(d.LedgerError, error_status)


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, service: LedgerService, bus: EventBus | None) -> None:
        self.service = service
        self.bus = bus
        self.watches = 0

    @translated
    async def CreateMember(
        self, request: ledger_pb2.CreateMemberRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.CreateMemberResponse:
        cmd = c.CreateMember(
            cv.key(request), tuple(cv.external_id(e) for e in request.external_ids), dict(request.profile)
        )
        return ledger_pb2.CreateMemberResponse(member=cv.member_pb(await self.service.create_member(cmd)))

    @translated
    async def GetMember(
        self, request: ledger_pb2.GetMemberRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.GetMemberResponse:
        return ledger_pb2.GetMemberResponse(member=cv.member_pb(await self.service.get_member(request.member_id)))

    @translated
    async def GetMemberTier(
        self, request: ledger_pb2.GetMemberTierRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.GetMemberTierResponse:
        program, version, standing = await self.service.accrual.member_tier(request.member_id)
        return ledger_pb2.GetMemberTierResponse(status=tier_status_pb(program, version, standing))

    @translated
    async def LookupMember(
        self, request: ledger_pb2.LookupMemberRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.LookupMemberResponse:
        member = await self.service.lookup_member(cv.external_id(request.external_id))
        return ledger_pb2.LookupMemberResponse(member=cv.member_pb(member))

    @translated
    async def BlockMember(
        self, request: ledger_pb2.BlockMemberRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.BlockMemberResponse:
        member = await self.service.set_blocked(
            c.SetMemberBlocked(cv.key(request), request.member_id, True, request.reason)
        )
        return ledger_pb2.BlockMemberResponse(member=cv.member_pb(member))

    @translated
    async def UnblockMember(
        self, request: ledger_pb2.UnblockMemberRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.UnblockMemberResponse:
        member = await self.service.set_blocked(
            c.SetMemberBlocked(cv.key(request), request.member_id, False, request.reason)
        )
        return ledger_pb2.UnblockMemberResponse(member=cv.member_pb(member))

    @translated
    async def MergeMembers(
        self, request: ledger_pb2.MergeMembersRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.MergeMembersResponse:
        cmd = c.MergeMembers(cv.key(request), request.source_member_id, request.target_member_id)
        result = await self.service.merge_members(cmd)
        return ledger_pb2.MergeMembersResponse(target=cv.member_pb(result.target), moved_points=result.moved_points)

    @translated
    async def EraseMember(
        self, request: ledger_pb2.EraseMemberRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.EraseMemberResponse:
        member = await self.service.erase_member(c.EraseMember(cv.key(request), request.member_id))
        return ledger_pb2.EraseMemberResponse(member=cv.member_pb(member))

    @translated
    async def Earn(self, request: ledger_pb2.EarnRequest, context: grpc.aio.ServicerContext) -> ledger_pb2.EarnResponse:
        result = await self.service.earn(cv.earn_cmd(request))
        return ledger_pb2.EarnResponse(
            transaction=cv.transaction_pb(result.transaction), lot_id=result.lot_id, pending=result.pending
        )

    @translated
    async def Redeem(
        self, request: ledger_pb2.RedeemRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.RedeemResponse:
        return cv.redeem_pb(await self.service.redeem(cv.redeem_cmd(request)))

    @translated
    async def PlaceHold(
        self, request: ledger_pb2.PlaceHoldRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.PlaceHoldResponse:
        result = await self.service.place_hold(cv.hold_cmd(request))
        return ledger_pb2.PlaceHoldResponse(
            hold=cv.hold_pb(result.hold), balance_after=cv.balance_pb(result.balance_after),
            screening=cv.screening_pb(result.screening), capture_transaction_id=result.capture_transaction_id,
        )  # fmt: skip

    @translated
    async def CaptureHold(
        self, request: ledger_pb2.CaptureHoldRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.CaptureHoldResponse:
        result = await self.service.capture_hold(c.CaptureHold(cv.key(request), request.hold_id, request.points))
        assert result.transaction is not None
        return ledger_pb2.CaptureHoldResponse(
            hold=cv.hold_pb(result.hold), transaction=cv.transaction_pb(result.transaction),
            balance_after=cv.balance_pb(result.balance_after),
        )  # fmt: skip

    @translated
    async def VoidHold(
        self, request: ledger_pb2.VoidHoldRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.VoidHoldResponse:
        result = await self.service.void_hold(c.VoidHold(cv.key(request), request.hold_id))
        return ledger_pb2.VoidHoldResponse(
            hold=cv.hold_pb(result.hold), balance_after=cv.balance_pb(result.balance_after)
        )

    @translated
    async def RecordPurchase(
        self, request: ledger_pb2.RecordPurchaseRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.RecordPurchaseResponse:
        record, replayed = await self.service.accrual.record_purchase(cv.purchase_cmd(request))
        return ledger_pb2.RecordPurchaseResponse(purchase=cv.purchase_pb(record), replayed=replayed)

    @translated
    async def RecordReturn(
        self, request: ledger_pb2.RecordReturnRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.RecordReturnResponse:
        purchase_id = request.purchase_id or await self.service.accrual.find_purchase(
            request.member_id, request.original_channel, request.original_store_id, request.original_receipt_id
        )
        result, replayed = await self.service.accrual.record_return(cv.return_cmd(request, purchase_id))
        return ledger_pb2.RecordReturnResponse(
            purchase=cv.purchase_pb(result.purchase),
            reversed=[rules_pb2.UnitPoints(unit=u, points=n) for u, n in result.reversed.items()],
            tender_recredited_points=result.tender_recredited, debt_points=result.debt_points, replayed=replayed,
        )  # fmt: skip

    @translated
    async def GetPurchase(
        self, request: ledger_pb2.GetPurchaseRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.GetPurchaseResponse:
        return ledger_pb2.GetPurchaseResponse(
            purchase=cv.purchase_pb(await self.service.accrual.get_purchase(request.purchase_id))
        )

    @translated
    async def ListPurchases(
        self, request: ledger_pb2.ListPurchasesRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.ListPurchasesResponse:
        start = cv.required_time(request, "receipt_time_from")
        end = cv.required_time(request, "receipt_time_until")
        purchases, token = await self.service.accrual.list_purchases(
            request.channel, request.store_id, start, end, request.page_size, request.page_token
        )
        return ledger_pb2.ListPurchasesResponse(purchases=[cv.purchase_pb(p) for p in purchases], next_page_token=token)

    @translated
    async def GetTotals(
        self, request: ledger_pb2.GetTotalsRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.GetTotalsResponse:
        as_of, found = await self.service.totals(fresh=request.fresh)
        return ledger_pb2.GetTotalsResponse(
            as_of=cv.ts(as_of), differences=len(found.differences), held_points=found.held_points,
            totals=[ledger_pb2.AccountClassTotal(account_class=k, points=v)
                    for k, v in found.totals_by_account_class.items()],
            unchecked=found.unchecked,
        )  # fmt: skip

    @translated
    async def GetHold(
        self, request: ledger_pb2.GetHoldRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.GetHoldResponse:
        return ledger_pb2.GetHoldResponse(hold=cv.hold_pb(await self.service.get_hold(request.hold_id)))

    @translated
    async def Reverse(
        self, request: ledger_pb2.ReverseRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.ReverseResponse:
        result = await self.service.reverse(cv.reverse_cmd(request))
        return ledger_pb2.ReverseResponse(
            transaction=cv.transaction_pb(result.transaction),
            reversed_points=result.reversed_points,
            debt_points=result.debt_points,
        )

    @translated
    async def Transfer(
        self, request: ledger_pb2.TransferRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.TransferResponse:
        result = await self.service.transfer(cv.transfer_cmd(request))
        return cv.transfer_pb(result)

    @translated
    async def Adjust(
        self, request: ledger_pb2.AdjustRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.AdjustResponse:
        return ledger_pb2.AdjustResponse(
            transaction=cv.transaction_pb(await self.service.adjust(cv.adjust_cmd(request)))
        )

    @translated
    async def ReleasePending(
        self, request: ledger_pb2.ReleasePendingRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.ReleasePendingResponse:
        tx = await self.service.release_pending(c.ReleasePending(cv.key(request), request.transaction_id))
        return ledger_pb2.ReleasePendingResponse(transaction=cv.transaction_pb(tx))

    @translated
    async def RunExpiry(
        self, request: ledger_pb2.RunExpiryRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.RunExpiryResponse:
        r = await self.service.run_maintenance()
        return ledger_pb2.RunExpiryResponse(
            expired_points=r.expired_points, lots_expired=r.lots_expired, pending_released=r.pending_released,
            holds_voided=r.holds_voided, sagas_completed=r.sagas_completed, tiers_changed=r.tiers_changed,
        )  # fmt: skip

    @translated
    async def GetBalance(
        self, request: ledger_pb2.GetBalanceRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.GetBalanceResponse:
        read = self.service.spendable_balance if request.for_spending else self.service.get_balance
        balance = await read(request.member_id, request.unit)
        return ledger_pb2.GetBalanceResponse(balance=cv.balance_pb(balance))

    @translated
    async def ListEntries(
        self, request: ledger_pb2.ListEntriesRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.ListEntriesResponse:
        page = await self.service.list_entries(
            request.member_id, request.unit, request.page.page_size, request.page.page_token
        )
        return ledger_pb2.ListEntriesResponse(
            entries=[cv.entry_pb(e) for e in page.entries], next_page_token=page.next_page_token
        )

    async def WatchEvents(
        self, request: ledger_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ledger_pb2.WatchEventsResponse]:
        if request.member_id and not d.is_valid_id(request.member_id, "m"):
            await context.abort_with_status(error_status(d.InvalidArgument("is not a member id", field="member_id")))
        if self.bus is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the event bus is not configured")
            return
        if self.watches >= MAX_WATCHES:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"this ledger process serves {MAX_WATCHES} event "
                                "watches already, the most it serves at once: retry later, or watch a member "
                                "through the gateway's live stream")  # fmt: skip
        self.watches += 1
        try:
            async with contextlib.aclosing(self._watch(self.bus, request, context)) as watch:
                async for response in watch:
                    yield response
        finally:
            self.watches -= 1

    async def _watch(
        self, bus: EventBus, request: ledger_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[ledger_pb2.WatchEventsResponse, None]:
        messages = bus.subscribe(LEDGER_EVENTS, request.after_position or "$")
        read = request.after_position  # the position to resume from: the last one read, shown or not
        try:
            first = await anext(messages)
        except ValueError as exc:  # a position this bus never gave
            await context.abort_with_status(error_status(d.InvalidArgument(str(exc), field="after_position")))
            return
        except Exception as exc:  # the bus unreachable: a code clients retry, not UNKNOWN
            await context.abort(grpc.StatusCode.UNAVAILABLE, _bus_away(exc, read))
            return
        try:
            async for message in _chained(first, messages):
                read = message.position
                if request.member_id and message.key != request.member_id:
                    continue
                try:
                    check_schema(message)
                    event = ledger_pb2.LedgerEvent.FromString(message.payload)
                except Exception as exc:  # one unreadable event must not end (and re-end) every watch
                    log.warning("WatchEvents skips %s event %s at %s: %s", message.event_type, message.event_id,
                                message.position, exc)  # fmt: skip
                    continue
                yield ledger_pb2.WatchEventsResponse(event=event, position=message.position)
        except Exception as exc:  # (a Redis restart): the client watches again from where it was
            await context.abort(grpc.StatusCode.UNAVAILABLE, _bus_away(exc, read))

    @translated
    async def IngestBatch(
        self, request_iterator: AsyncIterator[ledger_pb2.IngestBatchRequest], context: grpc.aio.ServicerContext
    ) -> ledger_pb2.IngestBatchResponse:
        answer = _IngestAnswer()
        chunk: list[c.PostingCommand | c.RecordPurchase | d.LedgerError] = []
        async for message in request_iterator:
            paged = message.WhichOneof("operation") == "page"
            for item in message.page.items if paged else (message,):
                chunk.append(_ingest_item(item))
                if len(chunk) >= INGEST_CHUNK:
                    await self._ingest_chunk(chunk, answer)
                    chunk = []
        if chunk:
            await self._ingest_chunk(chunk, answer)
        return answer.summary

    async def _ingest_chunk(
        self, chunk: list[c.PostingCommand | c.RecordPurchase | d.LedgerError], answer: _IngestAnswer
    ) -> None:
        summary = answer.summary
        offset = summary.received
        results = await self.service.ingest(chunk)
        summary.received += len(chunk)
        for i, outcome in enumerate(results):
            if isinstance(outcome, d.LedgerError):
                summary.failed += 1
                answer.add(summary.failures, ledger_pb2.IngestFailure(
                    index=offset + i, code=grpc_code(outcome).name, message=outcome.message[:MAX_FAILURE_MESSAGE],
                    field=outcome.field[:MAX_FAILURE_MESSAGE],
                ))  # fmt: skip
                continue
            if outcome[1]:
                summary.replayed += 1
            else:
                summary.posted += 1
            if isinstance(outcome[0], PurchaseRecord):
                answer.add(summary.purchases, cv.ingested_pb(offset + i, outcome[0], outcome[1]))

    @translated
    async def ListReviews(
        self, request: ledger_pb2.ListReviewsRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.ListReviewsResponse:
        reviews, token = await self.service.list_reviews(
            cv.review_status(request.status), request.member_id, request.page_size, request.page_token
        )
        return ledger_pb2.ListReviewsResponse(reviews=[cv.review_pb(r) for r in reviews], next_page_token=token)

    @translated
    async def DecideReview(
        self, request: ledger_pb2.DecideReviewRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.DecideReviewResponse:
        cmd = c.DecideReview(cv.key(request), request.review_id, request.approve, request.operator_id, request.note)
        return ledger_pb2.DecideReviewResponse(review=cv.review_pb(await self.service.decide_review(cmd)))


def _ingest_item(item: ledger_pb2.IngestBatchRequest) -> c.PostingCommand | c.RecordPurchase | d.LedgerError:
    if item.WhichOneof("operation") == "page":
        return d.InvalidArgument("a page may only hold items, not another page", field="page")
    try:
        cmd = cv.ingest_cmd(item)
    except d.LedgerError as error:
        return error
    if cmd is None:
        return d.InvalidArgument("set one of earn, redeem, adjust, reverse, purchase, page", field="operation")
    return cmd


def _bus_away(exc: Exception, read: str) -> str:
    log.warning("WatchEvents: the event bus failed (%s: %s)", type(exc).__name__, exc)
    resume = f"watch again with after_position={read}" if read else "watch again"
    return f"the event bus is unreachable ({type(exc).__name__}); {resume}"


async def _chained(first: BusMessage, rest: AsyncIterator[BusMessage]) -> AsyncIterator[BusMessage]:
    yield first
    async for message in rest:
        yield message


class _IngestAnswer:
    """An IngestBatch answer being built: entries are listed while they fit in MAX_LISTED_BYTES,
    the counts are kept whole."""

    def __init__(self) -> None:
        self.summary = ledger_pb2.IngestBatchResponse()
        self.room = MAX_LISTED_BYTES

    def add(self, entries: Any, entry: Message) -> None:
        size = entry.ByteSize() + 8  # the entry's tag and length besides
        if size > self.room:
            self.summary.truncated = True
            return
        self.room -= size
        entries.append(entry)
