"""protobuf answers of ledger_svc and rules_svc -> REST response bodies. Translation only."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from gateway import schemas as s
from pointmesh.timestamps import from_timestamp, to_timestamp
from pointmesh.v1 import common_pb2, ledger_pb2, rules_pb2


def when(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    value: Timestamp = getattr(message, field)
    return from_timestamp(value)


def money_pb(m: s.Money) -> common_pb2.Money:
    return common_pb2.Money(amount_minor=m.amount_minor, currency=m.currency)


def money(m: common_pb2.Money) -> s.Money:
    return s.Money(amount_minor=m.amount_minor, currency=m.currency)


def _enum(value: int, enum: Any, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)


def member(m: ledger_pb2.Member) -> s.Member:
    return s.Member(
        member_id=m.member_id, status=_enum(m.status, ledger_pb2.MemberStatus, "MEMBER_STATUS_"),
        external_ids=[s.ExternalId(kind=e.kind, value=e.value) for e in m.external_ids],
        merged_into=m.merged_into_member_id, created_at=when(m, "created_at"), profile=dict(m.profile),
    )  # fmt: skip


def balance(b: ledger_pb2.Balance) -> s.Balance:
    return s.Balance(
        member_id=b.member_id, unit=b.unit, balance_points=b.balance_points, available_points=b.available_points,
        reserved_points=b.reserved_points, pending_points=b.pending_points,
        lifetime_earned_points=b.lifetime_earned_points, debt_points=b.debt_points,
    )  # fmt: skip


def tier_status(member_id: str, t: rules_pb2.TierStatus) -> s.TierStatus:
    return s.TierStatus(
        member_id=member_id, program=t.program, version=t.version, tier=t.tier, metric_unit=t.metric_unit,
        window=t.window, qualifying_points=t.qualifying_points, points_to_keep=t.points_to_keep,
        next_tier=t.next_tier, next_threshold=t.next_threshold, points_to_next=t.points_to_next,
        held_until=when(t, "held_until"), tier_after=t.tier_after,
    )  # fmt: skip


def entry(e: ledger_pb2.Entry) -> s.Entry:
    return s.Entry(
        entry_id=e.entry_id, transaction_id=e.transaction_id,
        kind=_enum(e.kind, ledger_pb2.TransactionKind, "TRANSACTION_KIND_"), points=e.points,
        recorded_at=when(e, "recorded_at"), business_time=when(e, "business_time"), reference=e.reference,
    )  # fmt: skip


def transaction(t: ledger_pb2.Transaction) -> s.Transaction:
    return s.Transaction(
        transaction_id=t.transaction_id, kind=_enum(t.kind, ledger_pb2.TransactionKind, "TRANSACTION_KIND_"),
        member_id=t.member_id, unit=t.unit, points=t.points, reference=t.reference,
        balance_after=balance(t.balance_after) if t.HasField("balance_after") else None,
    )  # fmt: skip


def hold(h: ledger_pb2.Hold, after: ledger_pb2.Balance | None = None) -> s.Hold:
    return s.Hold(
        hold_id=h.hold_id, member_id=h.member_id, unit=h.unit, points=h.points,
        status=_enum(h.status, ledger_pb2.HoldStatus, "HOLD_STATUS_"), captured_points=h.captured_points,
        expires_at=when(h, "expires_at"), channel=h.channel, store_id=h.store_id,
        balance_after=balance(after) if after is not None else None,
    )  # fmt: skip


def _part(p: rules_pb2.ExplainedPart, returned: int = 0) -> s.ExplainedPart:
    return s.ExplainedPart(
        rule_id=p.rule_id, unit=p.unit, points=p.points, line_index=p.line_index, detail=p.detail,
        matched=list(p.matched), capped=p.capped, returned_points=returned,
    )  # fmt: skip


def purchase(p: ledger_pb2.Purchase, replayed: bool = False) -> s.Purchase:
    return s.Purchase(
        purchase_id=p.purchase_id, member_id=p.member_id, channel=p.channel, store_id=p.store_id,
        receipt_id=p.receipt_id, status=_enum(p.status, ledger_pb2.PurchaseStatus, "PURCHASE_STATUS_"),
        status_reason=p.status_reason, program_version=p.program_version,
        earned={u.unit: u.points for u in p.earned}, parts=[_part(x.part, x.returned_points) for x in p.parts],
        purchase_number=p.purchase_number, tier_before=p.tier_before, tier_after=p.tier_after,
        receipt_time=when(p, "receipt_time"), replayed=replayed,
        screening=screening(p.screening) if p.HasField("screening") else None,
    )  # fmt: skip


def lines_pb(lines: list[s.PurchaseLine]) -> list[ledger_pb2.PurchaseLine]:
    return [
        ledger_pb2.PurchaseLine(sku=ln.sku, category=ln.category, quantity=ln.quantity, amount=money_pb(ln.amount))
        for ln in lines
    ]


def basket_pb(body: s.Explain, channel: str, store_id: str) -> rules_pb2.Basket:
    return rules_pb2.Basket(
        channel=channel, store_id=store_id, receipt_id="explain", total=money_pb(body.total),
        lines=[rules_pb2.BasketLine(sku=ln.sku, category=ln.category, quantity=ln.quantity, amount=money_pb(ln.amount))
               for ln in body.lines],
        receipt_time=to_timestamp(body.receipt_time),
    )  # fmt: skip


def explanation(e: rules_pb2.Evaluation) -> s.Explanation:
    return s.Explanation(
        program=e.program, version=e.version, totals={t.unit: t.points for t in e.totals},
        parts=[_part(p) for p in e.parts], excluded=[f"{x.rule_id}: {x.reason}" for x in e.excluded],
        store_local_time=e.store_local_time,
    )  # fmt: skip


def context_pb(c: s.ScreeningContext | None, channel: str, store_id: str) -> ledger_pb2.ScreeningContext:
    """Channel and store are the API key's (the store checked against it), whatever the body says."""
    if c is None:
        return ledger_pb2.ScreeningContext(channel=channel, store_id=store_id)
    return ledger_pb2.ScreeningContext(
        channel=channel, store_id=store_id, device_id=c.device_id, ip=c.ip, card_hash=c.card_hash,
        employee_card=c.employee_card,
        contact_changed_at=to_timestamp(c.contact_changed_at) if c.contact_changed_at else None,
    )  # fmt: skip


