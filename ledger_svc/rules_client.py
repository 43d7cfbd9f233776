"""The ledger's view of rules_svc: a PointsEngine over gRPC, translating both ways.

Deadline-bound; a rules_svc that is down, overloaded or slow becomes EngineUnavailable (the
purchase waits as pending accrual), while a basket rules_svc refuses becomes the ledger's own
InvalidArgument/FailedPrecondition naming the request field. A basket rules_svc fails on
(UNKNOWN/INTERNAL for it alone: a bug that basket trips) becomes EngineFailedOnBasket: the
purchase waits for a fixed engine, but, unlike an outage, the breaker stays closed and the
waiting queue goes on with other members. EvaluateBatch reports per item, which tells the two
apart; a unary Evaluate that fails that way is asked once more as a batch of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import grpc
from google.rpc import error_details_pb2

from ledger_svc import commands as c
from ledger_svc.accrual import EngineFailedOnBasket, EngineUnavailable
from ledger_svc.domain import FailedPrecondition, InvalidArgument, LedgerError, Money
from ledger_svc.purchases import MemberState, Part, Quote
from pointmesh.bounds import MAX_POINTS
from pointmesh.clients import rules_stub
from pointmesh.errors import purchase_field, status_details
from pointmesh.guards import Guard
from pointmesh.tier_status import tier_standing_of
from pointmesh.tiers import TierPolicy, TierStanding
from pointmesh.timestamps import from_timestamp, to_timestamp
from pointmesh.v1 import common_pb2, rules_pb2

# Codes that say rules_svc (or the way to it) is down or overloaded, not that a basket is bad.
OUTAGE_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED"})
FAILED_ON_BASKET = frozenset({"UNKNOWN", "INTERNAL"})


def evaluate_request(
    program: str, cmd: c.RecordPurchase, state: MemberState, profile: dict[str, str]
) -> rules_pb2.EvaluateRequest:
    currency = cmd.total.currency
    segments = [s for s in profile.get("segments", "").split(",") if s]
    return rules_pb2.EvaluateRequest(
        program=program,
        basket=rules_pb2.Basket(
            channel=cmd.channel, store_id=cmd.store_id, receipt_id=cmd.receipt_id,
            total=common_pb2.Money(amount_minor=cmd.total.amount_minor, currency=currency),
            lines=[
                rules_pb2.BasketLine(sku=ln.sku, category=ln.category, quantity=ln.quantity,
                                     amount=common_pb2.Money(amount_minor=ln.amount_minor, currency=currency))
                for ln in cmd.lines
            ],
            receipt_time=to_timestamp(cmd.receipt_time),
        ),
        member=rules_pb2.MemberContext(
            member_id=cmd.member_id, segments=segments,
            attributes={k: val for k, val in profile.items() if k != "segments"},
            purchase_count=state.purchase_count, qualification=state.qualification,
        ),
    )  # fmt: skip


def quote_of(e: rules_pb2.Evaluation) -> Quote:
    parts = tuple(
        Part(
            p.rule_id,
            p.unit,
            p.points,
            p.line_index,
            p.detail,
            tuple(p.matched),
            p.capped,
            Guard(p.guard.counter, p.guard.limit, p.guard.ordinal_equals, p.guard.ordinal_every)
            if p.HasField("guard")
            else None,
            p.basket_threshold_minor,
            p.fixed_bonus,
            tuple((m.line_index, m.points) for m in p.multiplied_lines),
        )
        for p in e.parts
    )
    tiers = e.tier_policy if e.HasField("tier_policy") else None
    policy = (
        TierPolicy(tiers.metric_unit, tiers.window, tiers.downgrade_grace_days,
                   tuple((t.code, t.threshold) for t in tiers.levels), tiers.timezone or "UTC")
        if tiers is not None else None
    )  # fmt: skip
    for unit, points in _unit_totals(parts).items():
        if points > MAX_POINTS:  # a rules_svc of before its own bound: refused, not posted
            raise InvalidArgument(f"earns {points} {unit}; a purchase may earn at most {MAX_POINTS}", field="total")
    return Quote(
        e.program, e.version, parts, e.fx_rate,
        from_timestamp(e.expires_at) if e.HasField("expires_at") else None,
        from_timestamp(e.release_at) if e.HasField("release_at") else None,
        e.max_lateness_days, e.basket_bonus_on_return, e.tier, policy, dict(e.experiment_arms), not e.ignores_purchase_count,
        Money(e.base_total.amount_minor, e.base_total.currency) if e.HasField("base_total") else None,
    )  # fmt: skip


def _unit_totals(parts: Sequence[Part]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for part in parts:
        totals[part.unit] = totals.get(part.unit, 0) + abs(part.points)
    return totals


def _failure(error: grpc.aio.AioRpcError) -> LedgerError | EngineUnavailable:
    """A failed call that is not about one basket: rules_svc's refusal, or rules_svc away."""
    refusal = _refusal(error.code().name, (error.details() or "").split(": ", 1)[-1], "")
    return refusal if refusal is not None else EngineUnavailable(f"{error.code().name}: {error.details()}")


