"""Protobuf <-> domain translation for the ledger: the only module that knows both."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from ledger_svc import commands as c
from ledger_svc import domain as d
from ledger_svc.codec import parse
from ledger_svc.purchases import PurchaseRecord, PurchaseStatus
from ledger_svc.reviews import RedeemResult, Review, ReviewStatus, TransferResult
from ledger_svc.screening import Screening, ScreeningContext, Verdict
from pointmesh.timestamps import from_timestamp, to_timestamp
from pointmesh.v1 import common_pb2, ledger_pb2, rules_pb2

_MEMBER_STATUS = {
    d.MemberStatus.ACTIVE: ledger_pb2.MEMBER_STATUS_ACTIVE,
    d.MemberStatus.BLOCKED: ledger_pb2.MEMBER_STATUS_BLOCKED,
    d.MemberStatus.MERGED: ledger_pb2.MEMBER_STATUS_MERGED,
    d.MemberStatus.ERASED: ledger_pb2.MEMBER_STATUS_ERASED,
}
_HOLD_STATUS = {
    d.HoldStatus.PLACED: ledger_pb2.HOLD_STATUS_PLACED,
    d.HoldStatus.CAPTURED: ledger_pb2.HOLD_STATUS_CAPTURED,
    d.HoldStatus.VOIDED: ledger_pb2.HOLD_STATUS_VOIDED,
    d.HoldStatus.EXPIRED: ledger_pb2.HOLD_STATUS_EXPIRED,
}


ts = to_timestamp


def dt(message: Any, field: str, path: str = "") -> datetime | None:
    """A Timestamp field as an aware datetime, or None when the field is unset. `path` is the
    field's full path in the request when `message` is nested (default: `field`)."""
    if not message.HasField(field):
        return None
    try:
        return from_timestamp(getattr(message, field))
    except ValueError as exc:
        raise d.InvalidArgument(str(exc), field=path or field) from exc


def required_time(message: Any, field: str) -> datetime:
    found = dt(message, field)
    if found is None:
        raise d.InvalidArgument("is required", field=field)
    return found


def key(message: Any) -> d.IdemKey:
    """A missing key comes through empty, so validation reports it by field name."""
    k = message.idempotency_key
    return d.IdemKey(k.namespace or "default", k.key)


def money(message: common_pb2.Money) -> d.Money:
    return d.Money(message.amount_minor, message.currency)


def external_id(message: common_pb2.ExternalId) -> d.ExternalId:
    return d.ExternalId(message.kind, message.value)


# Domain -> protobuf ------------------------------------------------------------------------


def member_pb(m: d.Member) -> ledger_pb2.Member:
    return ledger_pb2.Member(
        member_id=m.member_id,
        status=_MEMBER_STATUS[m.status],
        external_ids=[common_pb2.ExternalId(kind=e.kind, value=e.value) for e in m.external_ids],
        aliases=[common_pb2.ExternalId(kind=e.kind, value=e.value) for e in m.aliases],
        profile=m.profile,
        merged_into_member_id=m.merged_into,
        created_at=ts(m.created_at),
    )


def balance_pb(b: d.Balance) -> ledger_pb2.Balance:
    return ledger_pb2.Balance(
        member_id=b.member_id,
        unit=b.unit,
        balance_points=b.balance_points,
        reserved_points=b.reserved_points,
        available_points=b.available_points,
        pending_points=b.pending_points,
        lifetime_earned_points=b.lifetime_earned_points,
        debt_points=b.debt_points,
        version=b.version,
        expiring_points=b.expiring_points,
    )


def transaction_pb(t: d.Transaction) -> ledger_pb2.Transaction:
    return ledger_pb2.Transaction(
        transaction_id=t.transaction_id,
        kind=ledger_pb2.TransactionKind.Value(f"TRANSACTION_KIND_{t.kind.value}"),
        member_id=t.member_id,
        unit=t.unit,
        points=t.points,
        recorded_at=ts(t.recorded_at),
        business_time=ts(t.business_time),
        reference=t.reference,
        balance_after=balance_pb(t.balance_after),
    )