def screening(x: ledger_pb2.Screening) -> s.Screening:
    return s.Screening(
        verdict=_enum(x.verdict, ledger_pb2.ScreeningVerdict, "SCREENING_VERDICT_"), scored=x.scored, score=x.score,
        reasons=list(x.reasons), model_version=x.model_version, review_id=x.review_id,
    )  # fmt: skip


def redemption(r: ledger_pb2.RedeemResponse) -> s.Redemption:
    shown = screening(r.screening) if r.HasField("screening") else None
    if r.HasField("transaction"):
        return s.Redemption(**transaction(r.transaction).model_dump(), status="PAID", screening=shown)
    h = r.hold
    status = "HELD_FOR_REVIEW" if h.status == ledger_pb2.HOLD_STATUS_PLACED else "REJECTED"
    return s.Redemption(
        transaction_id="", kind="HOLD", member_id=h.member_id, unit=h.unit, points=-h.points, reference=h.reference,
        balance_after=None, status=status, hold=hold(h), screening=shown,
    )  # fmt: skip


def transfer(r: ledger_pb2.TransferResponse) -> s.TransferResult:
    shown = screening(r.screening) if r.HasField("screening") else None
    if r.HasField("debit"):
        return s.TransferResult(transfer_id=r.transfer_id, status="MOVED", debit=transaction(r.debit),
                                credit=transaction(r.credit), screening=shown)  # fmt: skip
    status = "HELD_FOR_REVIEW" if r.hold.status == ledger_pb2.HOLD_STATUS_PLACED else "REJECTED"
    return s.TransferResult(transfer_id=r.transfer_id, status=status, hold=hold(r.hold), screening=shown)


def review(r: ledger_pb2.Review) -> s.Review:
    return s.Review(
        review_id=r.review_id, kind=_enum(r.kind, ledger_pb2.ReviewKind, "REVIEW_KIND_"),
        status=_enum(r.status, ledger_pb2.ReviewStatus, "REVIEW_STATUS_"), member_id=r.member_id, unit=r.unit,
        points=r.points, subject_ids=list(r.subject_ids), purchase_id=r.purchase_id,
        screening=screening(r.screening) if r.HasField("screening") else None, created_at=when(r, "created_at"),
        decided_at=when(r, "decided_at"), decided_by=r.decided_by, note=r.note,
        outcome_transaction_ids=list(r.outcome_transaction_ids), transfer_id=r.transfer_id,
        counterparty_member_id=r.counterparty_member_id,
    )  # fmt: skip
