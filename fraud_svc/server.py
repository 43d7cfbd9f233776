"""gRPC servicer for FraudService: protobuf in, use case, protobuf out. No policy here."""

from __future__ import annotations

from typing import Any

import grpc
from redis.exceptions import RedisError

from fraud_svc import domain as d
from fraud_svc.service import FraudService
from pointmesh.currencies import is_known
from pointmesh.errors import rich_status, translating
from pointmesh.timestamps import from_timestamp, to_timestamp
from pointmesh.v1 import common_pb2, fraud_pb2, fraud_pb2_grpc

DOMAIN = "fraud.pointmesh.dev"
KINDS = {
    fraud_pb2.SCORED_KIND_PURCHASE: d.TxKind.PURCHASE, fraud_pb2.SCORED_KIND_REDEMPTION: d.TxKind.REDEMPTION,
    fraud_pb2.SCORED_KIND_TRANSFER: d.TxKind.TRANSFER, fraud_pb2.SCORED_KIND_RETURN: d.TxKind.RETURN,
}  # fmt: skip
VERDICTS = {d.Verdict.ALLOW: fraud_pb2.VERDICT_ALLOW, d.Verdict.REVIEW: fraud_pb2.VERDICT_REVIEW,
            d.Verdict.DENY: fraud_pb2.VERDICT_DENY}  # fmt: skip


def error_status(error: d.FraudError) -> grpc.Status:
    code = (
        grpc.StatusCode.FAILED_PRECONDITION
        if isinstance(error, d.ModelUnavailable)
        else grpc.StatusCode.INVALID_ARGUMENT
    )
    text = f"{error.field}: {error.message}" if error.field else error.message
    return rich_status(code, text, reason=type(error).__name__, domain=DOMAIN, field=error.field)


translated = translating(d.FraudError, error_status)


def _velocity_down(error: Exception) -> grpc.Status:
    return rich_status(grpc.StatusCode.UNAVAILABLE, f"velocity state unavailable: {error}",
                       reason="VelocityUnavailable", domain=DOMAIN)  # fmt: skip


# The velocity Redis away fails every request alike: an outage (UNAVAILABLE), which the ledger
# waits out under its policy, not a failure of the one request (UNKNOWN), which it counts
# against that request and would drop a kept observation for.
velocity_outage = translating((RedisError, OSError, TimeoutError), _velocity_down)


def _time(message: Any, field: str, path: str, *, required: bool = False) -> Any:
    if not message.HasField(field):
        if required:
            raise d.BadRequest("is required", field=path)
        return None
    try:
        return from_timestamp(getattr(message, field))
    except ValueError as exc:
        raise d.BadRequest(str(exc), field=path) from None


def _currency(amount: common_pb2.Money, path: str) -> None:
    """An amount is compared across transactions in its currency: an ISO 4217 one, or none for
    no amount at all."""
    if amount.currency and not is_known(amount.currency):
        raise d.BadRequest(f"{amount.currency!r} is not an ISO 4217 code", field=f"{path}.currency")
    if not amount.currency and amount.amount_minor:
        raise d.BadRequest(f"is required with an amount ({amount.amount_minor} minor units)", field=f"{path}.currency")


def context(t: fraud_pb2.ScoredTransaction, path: str = "transaction") -> d.TxContext:
    kind = KINDS.get(t.kind)
    if kind is None:
        raise d.BadRequest("must be purchase, redemption, transfer or return", field=f"{path}.kind")
    _currency(t.amount, f"{path}.amount")
    return d.TxContext(
        event_id=t.event_id, kind=kind, member_id=t.member_id,
        occurred_at=_time(t, "occurred_at", f"{path}.occurred_at", required=True), channel=t.channel,
        store_id=t.store_id, amount_minor=t.amount.amount_minor, currency=t.amount.currency, points=t.points,
        device_id=t.device_id, ip=t.ip, card_hash=t.card_hash, employee_card=t.employee_card,
        counterparty_member_id=t.counterparty_member_id,
        contact_changed_at=_time(t, "contact_changed_at", f"{path}.contact_changed_at"),
        member_since=_time(t, "member_since", f"{path}.member_since"), balance_points=t.balance_points,
    )  # fmt: skip


def context_pb(c: d.TxContext) -> fraud_pb2.ScoredTransaction:
    """The inverse of `context`, for clients that hold domain events (replays, benchmarks)."""
    return fraud_pb2.ScoredTransaction(
        event_id=c.event_id, kind=next(k for k, v in KINDS.items() if v is c.kind), member_id=c.member_id,
        occurred_at=to_timestamp(c.occurred_at), channel=c.channel, store_id=c.store_id,
        amount=common_pb2.Money(amount_minor=c.amount_minor, currency=c.currency) if c.currency else None,
        points=c.points, device_id=c.device_id, ip=c.ip, card_hash=c.card_hash, employee_card=c.employee_card,
        counterparty_member_id=c.counterparty_member_id,
        contact_changed_at=to_timestamp(c.contact_changed_at) if c.contact_changed_at else None,
        member_since=to_timestamp(c.member_since) if c.member_since else None, balance_points=c.balance_points,
    )  # fmt: skip