def hold_pb(h: d.Hold) -> ledger_pb2.Hold:
    return ledger_pb2.Hold(
        hold_id=h.hold_id,
        member_id=h.member_id,
        unit=h.unit,
        points=h.points,
        status=_HOLD_STATUS[h.status],
        captured_points=h.captured_points,
        created_at=ts(h.created_at),
        expires_at=ts(h.expires_at),
        reference=h.reference,
        channel=h.channel,
        store_id=h.store_id,
    )


def entry_pb(e: d.Entry) -> ledger_pb2.Entry:
    return ledger_pb2.Entry(
        entry_id=e.entry_id,
        transaction_id=e.transaction_id,
        account=e.account,
        points=e.points,
        kind=ledger_pb2.TransactionKind.Value(f"TRANSACTION_KIND_{e.kind.value}"),
        recorded_at=ts(e.recorded_at),
        business_time=ts(e.business_time),
        reference=e.reference,
    )


def _iso(value: str | None) -> Timestamp | None:
    return ts(datetime.fromisoformat(value)) if value else None


def event_pb(payload_json: str) -> ledger_pb2.LedgerEvent:
    """Turns an outbox row (JSON written by the posting) into the published protobuf event."""
    raw = parse(payload_json)
    data = raw["data"]
    balance = d.Balance(**raw["balance"])
    event = ledger_pb2.LedgerEvent(
        event_id=raw["event_id"],
        occurred_at=_iso(raw["occurred_at"]),
        member_id=raw["member_id"],
        unit=raw["unit"],
        balance_after=balance_pb(balance),
    )
    kind = raw["type"]
    if kind == "points_earned":
        event.points_earned.CopyFrom(ledger_pb2.PointsEarned(
            transaction_id=data["transaction_id"], points=data["points"], lot_id=data["lot_id"],
            pending=data["pending"], funding_source=data["funding_source"], reference=data["reference"],
            business_time=_iso(data["business_time"]),
        ))  # fmt: skip
    elif kind == "purchase_recorded":
        event.purchase_recorded.CopyFrom(ledger_pb2.PurchaseRecorded(
            purchase_id=data["purchase_id"], channel=data["channel"], store_id=data["store_id"],
            total=common_pb2.Money(amount_minor=data["total_minor"], currency=data["currency"]),
            receipt_time=_iso(data["receipt_time"]), earned=data["earned"], purchase_number=data["purchase_number"],
            categories=data.get("categories", []), experiment_arms=data.get("experiment_arms", {}),
        ))  # fmt: skip
    elif kind == "purchase_returned":
        event.purchase_returned.CopyFrom(ledger_pb2.PurchaseReturned(
            purchase_id=data["purchase_id"], return_key=data["return_key"],
            refunded=common_pb2.Money(amount_minor=data["refunded_minor"], currency=data["currency"]),
            refunded_total=common_pb2.Money(amount_minor=data["refunded_total_minor"], currency=data["currency"]),
            points_reversed=data["points_reversed"], fully_returned=data["fully_returned"],
            receipt_time=_iso(data["receipt_time"]),
        ))  # fmt: skip
    elif kind == "tier_changed":
        event.tier_changed.CopyFrom(ledger_pb2.TierChanged(**data))
    elif kind == "points_redeemed":
        event.points_redeemed.CopyFrom(ledger_pb2.PointsRedeemed(**data))
    elif kind == "hold_placed":
        event.hold_placed.CopyFrom(
            ledger_pb2.HoldPlaced(hold_id=data["hold_id"], points=data["points"], expires_at=_iso(data["expires_at"]))
        )
    elif kind == "hold_captured":
        event.hold_captured.CopyFrom(ledger_pb2.HoldCaptured(**data))
    elif kind == "hold_voided":
        event.hold_voided.CopyFrom(ledger_pb2.HoldVoided(**data))
    elif kind == "points_reversed":
        event.points_reversed.CopyFrom(ledger_pb2.PointsReversed(**data))
    elif kind == "points_transferred":
        event.points_transferred.CopyFrom(ledger_pb2.PointsTransferred(**data))
    elif kind == "points_expired":
        event.points_expired.CopyFrom(ledger_pb2.PointsExpired(**data))
    elif kind == "members_merged":
        event.members_merged.CopyFrom(ledger_pb2.MembersMerged(**data))
    elif kind == "points_adjusted":
        event.points_adjusted.CopyFrom(
            ledger_pb2.PointsAdjusted(
                transaction_id=data["transaction_id"], points=data["points"], reason=data["reason"]
            )
        )
    elif kind == "pending_released":
        event.pending_released.CopyFrom(ledger_pb2.PendingReleased(**data))
    elif kind in ("review_opened", "review_decided"):
        getattr(event, kind).CopyFrom(ledger_pb2.ReviewEvent(
            review_id=data["review_id"], kind=ledger_pb2.ReviewKind.Value(f"REVIEW_KIND_{data['kind']}"),
            status=ledger_pb2.ReviewStatus.Value(f"REVIEW_STATUS_{data['status']}"), points=data["points"],
            subject_ids=data["subject_ids"], purchase_id=data["purchase_id"],
            verdict=ledger_pb2.ScreeningVerdict.Value(f"SCREENING_VERDICT_{data['verdict']}"), scored=data["scored"],
            reasons=data["reasons"], decided_by=data["decided_by"], note=data["note"],
        ))  # fmt: skip
    else:
        raise ValueError(f"unknown outbox event type {kind!r}")
    return event


