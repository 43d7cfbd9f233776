"""Fraud review items: opened in the same write as the pending credit or hold they guard,
decided by ops in one write that releases or cancels it.

A review lives in its member's shard (its id carries the member's bucket), so opening one is
atomic with the posting it guards and deciding one is atomic with the posting that settles
it. Every open and every decision is an outbox event; the relay also copies them to the ops
alert stream.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from ledger_svc import codec
from ledger_svc import commands as c
from ledger_svc.domain import (
    Balance,
    FailedPrecondition,
    Hold,
    HoldResult,
    NotFound,
    SagaState,
    Transaction,
    new_id,
    transfer_tx_ids,
)
from ledger_svc.postings import ShardBook
from ledger_svc.screening import Screening, Verdict

REVIEW_EVENTS = frozenset({"review_opened", "review_decided"})


class ReviewKind(enum.StrEnum):
    EARN = "EARN"
    REDEMPTION = "REDEMPTION"
    TRANSFER = "TRANSFER"


class ReviewStatus(enum.StrEnum):
    OPEN = "OPEN"
    APPROVED = "APPROVED"
    REJECTED = "REJECTED"


@dataclass(frozen=True, slots=True)
class Review:
    review_id: str
    kind: ReviewKind
    status: ReviewStatus
    member_id: str
    unit: str
    points: int
    subject_ids: tuple[str, ...]
    screening: Screening
    created_at: datetime
    purchase_id: str = ""
    decided_at: datetime | None = None
    decided_by: str = ""
    note: str = ""
    outcome_transaction_ids: tuple[str, ...] = ()
    transfer_id: str = ""  # TRANSFER: the transfer saga the hold belongs to
    counterparty_member_id: str = ""  # TRANSFER: the member it would pay


@dataclass(frozen=True, slots=True)
class RedeemResult:
    """A redemption either posted (`transaction`) or held for review (`hold`), never both."""

    transaction: Transaction | None
    hold: Hold | None = None
    screening: Screening | None = None


@dataclass(frozen=True, slots=True)
class TransferResult:
    """A transfer either moved (`debit` and `credit`) or waits on a fraud review: `hold`
    reserves the points on the source (VOIDED once the review rejected it, and nothing moved)."""

    transfer_id: str
    debit: Transaction | None
    credit: Transaction | None
    hold: Hold | None = None
    screening: Screening | None = None


@dataclass(frozen=True, slots=True)
class PlacedHold:
    """A hold placed for its caller, or (REVIEW) owned by a review until ops decides; the
    screening says which."""

    hold: Hold
    balance_after: Balance
    screening: Screening | None = None
    capture_transaction_id: str = ""  # a retry once its review approved it: the capture


def new_review_id(member_id: str) -> str:
    return new_id("rv", member_id)


def redeem_or_hold(
    book: ShardBook, cmd: c.Redeem, screening: Screening | None, *, hold_timeout: timedelta
) -> RedeemResult:
    """Posts the redemption, or (REVIEW) reserves its points in a hold only the review settles.

    The hold does not expire on its own: points under review wait for a decision, not a clock.
    `hold_timeout` only dates it for the member's view.
    """
    if screening is None or screening.verdict is Verdict.ALLOW:
        posted = book.redeem(cmd.member_id, cmd.unit, cmd.points, business_time=cmd.business_time,
                             reference=cmd.reference)  # fmt: skip
        return RedeemResult(posted, None, screening)
    held, review = _held_for_review(book, cmd, "redemption", screening, hold_timeout)
    return RedeemResult(None, held.hold, review.screening)


def _held_for_review(
    book: ShardBook, cmd: c.Redeem | c.PlaceHold, what: str, screening: Screening, timeout: timedelta
) -> tuple[HoldResult, Review]:  # fmt: skip
    """The points reserved by a hold the review owns, and the review. The hold names the
    channel and store it was asked for, as any hold does: only keys acting for them read it."""
    review_id = new_review_id(cmd.member_id)
    held = book.place_hold(cmd.member_id, cmd.unit, cmd.points, timeout=timeout,
                           reference=cmd.reference or f"{what} under fraud review {review_id}", saga_id=review_id,
                           channel=cmd.context.channel, store_id=cmd.context.store_id)  # fmt: skip
    review = open_review(book, review_id, ReviewKind.REDEMPTION, cmd.member_id, cmd.unit, cmd.points,
                         (held.hold.hold_id,), screening)  # fmt: skip
    return held, review


def hold_or_review(
    book: ShardBook, cmd: c.PlaceHold, screening: Screening | None, *, timeout: timedelta, review_timeout: timedelta
) -> PlacedHold:
    """A hold reserves points its caller can then capture, so it is screened as a redemption:
    under review it belongs to the review instead (the caller cannot capture or void it), and
    approval captures it as the redemption it was meant to become."""
    if screening is None or screening.verdict is Verdict.ALLOW:
        placed = book.place_hold(cmd.member_id, cmd.unit, cmd.points, timeout=timeout, reference=cmd.reference,
                                 channel=cmd.context.channel, store_id=cmd.context.store_id)  # fmt: skip
        return PlacedHold(placed.hold, placed.balance_after, screening)
    held, review = _held_for_review(book, cmd, "hold", screening, review_timeout)
    return PlacedHold(held.hold, held.balance_after, review.screening)


def _save(book: ShardBook, review: Review) -> None:
    book.tx.put_review(review.review_id, review.member_id, review.status.value, review.created_at, codec.dumps(review))


def load(book: ShardBook, review_id: str) -> Review:
    body = book.tx.get_review(review_id)
    if body is None:
        raise NotFound(f"review {review_id} does not exist", field="review_id")
    return codec.loads(Review, body)


def _announce(book: ShardBook, event: str, review: Review) -> None:
    book.emit(event, book.balance(review.member_id, review.unit), {
        "review_id": review.review_id, "kind": review.kind.value, "status": review.status.value,
        "points": review.points, "subject_ids": list(review.subject_ids), "purchase_id": review.purchase_id,
        "verdict": review.screening.verdict.value, "scored": review.screening.scored,
        "reasons": list(review.screening.reasons), "decided_by": review.decided_by, "note": review.note,
    })  # fmt: skip


def open_review(
    book: ShardBook,
    review_id: str,
    kind: ReviewKind,
    member_id: str,
    unit: str,
    points: int,
    subject_ids: tuple[str, ...],
    screening: Screening,
    purchase_id: str = "",
    *,
    transfer_id: str = "",
    counterparty_member_id: str = "",
) -> Review:
    review = Review(review_id, kind, ReviewStatus.OPEN, member_id, unit, points, subject_ids,
                    replace(screening, review_id=review_id), book.now, purchase_id, transfer_id=transfer_id,
                    counterparty_member_id=counterparty_member_id)  # fmt: skip
    _save(book, review)
    _announce(book, "review_opened", review)
    return review


def release_unreviewed(book: ShardBook, tx_id: str) -> Transaction:
    """ReleasePending, unless the credit waits on a fraud review item: that one is settled by
    deciding the review (which also closes it), not around it."""
    earn = book.require_transaction(tx_id)
    after: tuple[datetime, str] | None = None
    while page := book.tx.list_reviews(ReviewStatus.OPEN.value, earn.member_id, after, 100):
        for created_at, review_id, body in page:
            if tx_id in codec.loads(Review, body).subject_ids:
                raise FailedPrecondition(
                    f"transaction {tx_id} is held by fraud review {review_id}; approve or reject the review instead",
                    field="transaction_id",
                )
            after = (created_at, review_id)
    return book.release_pending(tx_id)


def decide(book: ShardBook, review_id: str, approve: bool, operator_id: str, note: str) -> Review:
    """Approve: release the pending credit (at its release time if that is still ahead) /
    capture the hold / let the transfer go on. Reject: reverse the credit / void the hold. A credit a return already
    took back has nothing left to release or reverse, and the review is still decided. A
    review is decided once; a second decision is refused with who and when."""
    review = load(book, review_id)
    if review.status is not ReviewStatus.OPEN:
        raise FailedPrecondition(
            f"review {review_id} was already {review.status.value.lower()} by {review.decided_by or 'ops'}"
            f" at {review.decided_at.isoformat() if review.decided_at else 'an earlier time'}",
            field="review_id",
        )
    outcome: list[str] = []
    if review.kind is ReviewKind.EARN:
        for tx_id in review.subject_ids:
            if approve:
                released = book.approve_pending(tx_id)
                outcome.extend([released.transaction_id] if released else [])
            elif book.reversible_points(tx_id):  # a return may have taken it all back already
                reason = f"fraud review {review_id} rejected"
                outcome.append(book.reverse(tx_id, points=None, refund=None, reason=reason).transaction.transaction_id)
    elif review.kind is ReviewKind.TRANSFER:
        outcome.extend(_decide_transfer(book, review, approve))
    else:
        (hold_id,) = review.subject_ids
        if approve:
            captured = book.capture_hold(hold_id, 0, owner=review_id)
            outcome.extend([captured.transaction.transaction_id] if captured.transaction else [])
        else:
            book.void_hold(hold_id, owner=review_id)
    decided = replace(
        review, status=ReviewStatus.APPROVED if approve else ReviewStatus.REJECTED, decided_at=book.now,
        decided_by=operator_id, note=note, outcome_transaction_ids=tuple(outcome),
    )  # fmt: skip
    _save(book, decided)
    _announce(book, "review_decided", decided)
    return decided


def _decide_transfer(book: ShardBook, review: Review, approve: bool) -> tuple[str, ...]:
    """Approval hands the transfer back to its saga (HELD: the ledger drives it right after
    this write, and recovery does if it crashes first) and names the debit and credit it
    posts; rejection voids the hold and closes the saga, so nothing moves."""
    saga = book.tx.get_saga(review.transfer_id)
    if saga is None or saga.state is not SagaState.REVIEW:
        state = "missing" if saga is None else saga.state.value
        raise FailedPrecondition(f"transfer {review.transfer_id} is {state}, not under review", field="review_id")
    if approve:
        book.tx.set_saga_state(saga.saga_id, SagaState.HELD, book.now)
        return transfer_tx_ids(saga.saga_id, saga.source_member, saga.dest_member)
    book.void_hold(saga.hold_id, owner=saga.saga_id)
    book.tx.set_saga_state(saga.saga_id, SagaState.CANCELLED, book.now)
    return ()