def _refusal(code: str, message: str, field: str) -> LedgerError | None:
    """rules_svc refusing a basket, as the ledger's own error; None when it is not a refusal."""
    if code == "INVALID_ARGUMENT":
        return InvalidArgument(message, field=field)
    if code in ("FAILED_PRECONDITION", "NOT_FOUND"):
        return FailedPrecondition(f"rules_svc: {message}", field=field)
    return None


def _item_outcome(code: str, message: str, field: str) -> LedgerError | EngineFailedOnBasket | None:
    """One batch item's error: a refusal, a failure on that basket (it waits, but it is not
    rules_svc being down), or None for an outage code (asked again on the unary path)."""
    refusal = _refusal(code, message, field)
    if refusal is not None or code in OUTAGE_CODES:
        return refusal
    return EngineFailedOnBasket(f"rules_svc could not evaluate the basket ({code}): {message}")


class RulesEngineClient:
    def __init__(self, target: str, deadline_seconds: float, batch_deadline_seconds: float) -> None:
        self.stub = rules_stub(target, default_timeout_seconds=deadline_seconds)
        self.batch_deadline = batch_deadline_seconds

    async def quote(self, program: str, cmd: c.RecordPurchase, state: MemberState, profile: dict[str, str]) -> Quote:
        try:
            response = await self.stub.Evaluate(evaluate_request(program, cmd, state, profile))
        except grpc.aio.AioRpcError as error:
            code = error.code()
            field = ""
            for detail in status_details(error):
                if isinstance(detail, error_details_pb2.BadRequest) and detail.field_violations:
                    field = purchase_field(detail.field_violations[0].field)
            refusal = _refusal(code.name, (error.details() or "").split(": ", 1)[-1], field)
            if refusal is not None:
                raise refusal from None
            if code.name in FAILED_ON_BASKET:
                return await self._quote_alone(program, cmd, state, profile, f"{code.name}: {error.details()}")
            raise EngineUnavailable(f"{code.name}: {error.details()}") from None
        return quote_of(response.evaluation)

    async def tier_status(
        self, program: str, qualification: dict[str, int], at: datetime | None = None
    ) -> tuple[str, int, TierStanding]:
        request = rules_pb2.GetTierStatusRequest(program=program, qualification=qualification, at=to_timestamp(at))
        try:
            response = await self.stub.GetTierStatus(request)
        except grpc.aio.AioRpcError as error:
            raise _failure(error) from None
        return tier_standing_of(response.status)

    async def program_document(self, program: str, version: int) -> str:
        """The version's validated document as canonical JSON."""
        try:
            response = await self.stub.GetProgram(rules_pb2.GetProgramRequest(program=program, version=version))
        except grpc.aio.AioRpcError as error:
            raise _failure(error) from None
        return str(response.document_json)

    async def _quote_alone(
        self, program: str, cmd: c.RecordPurchase, state: MemberState, profile: dict[str, str], failure: str
    ) -> Quote:
        """After a unary Evaluate failed with UNKNOWN/INTERNAL: the same basket as a batch of
        one, whose per-item answer tells a basket rules_svc fails on (refused) from rules_svc
        failing whatever it is asked (the batch call fails too: an outage)."""
        try:
            (outcome,) = await self.quote_many(program, [(cmd, state, profile)])
        except EngineUnavailable as exc:
            raise EngineUnavailable(f"{failure}; asked as a batch: {exc}") from None
        if outcome is None:
            raise EngineUnavailable(failure)
        if isinstance(outcome, LedgerError | EngineFailedOnBasket):
            raise outcome
        return outcome

    async def quote_many(
        self, program: str, items: Sequence[tuple[c.RecordPurchase, MemberState, dict[str, str]]]
    ) -> list[Quote | LedgerError | EngineFailedOnBasket | None]:
        """One EvaluateBatch; a basket rules_svc refuses fails alone, one it fails on
        (UNKNOWN/INTERNAL for that item) is EngineFailedOnBasket, one it could not answer for an
        outage reason is None (it asks again on its own), an unavailable rules_svc fails the
        call (EngineUnavailable)."""
        requests = [evaluate_request(program, *item) for item in items]
        batch = rules_pb2.EvaluateBatchRequest(
            program=program, items=[rules_pb2.EvaluateItem(basket=r.basket, member=r.member) for r in requests]
        )
        try:
            response = await self.stub.EvaluateBatch(batch, timeout=self.batch_deadline)
        except grpc.aio.AioRpcError as error:
            raise EngineUnavailable(f"{error.code().name}: {error.details()}") from None
        out: list[Quote | LedgerError | EngineFailedOnBasket | None] = []
        for result in response.results:
            if result.HasField("evaluation"):
                try:
                    out.append(quote_of(result.evaluation))
                except LedgerError as error:
                    out.append(error)
                continue
            out.append(_item_outcome(result.error.code, result.error.message, purchase_field(result.error.field)))
        if len(out) != len(items):
            raise EngineUnavailable(f"rules_svc answered {len(out)} results for {len(items)} baskets")
        return out
