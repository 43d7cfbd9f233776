"""The ledger's view of fraud_svc: a Screener over gRPC with a deadline.

Any failure (down, slow, overloaded, or a request fraud_svc refused) becomes
ScreenerUnavailable, so the per-operation policy decides and the posting records that it was
unscored; a customer's purchase never fails because scoring did.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import grpc

from ledger_svc.screening import (
    ScreenedKind,
    ScreenerRefused,
    ScreenerUnavailable,
    Screening,
    ScreeningRequest,
    Verdict,
)
from pointmesh.clients import fraud_stub
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import common_pb2, fraud_pb2

log = logging.getLogger(__name__)

_KIND = {
    ScreenedKind.PURCHASE: fraud_pb2.SCORED_KIND_PURCHASE,
    ScreenedKind.REDEMPTION: fraud_pb2.SCORED_KIND_REDEMPTION,
    ScreenedKind.TRANSFER: fraud_pb2.SCORED_KIND_TRANSFER,
    ScreenedKind.RETURN: fraud_pb2.SCORED_KIND_RETURN,
}
_VERDICT = {
    fraud_pb2.VERDICT_ALLOW: Verdict.ALLOW,
    fraud_pb2.VERDICT_REVIEW: Verdict.REVIEW,
    fraud_pb2.VERDICT_DENY: Verdict.DENY,
}


def scored_transaction(r: ScreeningRequest) -> fraud_pb2.ScoredTransaction:
    ctx = r.context
    return fraud_pb2.ScoredTransaction(
        event_id=r.event_id, kind=_KIND[r.kind], member_id=r.member_id, occurred_at=to_timestamp(r.occurred_at),
        channel=ctx.channel, store_id=ctx.store_id,
        amount=common_pb2.Money(amount_minor=r.amount.amount_minor, currency=r.amount.currency) if r.amount else None,
        points=r.points, device_id=ctx.device_id, ip=ctx.ip, card_hash=ctx.card_hash, employee_card=ctx.employee_card,
        contact_changed_at=to_timestamp(ctx.contact_changed_at) if ctx.contact_changed_at else None,
        member_since=to_timestamp(r.member_since) if r.member_since else None, balance_points=r.balance_points,
        counterparty_member_id=r.counterparty_member_id,
    )  # fmt: skip


class FraudScreenerClient:
    def __init__(self, target: str, deadline_seconds: float, batch_deadline_seconds: float) -> None:
        self.stub = fraud_stub(target, default_timeout_seconds=deadline_seconds)
        self.batch_deadline = batch_deadline_seconds

    async def screen(self, request: ScreeningRequest) -> Screening:
        try:
            response = await self.stub.Score(fraud_pb2.ScoreRequest(transaction=scored_transaction(request)))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                log.error("fraud_svc refused the ledger's score request %s: %s", request.event_id, error.details())
                raise ScreenerRefused(error.details() or "") from None
            raise _unavailable(error) from None
        return _screening(response)

    async def screen_many(self, requests: Sequence[ScreeningRequest]) -> list[Screening | ScreenerUnavailable]:
        """One ScoreBatch, in the given (event-time) order; a row fraud_svc could not score
        comes back as ScreenerUnavailable for the policy to decide: ScreenerRefused if it was
        refused as invalid, a plain one (not an outage) if fraud_svc failed on it, as on Score."""
        batch = fraud_pb2.ScoreBatchRequest(transactions=[scored_transaction(r) for r in requests])
        try:
            response = await self.stub.ScoreBatch(batch, timeout=self.batch_deadline)
        except grpc.aio.AioRpcError as error:
            raise _unavailable(error) from None
        if len(response.items) != len(requests):
            raise ScreenerUnavailable(f"fraud_svc answered {len(response.items)} rows for {len(requests)}")
        out: list[Screening | ScreenerUnavailable] = []
        for request, item in zip(requests, response.items, strict=True):
            if item.HasField("result"):
                try:
                    out.append(_screening(item.result))
                except ScreenerUnavailable as exc:
                    out.append(exc)
            elif item.internal:  # as Score answering INTERNAL for this one transaction
                log.warning("fraud_svc failed on the ledger's score request %s: %s", request.event_id, item.error)
                out.append(ScreenerUnavailable(f"INTERNAL: {item.error}", outage=False))
            else:
                log.error("fraud_svc refused the ledger's score request %s: %s", request.event_id, item.error)
                out.append(ScreenerRefused(item.error))
        return out


def _screening(response: fraud_pb2.ScoreResponse) -> Screening:
    verdict = _VERDICT.get(response.verdict)
    if verdict is None:
        raise ScreenerUnavailable(f"fraud_svc answered verdict {response.verdict}")
    if not math.isfinite(response.score):  # kept in the purchase's JSON record, which has no NaN
        raise ScreenerUnavailable(f"fraud_svc answered score {response.score}")
    return Screening(verdict, True, response.score, tuple(r.code for r in response.reasons), response.model_version)


# fraud_svc's own failures, whatever it is asked: down, too slow, overloaded, no model loaded.
_OUTAGES = frozenset({
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
})  # fmt: skip


def _unavailable(error: grpc.aio.AioRpcError) -> ScreenerUnavailable:
    return ScreenerUnavailable(f"{error.code().name}: {error.details()}", outage=error.code() in _OUTAGES)