# Protobuf -> commands ----------------------------------------------------------------------


def earn_cmd(r: ledger_pb2.EarnRequest) -> c.Earn:
    return c.Earn(
        key=key(r),
        member_id=r.member_id,
        unit=r.unit,
        points=r.points,
        funding_source=r.funding_source,
        business_time=dt(r, "business_time"),
        expires_at=dt(r, "expires_at"),
        release_at=dt(r, "release_at"),
        pending_review=r.pending_review,
        purchase=money(r.purchase_amount) if r.HasField("purchase_amount") else None,
        reference=r.reference,
    )


def redeem_cmd(r: ledger_pb2.RedeemRequest) -> c.Redeem:
    return c.Redeem(key(r), r.member_id, r.unit, r.points, dt(r, "business_time"), r.reference,
                    screening_context(r.context))  # fmt: skip


def transfer_cmd(r: ledger_pb2.TransferRequest) -> c.Transfer:
    return c.Transfer(key(r), r.source_member_id, r.destination_member_id, r.unit, r.points, r.reason,
                      screening_context(r.context))  # fmt: skip


def transfer_pb(r: TransferResult) -> ledger_pb2.TransferResponse:
    return ledger_pb2.TransferResponse(
        transfer_id=r.transfer_id, debit=transaction_pb(r.debit) if r.debit else None,
        credit=transaction_pb(r.credit) if r.credit else None, hold=hold_pb(r.hold) if r.hold else None,
        screening=screening_pb(r.screening),
    )  # fmt: skip


def screening_context(m: ledger_pb2.ScreeningContext, path: str = "context") -> ScreeningContext:
    return ScreeningContext(m.channel, m.store_id, m.device_id, m.ip, m.card_hash, m.employee_card,
                            dt(m, "contact_changed_at", f"{path}.contact_changed_at"))  # fmt: skip


def screening_pb(s: Screening | None) -> ledger_pb2.Screening | None:
    if s is None:
        return None
    return ledger_pb2.Screening(
        verdict=_verdict(s.verdict), scored=s.scored,
        score=s.score, reasons=s.reasons, model_version=s.model_version, review_id=s.review_id,
    )  # fmt: skip


def redeem_pb(r: RedeemResult) -> ledger_pb2.RedeemResponse:
    return ledger_pb2.RedeemResponse(
        transaction=transaction_pb(r.transaction) if r.transaction else None,
        hold=hold_pb(r.hold) if r.hold else None,
        screening=screening_pb(r.screening),
    )