def activity(a: fraud_pb2.MemberActivity) -> d.MemberActivity:
    return d.MemberActivity(
        member_id=a.member_id, member_since=_time(a, "member_since", "activity.member_since"),
        last_purchase_at=_time(a, "last_purchase_at", "activity.last_purchase_at"), purchases_30d=a.purchases_30d,
        purchases_90d=a.purchases_90d, purchases_365d=a.purchases_365d, spend_90d_minor=a.spend_90d_minor,
        balance_points=a.balance_points, last_redemption_at=_time(a, "last_redemption_at", "activity.last_redemption_at"),
        segment=a.segment, tier=a.tier,
    )  # fmt: skip


def reason_pb(r: d.Reason) -> fraud_pb2.ScoreReason:
    return fraud_pb2.ScoreReason(code=r.code, text=r.text, weight=r.weight)


def decision_pb(x: d.Decision) -> fraud_pb2.ScoreResponse:
    return fraud_pb2.ScoreResponse(
        event_id=x.event_id, verdict=VERDICTS[x.verdict], score=x.score, reasons=[reason_pb(r) for r in x.reasons],
        model_version=x.model_version,
    )  # fmt: skip


class FraudServicer(fraud_pb2_grpc.FraudServiceServicer):
    def __init__(self, service: FraudService, now: Any) -> None:
        self.service = service
        self.now = now

    @velocity_outage
    @translated
    async def Score(
        self, request: fraud_pb2.ScoreRequest, context_: grpc.aio.ServicerContext
    ) -> fraud_pb2.ScoreResponse:
        return decision_pb(await self.service.score(context(request.transaction)))

    @velocity_outage
    @translated
    async def ScoreBatch(
        self, request: fraud_pb2.ScoreBatchRequest, context_: grpc.aio.ServicerContext
    ) -> fraud_pb2.ScoreBatchResponse:
        items: list[d.TxContext | d.FraudError] = []
        for i, t in enumerate(request.transactions):
            try:
                items.append(context(t, f"transactions[{i}]"))
            except d.FraudError as error:
                items.append(error)
        out = fraud_pb2.ScoreBatchResponse()
        for result in await self.service.score_batch(items):
            if isinstance(result, d.FraudError):
                # a row fraud_svc itself failed on is its fault, not the caller's: flagged so the
                # ledger does not take it for a refusal
                internal = isinstance(result, d.RowFailed)
                out.items.append(fraud_pb2.ScoreBatchItem(error=f"{result.field}: {result.message}", internal=internal))
            else:
                out.items.append(fraud_pb2.ScoreBatchItem(result=decision_pb(result)))
        return out

    def _as_of(self, request: Any) -> Any:
        return _time(request, "as_of", "as_of") or self.now()

    @translated
    async def ChurnScore(
        self, request: fraud_pb2.ChurnScoreRequest, context_: grpc.aio.ServicerContext
    ) -> fraud_pb2.ChurnScoreResponse:
        p = self.service.churn_score(activity(request.activity), self._as_of(request))
        return fraud_pb2.ChurnScoreResponse(member_id=p.member_id, probability=p.probability,
                                            factors=[reason_pb(r) for r in p.factors], model_version=p.model_version)  # fmt: skip

    @translated
    async def Offers(
        self, request: fraud_pb2.OffersRequest, context_: grpc.aio.ServicerContext
    ) -> fraud_pb2.OffersResponse:
        p, chosen = self.service.offers(activity(request.activity), self._as_of(request))
        return fraud_pb2.OffersResponse(
            member_id=p.member_id, churn_probability=p.probability,
            offers=[fraud_pb2.Offer(offer_id=c.offer.offer_id, title=c.offer.title, bonus_points=c.offer.bonus_points,
                                    expected_value_points=c.expected_value_points, explanation=c.explanation)
                    for c in chosen],
        )  # fmt: skip

    @translated
    async def ReloadModel(
        self, request: fraud_pb2.ReloadModelRequest, context_: grpc.aio.ServicerContext
    ) -> fraud_pb2.ReloadModelResponse:
        version, previous = await self.service.reload(request.model, request.path)
        return fraud_pb2.ReloadModelResponse(model=request.model, version=version, previous_version=previous)