def review_pb(r: Review) -> ledger_pb2.Review:
    return ledger_pb2.Review(
        review_id=r.review_id, kind=ledger_pb2.ReviewKind.Value(f"REVIEW_KIND_{r.kind.value}"),
        status=ledger_pb2.ReviewStatus.Value(f"REVIEW_STATUS_{r.status.value}"), member_id=r.member_id, unit=r.unit,
        points=r.points, subject_ids=r.subject_ids, purchase_id=r.purchase_id, screening=screening_pb(r.screening),
        created_at=ts(r.created_at), decided_at=ts(r.decided_at) if r.decided_at else None,
        decided_by=r.decided_by, note=r.note, outcome_transaction_ids=r.outcome_transaction_ids,
        transfer_id=r.transfer_id, counterparty_member_id=r.counterparty_member_id,
    )  # fmt: skip


def review_status(value: ledger_pb2.ReviewStatus.ValueType) -> ReviewStatus:
    if value == ledger_pb2.REVIEW_STATUS_UNSPECIFIED:
        return ReviewStatus.OPEN
    if value not in ledger_pb2.ReviewStatus.values():
        raise d.InvalidArgument(f"unknown review status {value}", field="status")
    return ReviewStatus(ledger_pb2.ReviewStatus.Name(value).removeprefix("REVIEW_STATUS_"))


def adjust_cmd(r: ledger_pb2.AdjustRequest) -> c.Adjust:
    return c.Adjust(key(r), r.member_id, r.unit, r.points, r.reason, r.operator_id)


def reverse_cmd(r: ledger_pb2.ReverseRequest) -> c.Reverse:
    which = r.WhichOneof("amount")
    return c.Reverse(
        key=key(r),
        transaction_id=r.transaction_id,
        points=r.points if which == "points" else None,
        refund=money(r.refund_amount) if which == "refund_amount" else None,
        full=which == "full" and r.full,
        reason=r.reason,
    )


# google.protobuf.Duration's own range: about 10,000 years either way.
MAX_DURATION_SECONDS = 315_576_000_000


def duration(m: Duration, field: str) -> timedelta:
    """A Duration as a timedelta; InvalidArgument on `field` for one protobuf calls invalid
    (seconds past its range, |nanos| of a second or more, seconds and nanos of opposite signs)."""
    seconds, nanos = m.seconds, m.nanos
    if abs(seconds) > MAX_DURATION_SECONDS:
        raise d.InvalidArgument(f"seconds must be within +-{MAX_DURATION_SECONDS}, got {seconds}", field=field)
    if abs(nanos) >= 1_000_000_000:
        raise d.InvalidArgument(f"nanos must be within +-999999999, got {nanos}", field=field)
    if (seconds > 0 and nanos < 0) or (seconds < 0 and nanos > 0):
        raise d.InvalidArgument(f"seconds ({seconds}) and nanos ({nanos}) must have the same sign", field=field)
    try:
        return timedelta(seconds=seconds, microseconds=int(nanos / 1000))
    except OverflowError:
        raise d.InvalidArgument(f"{seconds} seconds is not a duration", field=field) from None


def hold_cmd(r: ledger_pb2.PlaceHoldRequest) -> c.PlaceHold:
    timeout = duration(r.timeout, "timeout") if r.HasField("timeout") else None
    return c.PlaceHold(key(r), r.member_id, r.unit, r.points, timeout, r.reference, screening_context(r.context))


def ingest_cmd(r: ledger_pb2.IngestBatchRequest) -> c.PostingCommand | c.RecordPurchase | None:
    which = r.WhichOneof("operation")
    if which == "purchase":
        return purchase_cmd(r.purchase)
    if which == "earn":
        return earn_cmd(r.earn)
    if which == "redeem":
        return redeem_cmd(r.redeem)
    if which == "adjust":
        return adjust_cmd(r.adjust)
    if which == "reverse":
        return reverse_cmd(r.reverse)
    return None


# Purchases ---------------------------------------------------------------------------------


def purchase_cmd(r: ledger_pb2.RecordPurchaseRequest) -> c.RecordPurchase:
    when = dt(r, "receipt_time")
    if when is None:
        raise d.InvalidArgument("is required", field="receipt_time")
    currency = r.total.currency
    lines = []
    for i, ln in enumerate(r.lines):
        if ln.amount.currency != currency:
            raise d.InvalidArgument(
                f"is {ln.amount.currency!r} but the total is in {currency!r}", field=f"lines[{i}].amount.currency"
            )
        lines.append(c.PurchaseLine(ln.sku, ln.category, ln.quantity, ln.amount.amount_minor))
    transport = key(r) if r.HasField("idempotency_key") and r.idempotency_key.key else None
    return c.RecordPurchase(
        d.IdemKey("", ""), r.member_id, r.channel, r.store_id, r.receipt_id, money(r.total), tuple(lines), when,
        r.tender_transaction_id, transport, screening_context(r.context),
    )  # fmt: skip


def return_cmd(r: ledger_pb2.RecordReturnRequest, purchase_id: str) -> c.RecordReturn:
    return c.RecordReturn(
        key(r), purchase_id, r.channel, r.store_id,
        tuple(c.ReturnLine(ln.line_index, ln.quantity) for ln in r.lines),
        money(r.refund) if r.HasField("refund") else None, dt(r, "return_time"),
    )  # fmt: skip


def ingested_pb(index: int, p: PurchaseRecord, replayed: bool) -> ledger_pb2.IngestedPurchase:
    out = ledger_pb2.IngestedPurchase(
        index=index, purchase_id=p.purchase_id, status=_purchase_status(p.status), earned=p.earned(), replayed=replayed
    )
    if p.screening is not None:
        out.verdict = _verdict(p.screening.verdict)
        out.scored = p.screening.scored
    return out


def _verdict(verdict: Verdict) -> ledger_pb2.ScreeningVerdict.ValueType:
    return ledger_pb2.ScreeningVerdict.Value(f"SCREENING_VERDICT_{verdict.value}")


def _purchase_status(status: PurchaseStatus) -> ledger_pb2.PurchaseStatus.ValueType:
    return ledger_pb2.PurchaseStatus.Value(f"PURCHASE_STATUS_{status.value}")


def purchase_pb(p: PurchaseRecord) -> ledger_pb2.Purchase:
    currency = p.total.currency
    out = ledger_pb2.Purchase(
        purchase_id=p.purchase_id, member_id=p.member_id, program=p.program, channel=p.channel, store_id=p.store_id,
        receipt_id=p.receipt_id, total=common_pb2.Money(amount_minor=p.total.amount_minor, currency=currency),
        receipt_time=ts(p.receipt_time), received_at=ts(p.received_at),
        status=_purchase_status(p.status), status_reason=p.status_reason,
        program_version=p.version, fx_rate=p.fx_rate, earn_transactions=p.earn_transactions,
        purchase_number=p.purchase_number, tier_before=p.tier_before, tier_after=p.tier_after,
        tender_transaction_id=p.tender_transaction_id, tender_points=p.tender_points,
        returned_quantities=p.returned_quantities, refunded_minor=p.refunded_minor,
        screening=screening_pb(p.screening), experiment_arms=p.experiment_arms,
    )  # fmt: skip
    out.lines.extend(
        ledger_pb2.PurchaseLine(sku=ln.sku, category=ln.category, quantity=ln.quantity,
                                amount=common_pb2.Money(amount_minor=ln.amount_minor, currency=currency))
        for ln in p.lines
    )  # fmt: skip
    for part, returned in zip(p.parts, p.returned_points or [0] * len(p.parts), strict=True):
        g = part.guard
        out.parts.append(ledger_pb2.PurchasePart(
            part=rules_pb2.ExplainedPart(
                rule_id=part.rule_id, unit=part.unit, points=part.points, line_index=part.line, detail=part.detail,
                matched=part.matched, capped=part.capped, basket_threshold_minor=part.threshold_minor,
                fixed_bonus=part.fixed,
                multiplied_lines=[rules_pb2.LinePoints(line_index=i, points=b) for i, b in part.line_bases],
                guard=rules_pb2.Guard(counter=g.counter, limit=g.limit, ordinal_equals=g.ordinal_equals,
                                      ordinal_every=g.ordinal_every) if g else None,
            ),
            returned_points=returned,
        ))  # fmt: skip
    out.earned.extend(rules_pb2.UnitPoints(unit=u, points=n) for u, n in p.earned().items())
    return out
