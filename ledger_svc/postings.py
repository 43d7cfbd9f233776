"""Ledger rules applied inside one shard's unit of work.

`ShardBook` is created per unit of work with the store transaction and the time the unit
runs at. Every public method validates against current state, writes a balanced posting
(entries, balances, lots, holds, outbox event) and returns a domain result; raising leaves
nothing behind because the store rolls the unit back.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from ledger_svc import codec
from ledger_svc.domain import (
    AlreadyReversed,
    Balance,
    EarnResult,
    FailedPrecondition,
    Hold,
    HoldResult,
    HoldStatus,
    InsufficientPoints,
    InvalidArgument,
    Lot,
    Money,
    NotFound,
    Reserved,
    ReverseResult,
    SagaState,
    Transaction,
    TxKind,
    debt_account,
    funding_account,
    member_account,
    new_id,
    new_lot_id,
    pending_account,
    system_account,
)
from ledger_svc.store.base import AccountRow, SagaRecord, ShardTx, TxRecord
from pointmesh.config import unit_tag


@dataclass(frozen=True, slots=True)
class Policy:
    units: tuple[str, ...]
    expiry_days: int
    hold_timeout: timedelta
    hold_max_timeout: timedelta
    negative_limit_points: int
    # How long idempotency keys (a receipt's natural key among them) are kept: a receipt older
    # than this could no longer be told from one already earned, so none is taken that late.
    key_retention: timedelta = timedelta(days=35)

    def default_expiry(self, business_time: datetime) -> datetime | None:
        """When points earned at `business_time` expire unless told otherwise (None: never)."""
        return None if self.expiry_days <= 0 else business_time + timedelta(days=self.expiry_days)


_MEMBER_KINDS = ("member", "pending", "debt")  # prefixes of member_account, pending_account, debt_account

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# A portion of points with the expiry it carries, so transfers and merges keep expiry dates.
Portion = tuple[int, datetime | None]


class ShardBook:
    def __init__(self, tx: ShardTx, now: datetime, policy: Policy) -> None:
        self.tx = tx
        self.now = now
        self.policy = policy
        # Balances this unit changed, for cache invalidation once it commits.
        self.touched: list[Balance] = []
        self._rows: dict[str, AccountRow] = {}

    def _acct(self, account: str) -> AccountRow:
        """Account rows read once per unit of work; writes go through _put.

        A member's main, pending and debt accounts are read together: every posting that
        touches one computes the member's balance from all three.
        """
        row = self._rows.get(account)
        if row is None:
            kind, _, rest = account.partition(":")
            if kind in _MEMBER_KINDS:
                for found in self.tx.get_accounts([f"{k}:{rest}" for k in _MEMBER_KINDS]):
                    self._rows.setdefault(found.account, found)
            else:
                self._rows[account] = self.tx.get_accounts([account])[0]
            row = self._rows[account]
        return row

    def _put(self, row: AccountRow) -> None:
        """Refuses, before anything is written, a row that no longer fits the stores' int64
        (~9,200 postings of MAX_POINTS on one account): the whole write is refused and its
        idempotency key given back, rather than failing as an internal error at commit."""
        for value in (row.balance, row.reserved, row.lifetime_earned):
            if not INT64_MIN <= value <= INT64_MAX:
                raise FailedPrecondition(
                    f"account {row.account} would pass the 64-bit limit of the ledger's balances", field="points"
                )
        self._rows[row.account] = row
        self.tx.put_account(row)

    # Reads -------------------------------------------------------------------------------

    def balance(self, member_id: str, unit: str) -> Balance:
        main = self._acct(member_account(member_id, unit))
        pending = self._acct(pending_account(member_id, unit))
        debt = self._acct(debt_account(member_id, unit))
        return Balance(
            member_id=member_id,
            unit=unit,
            balance_points=main.balance,
            reserved_points=main.reserved,
            pending_points=pending.balance,
            lifetime_earned_points=main.lifetime_earned,
            debt_points=-debt.balance,
            version=main.version,
        )

    def spendable_balance(self, member_id: str, unit: str) -> Balance:
        """The balance as a debit now would find it once `_sweep_due` ran, written nowhere:
        holds past their timeout reserve nothing, the points past their date that no live hold
        keeps are counted as expiring, and what is left free pays recorded debt."""
        balance = self.balance(member_id, unit)
        holds = self.tx.placed_holds_of(member_id) if balance.reserved_points > 0 else []
        dead = [h for h in holds if h.unit == unit and self._timed_out(h)]
        reserved = balance.reserved_points - sum(h.points for h in dead)
        named = [r for h in holds if h.unit == unit and h not in dead for r in h.reserves]
        lots = self.tx.spendable_lots(member_id, unit)
        frees = _free_of(lots, named, max(0, reserved - sum(r.points for r in named)))
        due = sum(free for lot, free in zip(lots, frees, strict=True) if self._past_date(lot))
        expiring = max(0, min(due, balance.balance_points - reserved))
        # What is left free pays recorded debt first (points a timed-out hold released).
        paid = max(0, min(balance.debt_points, balance.balance_points - reserved - expiring))
        return replace(balance, balance_points=balance.balance_points - paid, debt_points=balance.debt_points - paid,
                       reserved_points=reserved, expiring_points=expiring)  # fmt: skip

    def _timed_out(self, hold: Hold) -> bool:
        """Past its timeout and settled by no owner: the maintenance pass voids it (a transfer's
        or a review's hold waits for its owner)."""
        return not hold.saga_id and hold.expires_at <= self.now

    def _past_date(self, lot: Lot) -> bool:
        return lot.expires_at is not None and lot.expires_at <= self.now

    def require_transaction(self, tx_id: str, field: str = "transaction_id") -> TxRecord:
        record = self.tx.get_transaction(tx_id)
        if record is None:
            raise NotFound(f"transaction {tx_id} does not exist", field=field)
        return record

    def require_hold(self, hold_id: str) -> Hold:
        hold = self.tx.get_hold(hold_id)
        if hold is None:
            raise NotFound(f"hold {hold_id} does not exist", field="hold_id")
        return hold

    # Building blocks ---------------------------------------------------------------------

    def _post(self, record: TxRecord, legs: Sequence[tuple[str, int]]) -> None:
        """Writes a balanced transaction: journal legs and the balances they change."""
        legs = [(account, points) for account, points in legs if points != 0]
        if sum(points for _, points in legs) != 0:
            raise AssertionError(f"unbalanced posting {record.tx_id}: {legs}")
        for account, points in legs:
            row = self._acct(account)
            row.balance += points
            self._put(row)
        self.tx.add_entries(record, legs)

    def _finish(self, record: TxRecord, event_type: str, data: dict[str, Any], *, earned_delta: int = 0) -> Transaction:
        """Bumps the member's balance version, stores the transaction and queues its event."""
        balance = self._bump(record.member_id, record.unit, earned_delta=earned_delta)
        record.balance_after_json = codec.dumps(balance)
        self.tx.add_transaction(record)
        self.emit(event_type, balance, data)
        return to_transaction(record, balance)

    def _bump(self, member_id: str, unit: str, *, reserved_delta: int = 0, earned_delta: int = 0) -> Balance:
        row = self._acct(member_account(member_id, unit))
        row.reserved += reserved_delta
        row.lifetime_earned += earned_delta
        row.version += 1
        self._put(row)
        return self.balance(member_id, unit)

    def emit(self, event_type: str, balance: Balance, data: dict[str, Any]) -> None:
        event_id = f"ev_{uuid.uuid4().hex}"
        payload = {
            "event_id": event_id,
            "type": event_type,
            "occurred_at": self.now.isoformat(),
            "member_id": balance.member_id,
            "unit": balance.unit,
            "balance": codec.to_plain(balance),
            "data": codec.to_plain(data),
        }
        self.tx.add_outbox(event_id, balance.member_id, codec.dumps_plain(payload), self.now)
        self.touched.append(balance)

    def _record(self, kind: TxKind, member_id: str, unit: str, points: int, **extra: Any) -> TxRecord:
        business_time = extra.pop("business_time", None) or self.now
        tx_id = extra.pop("tx_id", None) or new_id("tx", member_id)
        return TxRecord(tx_id, kind, member_id, unit, points, self.now, business_time, **extra)

    def _credit_legs(
        self, member_id: str, unit: str, portions: Sequence[Portion], earn_tx: str
    ) -> tuple[list[tuple[str, int]], str]:
        """Legs and lots that credit the member, paying any recorded debt first."""
        total = sum(p for p, _ in portions)
        owed = -self._acct(debt_account(member_id, unit)).balance
        pay = min(total, owed)
        legs = [(debt_account(member_id, unit), pay), (member_account(member_id, unit), total - pay)]
        first_lot = ""
        to_skip = pay
        for points, expires_at in portions:
            skip = min(points, to_skip)
            to_skip -= skip
            if points - skip <= 0:
                continue
            lot = Lot(
                lot_id=new_lot_id(),
                member_id=member_id,
                unit=unit,
                earn_transaction_id=earn_tx,
                original_points=points,
                remaining_points=points - skip,
                expires_at=expires_at,
                created_at=self.now,
            )
            self.tx.add_lot(lot)
            first_lot = first_lot or lot.lot_id
        return legs, first_lot

    def _held(self, member_id: str, unit: str) -> tuple[list[Reserved], int]:
        """What open holds keep of the member's lots: the lots each named when placed, and the
        points they name none for (holds placed before 2026-12-07), which keep the
        earliest-expiring points."""
        reserved = max(0, self._acct(member_account(member_id, unit)).reserved)
        if reserved == 0:
            return [], 0
        named = [r for hold in self.tx.placed_holds_of(member_id) if hold.unit == unit for r in hold.reserves]
        return named, max(0, reserved - sum(r.points for r in named))

    def _free(self, member_id: str, unit: str, lots: list[Lot]) -> list[int]:
        """Each lot's points (lots earliest expiry first) that no open hold keeps."""
        named, pooled = self._held(member_id, unit)
        return _free_of(lots, named, pooled)

    def _consume_lots(
        self, member_id: str, unit: str, points: int, prefer_lot: str = "", *, capture: bool = False,
        lots: list[Lot] | None = None,
    ) -> list[Portion]:  # fmt: skip
        """Takes points from lots, earliest expiry first; returns what it took, with expiries.

        Open holds keep their lots (Hold.reserves): a capture takes from them, and expiry
        leaves them alone while the holds are open. Any other debit takes the points no hold
        keeps, so it cannot spend what a hold keeps from expiring (then a voided hold would
        leave nothing due to expire). `capture` takes the earliest-expiring points whoever
        keeps them: a hold that named too few lots (placed before lots were named). A reversal
        takes `prefer_lot` (its earn's own lot, held or not: a hold's points then keep the
        earliest-expiring left) first, and the rest like any other debit."""
        taken: list[Portion] = []
        if lots is None:  # else the debit's own read (_require_available), as its expiry left them
            lots = self.tx.spendable_lots(member_id, unit)
        for lot in lots:
            if lot.lot_id == prefer_lot and points > 0 and lot.remaining_points > 0:
                take = min(points, lot.remaining_points)
                lot.remaining_points -= take
                points -= take
                self.tx.update_lot(lot)
                taken.append((take, lot.expires_at))
        frees = [lot.remaining_points for lot in lots] if capture else self._free(member_id, unit, lots)
        for lot, free in zip(lots, frees, strict=True):
            if points <= 0:
                break
            take = min(points, free)
            if take > 0:
                lot.remaining_points -= take
                points -= take
                self.tx.update_lot(lot)
                taken.append((take, lot.expires_at))
        for lot in reversed(lots):  # only when the points after the holds' fall short
            if points <= 0:
                break
            take = min(points, lot.remaining_points)
            if take > 0:
                lot.remaining_points -= take
                points -= take
                self.tx.update_lot(lot)
                taken.append((take, lot.expires_at))
        return taken

    def _consume_portions(self, member_id: str, unit: str, portions: Sequence[Portion], more: int = 0) -> None:
        """Takes the points of each portion from lots of the same expiry; what no such lot still
        holds (a portion with no lot, or lots spent since), and `more` points, are taken as a
        capture takes them."""
        lots = self.tx.spendable_lots(member_id, unit)
        rest = more
        for points, expires in portions:
            for lot in lots:  # a portion that never expires comes from lots that never do
                if points <= 0:
                    break
                if lot.expires_at == expires and lot.remaining_points > 0:
                    take = min(points, lot.remaining_points)
                    lot.remaining_points -= take
                    points -= take
                    self.tx.update_lot(lot)
            rest += points
        if rest:
            self._consume_lots(member_id, unit, rest, capture=True)

    def _normalise_lots(self, member_id: str, unit: str, balance_before: int | None = None) -> None:
        """Keeps lots equal to the positive balance: credits first fill a negative balance.

        A credit onto a balance that was not negative keeps that equality by itself, so the
        caller that knows `balance_before` spares the sum over the member's lots.
        """
        if balance_before is not None and balance_before >= 0:
            return
        balance = self._acct(member_account(member_id, unit)).balance
        excess = self.tx.spendable_total(member_id, unit) - max(balance, 0)
        if excess > 0:
            self._consume_lots(member_id, unit, excess)

    def _sweep_due(self, member_id: str, unit: str) -> list[Lot]:
        """Does for the account what the maintenance pass would have done by now, so every debit
        (a redemption, a hold, a transfer, an adjustment, a reversal, debt paid from released
        points) sees the same balance whenever the pass last ran: a hold's timeout and a lot's
        date are promises made to the member, not the job's schedule. Holds past their timeout
        are voided as expired (not a transfer's or a review's: their owner settles them), then
        points past their date that no hold keeps expire (a hold naming due points would keep
        them: void it and place another before the job runs, and they would never expire); what
        the released holds freed then pays recorded debt first, as the pass's void would.
        Returns the member's lots as that left them, earliest expiry first."""
        if self._acct(member_account(member_id, unit)).reserved > 0:
            for hold in self.tx.placed_holds_of(member_id):
                if hold.unit == unit and self._timed_out(hold):
                    self._release(hold, expired=True)
        lots = self.tx.spendable_lots(member_id, unit)
        if any(self._past_date(lot) for lot in lots):
            self._expire_account(member_id, unit, lots, self._free(member_id, unit, lots))
        if self._pay_debt(member_id, unit):
            lots = self.tx.spendable_lots(member_id, unit)  # as paying the debt left them
        return lots

    def _require_available(self, member_id: str, unit: str, points: int) -> list[Lot]:
        """The member's lots once the account is swept (`_sweep_due`), if the points are there."""
        lots = self._sweep_due(member_id, unit)
        balance = self.balance(member_id, unit)
        if balance.available_points < points:
            raise InsufficientPoints(member_id, unit, balance.available_points, points)
        return lots

    # Operations --------------------------------------------------------------------------

    def earn(
        self,
        member_id: str,
        unit: str,
        points: int,
        *,
        funding_source: str,
        business_time: datetime | None,
        expires_at: datetime | None,
        release_at: datetime | None,
        pending_review: bool,
        purchase: Money | None,
        reference: str,
        never_expires: bool = False,
    ) -> EarnResult:
        """`expires_at` None: the ledger's default expiry, unless `never_expires` (a program
        whose policy says its points never expire)."""
        biz = business_time or self.now
        if expires_at is not None and expires_at <= biz:
            raise InvalidArgument("must be later than the business time", field="expires_at")
        expiry = None if never_expires else expires_at or self.policy.default_expiry(biz)
        pending = pending_review or (release_at is not None and release_at > self.now)
        record = self._record(
            TxKind.EARN, member_id, unit, points, business_time=biz, reference=reference,
            funding=funding_source, purchase_minor=purchase.amount_minor if purchase else 0,
            purchase_currency=purchase.currency if purchase else "", pending=pending,
        )  # fmt: skip
        funding = (funding_account(funding_source, unit), -points)
        if pending:
            lot = Lot(
                lot_id=new_lot_id(), member_id=member_id, unit=unit,
                earn_transaction_id=record.tx_id, original_points=points, remaining_points=points,
                expires_at=expiry, created_at=self.now, pending=True, release_at=release_at,
                pending_review=pending_review,
            )  # fmt: skip
            self.tx.add_lot(lot)
            record.lot_id = lot.lot_id
            self._post(record, [funding, (pending_account(member_id, unit), points)])
        else:
            before = self._acct(member_account(member_id, unit)).balance
            legs, record.lot_id = self._credit_legs(member_id, unit, [(points, expiry)], record.tx_id)
            self._post(record, [funding, *legs])
            self._normalise_lots(member_id, unit, before)
        transaction = self._finish(
            record, "points_earned",
            {"transaction_id": record.tx_id, "points": points, "lot_id": record.lot_id, "pending": pending,
             "funding_source": funding_source, "reference": reference, "business_time": biz.isoformat()},
            earned_delta=0 if pending else points,
        )  # fmt: skip
        return EarnResult(transaction, record.lot_id, pending)

    def release_pending_lot(self, lot: Lot) -> Transaction:
        """Makes a pending credit spendable: pending -> member (paying debt first)."""
        if not lot.pending or lot.remaining_points <= 0:
            raise FailedPrecondition(
                f"transaction {lot.earn_transaction_id} has no pending points", field="transaction_id"
            )
        points = lot.remaining_points
        lot.pending = False
        owed = -self._acct(debt_account(lot.member_id, lot.unit)).balance
        pay = min(points, owed)
        lot.remaining_points = points - pay
        lot.pending_review = False
        self.tx.update_lot(lot)
        record = self._record(
            TxKind.PENDING_RELEASE, lot.member_id, lot.unit, points, original_tx=lot.earn_transaction_id
        )
        self._post(
            record,
            [
                (pending_account(lot.member_id, lot.unit), -points),
                (debt_account(lot.member_id, lot.unit), pay),
                (member_account(lot.member_id, lot.unit), points - pay),
            ],
        )
        self._normalise_lots(lot.member_id, lot.unit)
        return self._finish(
            record,
            "pending_released",
            {"transaction_id": lot.earn_transaction_id, "points": points},
            earned_delta=points,
        )

    def release_pending(self, tx_id: str) -> Transaction:
        return self.release_pending_lot(self._earn_lot(tx_id))

    def approve_pending(self, tx_id: str) -> Transaction | None:
        """A fraud review's approval: the credit is no longer held for review, and becomes
        spendable now, or at its release time (the return window) if that is still ahead.
        None when nothing is left to release (the purchase was returned meanwhile) or the
        release waits for its time."""
        lot = self._earn_lot(tx_id)
        if not lot.pending or lot.remaining_points <= 0:
            return None
        if lot.release_at is not None and lot.release_at > self.now:
            lot.pending_review = False
            self.tx.update_lot(lot)
            return None
        return self.release_pending_lot(lot)

    def _earn_lot(self, tx_id: str) -> Lot:
        original = self.require_transaction(tx_id)
        lot = self.tx.lot_of_transaction(tx_id)
        if original.kind != TxKind.EARN or lot is None:
            raise FailedPrecondition(f"transaction {tx_id} is not an earn", field="transaction_id")
        return lot

    def release_moved_pending(self, tx_id: str, member_id: str) -> Transaction:
        lot = self.tx.lot_of_transaction(tx_id, member_id)
        if lot is None or lot.member_id != member_id:  # a store may answer with another member's lot
            raise FailedPrecondition(f"transaction {tx_id} has no pending points", field="transaction_id")
        return self.release_pending_lot(lot)

    def redeem(
        self, member_id: str, unit: str, points: int, *, business_time: datetime | None, reference: str
    ) -> Transaction:
        lots = self._require_available(member_id, unit, points)
        record = self._record(TxKind.REDEEM, member_id, unit, -points, business_time=business_time, reference=reference)
        self._post(record, [(member_account(member_id, unit), -points), (system_account("redeemed", unit), points)])
        self._consume_lots(member_id, unit, points, lots=lots)
        return self._finish(
            record,
            "points_redeemed",
            {"transaction_id": record.tx_id, "points": points, "reference": reference},
        )

    def adjust(self, member_id: str, unit: str, points: int, *, reason: str, operator_id: str) -> Transaction:
        if points < 0:
            self._require_available(member_id, unit, -points)
        record = self._record(TxKind.ADJUSTMENT, member_id, unit, points, reference=reason, funding="adjustments")
        counter = (system_account("adjustments", unit), -points)
        if points > 0:
            legs, record.lot_id = self._credit_legs(
                member_id, unit, [(points, self.policy.default_expiry(self.now))], record.tx_id
            )
            self._post(record, [counter, *legs])
            self._normalise_lots(member_id, unit)
        else:
            self._post(record, [counter, (member_account(member_id, unit), points)])
            self._consume_lots(member_id, unit, -points)
        return self._finish(
            record, "points_adjusted",
            {"transaction_id": record.tx_id, "points": points, "reason": reason, "operator_id": operator_id},
        )  # fmt: skip

    def place_hold(
        self, member_id: str, unit: str, points: int, *, timeout: timedelta, reference: str, saga_id: str = "",
        channel: str = "", store_id: str = "",
    ) -> HoldResult:  # fmt: skip
        lots = self._require_available(member_id, unit, points)
        hold = Hold(
            hold_id=new_id("h", member_id), member_id=member_id, unit=unit, points=points,
            status=HoldStatus.PLACED, captured_points=0, created_at=self.now, expires_at=self.now + timeout,
            reference=reference, saga_id=saga_id, channel=channel, store_id=store_id,
            reserves=_reserves(lots, self._free(member_id, unit, lots), points),
        )  # fmt: skip
        self.tx.add_hold(hold)
        balance = self._bump(member_id, unit, reserved_delta=points)
        self.emit(
            "hold_placed",
            balance,
            {"hold_id": hold.hold_id, "points": points, "expires_at": hold.expires_at.isoformat()},
        )
        return HoldResult(hold, balance)

    @staticmethod
    def _check_owner(hold: Hold, owner: str) -> None:
        """A hold placed by a transfer saga or a fraud review is settled only by its owner."""
        if hold.saga_id and hold.saga_id != owner:
            what = "is under fraud review" if hold.saga_id.startswith("rv_") else "belongs to transfer"
            raise FailedPrecondition(f"hold {hold.hold_id} {what} {hold.saga_id}", field="hold_id")

    def _open_hold(self, hold_id: str, *, saga: bool = False, owner: str = "") -> Hold:
        hold = self.require_hold(hold_id)
        if not saga:
            self._check_owner(hold, owner)
        if hold.status != HoldStatus.PLACED:
            raise FailedPrecondition(f"hold {hold_id} is {hold.status.value}, not PLACED", field="hold_id")
        if hold.expires_at <= self.now and not hold.saga_id:
            raise FailedPrecondition(f"hold {hold_id} expired at {hold.expires_at.isoformat()}", field="hold_id")
        return hold

    def capture_hold(
        self, hold_id: str, points: int, *, kind: TxKind = TxKind.HOLD_CAPTURE, tx_id: str = "", owner: str = "",
        portions: Sequence[Portion] = (), transfer: tuple[str, str] | None = None,
    ) -> HoldResult:  # fmt: skip
        """`portions`: the lots (by expiry) a transfer's recipient was credited with, which the
        capture must take, so no point changes its expiry on the way. `transfer` (transfer id,
        recipient): the capture is a transfer's sending side, and tells the sender so, as a
        same-shard transfer does, not as points spent."""
        hold = self._open_hold(hold_id, saga=kind == TxKind.TRANSFER_OUT, owner=owner)
        captured = points or hold.points
        if captured > hold.points:
            raise InvalidArgument(f"cannot capture {captured} points of a {hold.points}-point hold", field="points")
        counter = system_account("transit" if kind == TxKind.TRANSFER_OUT else "redeemed", hold.unit)
        self._bump(hold.member_id, hold.unit, reserved_delta=-hold.points)
        record = self._record(kind, hold.member_id, hold.unit, -captured, reference=hold.reference, tx_id=tx_id or None)
        self._post(record, [(member_account(hold.member_id, hold.unit), -captured), (counter, captured)])
        if not portions:  # the hold's own lots (a transfer's capture: those its recipient was credited with)
            portions = _first(hold.reserves, captured)
        self._consume_portions(hold.member_id, hold.unit, portions, captured - sum(p for p, _ in portions))
        self.tx.set_hold_status(hold_id, HoldStatus.CAPTURED, captured)
        done = replace(hold, status=HoldStatus.CAPTURED, captured_points=captured)
        if transfer is None:
            transaction = self._finish(
                record, "hold_captured", {"hold_id": hold_id, "transaction_id": record.tx_id, "points": captured}
            )
        else:
            transaction = self._finish(record, "points_transferred", {
                "transfer_id": transfer[0], "transaction_id": record.tx_id, "counterparty_member_id": transfer[1],
                "points": -captured, "hold_id": hold_id,
            })  # fmt: skip
        if captured < hold.points:  # the rest released: it may pay debt (the account swept first)
            self._settle_debt(hold.member_id, hold.unit)
            return HoldResult(done, self.balance(hold.member_id, hold.unit), transaction)
        return HoldResult(done, transaction.balance_after, transaction)

    def void_hold(self, hold_id: str, *, expired: bool = False, owner: str = "") -> HoldResult:
        """A hold past its timeout is EXPIRED whether the maintenance pass released it yet or
        not (its timeout is a promise to the member, not the job's schedule): a void of it
        answers the hold as expired either way, its points free as the void wanted."""
        hold = self.require_hold(hold_id)
        if hold.status is HoldStatus.EXPIRED and not expired:
            return HoldResult(hold, self.balance(hold.member_id, hold.unit))
        if hold.status != HoldStatus.PLACED:
            raise FailedPrecondition(f"hold {hold_id} is {hold.status.value}, not PLACED", field="hold_id")
        self._check_owner(hold, owner)
        voided = self._release(hold, expired=expired or self._timed_out(hold))
        self._settle_debt(hold.member_id, hold.unit)
        return HoldResult(voided, self.balance(hold.member_id, hold.unit))

    def _release(self, hold: Hold, *, expired: bool) -> Hold:
        status = HoldStatus.EXPIRED if expired else HoldStatus.VOIDED
        self.tx.set_hold_status(hold.hold_id, status, 0)
        balance = self._bump(hold.member_id, hold.unit, reserved_delta=-hold.points)
        self.emit("hold_voided", balance, {"hold_id": hold.hold_id, "points": hold.points, "expired": expired})
        return replace(hold, status=status)

    def _settle_debt(self, member_id: str, unit: str) -> None:
        """Released points first pay debt a reversal recorded while they were reserved: those
        still spendable once the account is swept (`_sweep_due` pays), never points past their date."""
        if self._acct(debt_account(member_id, unit)).balance < 0:
            self._sweep_due(member_id, unit)

    def _pay_debt(self, member_id: str, unit: str) -> Transaction | None:
        """Pays recorded debt from the points no hold reserves (call once due points expired)."""
        owed = -self._acct(debt_account(member_id, unit)).balance
        if owed <= 0:
            return None
        row = self._acct(member_account(member_id, unit))
        pay = min(owed, row.balance - row.reserved)
        if pay <= 0:
            return None
        record = self._record(TxKind.DEBT_SETTLEMENT, member_id, unit, -pay, reference="debt settlement")
        self._post(record, [(member_account(member_id, unit), -pay), (debt_account(member_id, unit), pay)])
        self._consume_lots(member_id, unit, pay)
        return self._finish(
            record, "points_adjusted", {"transaction_id": record.tx_id, "points": -pay, "reason": "debt settlement"}
        )

    def reverse(self, tx_id: str, *, points: int | None, refund: Money | None, reason: str) -> ReverseResult:
        original, amount = self._reversal_of(tx_id, points, refund)
        unit, member_id = original.unit, original.member_id
        record = self._record(
            TxKind.REVERSAL,
            member_id,
            unit,
            -amount,
            reference=reason,
            original_tx=tx_id,
            funding=original.funding,
        )
        debt = self._take_back(
            record, member_id, unit, amount, (funding_account(original.funding, unit), amount), tx_id,
            unreversed=original.points - original.reversed_points,
        )  # fmt: skip
        original.reversed_points += amount
        if refund is not None:
            original.refunded_minor += refund.amount_minor
        self.tx.update_transaction(original)
        transaction = self._finish(
            record, "points_reversed",
            {"transaction_id": record.tx_id, "original_transaction_id": tx_id, "points": amount, "debt_points": debt},
        )  # fmt: skip
        return ReverseResult(transaction, amount, debt)

    def reversible_points(self, earn_tx: str) -> int:
        return max(0, _reversible(self.require_transaction(earn_tx)))

    def tender_left(self, tx_id: str) -> int:
        """Points of a redemption not yet given back (its points are negative)."""
        original = self.require_transaction(tx_id, "tender_transaction_id")
        return max(0, -original.points - original.reversed_points)

    def recredit_tender(self, tx_id: str, points: int, *, reason: str, lifetime_s: int = -1) -> Transaction:
        """Points the member paid with come back when the goods do, as a fresh lot living as long
        as the purchase's program gives its points (`lifetime_s`: 0 never expires, -1 unknown:
        the ledger's default)."""
        original = self.require_transaction(tx_id, "tender_transaction_id")
        member_id, unit = original.member_id, original.unit
        record = self._record(TxKind.REVERSAL, member_id, unit, points, reference=reason, original_tx=tx_id)
        if lifetime_s < 0:
            expiry = self.policy.default_expiry(self.now)
        else:
            expiry = self.now + timedelta(seconds=lifetime_s) if lifetime_s else None
        legs, record.lot_id = self._credit_legs(member_id, unit, [(points, expiry)], record.tx_id)
        self._post(record, [(system_account("redeemed", unit), -points), *legs])
        self._normalise_lots(member_id, unit)
        original.reversed_points += points
        self.tx.update_transaction(original)
        return self._finish(
            record, "points_reversed",
            {"transaction_id": record.tx_id, "original_transaction_id": tx_id, "points": -points, "debt_points": 0},
        )  # fmt: skip

    def _take_back(
        self, record: TxRecord, member_id: str, unit: str, amount: int, counter: tuple[str, int], earn_tx: str,
        *, unreversed: int = 0,
    ) -> int:  # fmt: skip
        """Posts a reversal's member side; returns the part recorded as debt (decision 0007).

        Points of the earn that expired unspent are gone from the member already: the reversal
        takes its share of them (in proportion to the earn's points it reverses, the last
        reversal all that is left) back from breakage, and only the rest from the member."""
        lot = self.tx.lot_of_transaction(earn_tx, member_id)
        if lot is not None and lot.pending and lot.member_id == member_id:
            lot.remaining_points -= amount
            self.tx.update_lot(lot)
            self._post(record, [counter, (pending_account(member_id, unit), -amount)])
            return 0
        # Points past their date pay nothing back either: they expire first (the earn's own lot
        # among them goes to breakage, which the share below then takes back from). The lot is
        # read again as the sweep left it (expired, or spent on debt the sweep paid).
        self._sweep_due(member_id, unit)
        lot = self.tx.lot_of_transaction(earn_tx, member_id)
        legs = [counter]
        expired = self._expired_share(lot, member_id, amount, unreversed)
        if expired:
            legs.append((system_account("expired", unit), -expired))
        row = self._acct(member_account(member_id, unit))
        floor = row.reserved if row.reserved > 0 else -self.policy.negative_limit_points
        take = max(0, min(amount - expired, row.balance - floor))
        debt = amount - expired - take
        self._post(record, [*legs, (member_account(member_id, unit), -take), (debt_account(member_id, unit), -debt)])
        self._consume_lots(member_id, unit, take, prefer_lot=lot.lot_id if lot else "")
        self._normalise_lots(member_id, unit)
        return debt

    def _expired_share(self, lot: Lot | None, member_id: str, amount: int, unreversed: int) -> int:
        """The expired points of the earn's lot a reversal of `amount` takes back, recorded on the
        lot: ceil(amount x expired / `unreversed`, the earn's points not reversed before it), so
        the reversal of all that is left takes all of them; never more than `amount`. 0 without
        `unreversed` (a merged-away earn, taken back whole from the member it went to)."""
        if lot is None or lot.member_id != member_id or lot.expired_points <= 0 or unreversed <= 0:
            return 0
        expired = lot.expired_points
        share = (
            min(expired, amount) if unreversed <= amount else min(expired, amount, -(-amount * expired // unreversed))
        )
        lot.expired_points -= share
        self.tx.update_lot(lot)
        return share

    def start_merged_reversal(
        self, tx_id: str, *, points: int | None, refund: Money | None, reason: str, target: str, saga_id: str,
        caps: dict[str, int] | None = None,
    ) -> str:  # fmt: skip
        """Source side of reversing an earn whose member was merged away: the funding gets its
        points back now, the share of them that expired on the source before the merge from
        breakage (recorded on the source's lot of the earn) and the rest through transit; the
        target gives those up in the second step."""
        original, amount = self._reversal_of(tx_id, points, refund)
        unit, unreversed = original.unit, original.points - original.reversed_points
        record = self._record(TxKind.REVERSAL, original.member_id, unit, 0, reference=reason, original_tx=tx_id,
                              funding=original.funding, tx_id=f"{saga_id.replace('rv_', 'tx_', 1)}-out")  # fmt: skip
        lot = self.tx.lot_of_transaction(tx_id, original.member_id)
        expired = 0 if lot is None or lot.pending else self._expired_share(lot, original.member_id, amount, unreversed)
        self._post(record, [
            (funding_account(original.funding, unit), amount), (system_account("expired", unit), -expired),
            (system_account("transit", unit), expired - amount),
        ])  # fmt: skip
        original.reversed_points += amount
        if refund is not None:
            original.refunded_minor += refund.amount_minor
        self.tx.update_transaction(original)
        self._finish(
            record, "points_reversed",
            {"transaction_id": record.tx_id, "original_transaction_id": tx_id, "points": 0, "debt_points": 0},
        )  # fmt: skip
        # The earn's points not reversed before this one: the target's share of expired points
        # (of a credit still pending at the merge, whose lot moved there whole); and what the
        # source took back from breakage, which the target does not give up.
        # `caps`: the capped points a return, or a reversal of all the rest, gives back to the caps the target keeps now.
        payload = {"original_tx": tx_id, "reason": reason, "unreversed": unreversed, "expired": expired,
                   "caps": caps or {}}  # fmt: skip
        self.tx.add_saga(SagaRecord(saga_id, "reversal", SagaState.HELD, original.member_id, target, unit, amount, "",
                                    json.dumps(payload), self.now, self.now))  # fmt: skip
        return saga_id

    def finish_merged_reversal(self, target: str, unit: str, amount: int, *, original_tx: str, tx_id: str,
                               reason: str, unreversed: int = 0, expired: int = 0) -> ReverseResult:  # fmt: skip
        """Target side (`expired`: what the source took back from breakage instead); a second
        call with the same tx_id returns the first result."""
        existing = self.tx.get_transaction(tx_id)
        if existing is None:
            record = self._record(
                TxKind.REVERSAL, target, unit, -amount, tx_id=tx_id, reference=reason, original_tx=original_tx
            )
            # On a reversal record, reversed_points keeps the part recorded as debt.
            record.reversed_points = self._take_back(
                record, target, unit, amount - expired, (system_account("transit", unit), amount - expired),
                original_tx, unreversed=unreversed,
            )  # fmt: skip
            self._finish(
                record, "points_reversed",
                {"transaction_id": tx_id, "original_transaction_id": original_tx, "points": amount,
                 "debt_points": record.reversed_points},
            )  # fmt: skip
            existing = record
        return ReverseResult(to_transaction(existing), amount, existing.reversed_points)

    def reverses_whole(self, tx_id: str, points: int | None, refund: Money | None) -> bool:
        """Whether a reversal of these points or this refund (None, None: in full) takes back all
        that is still reversible of the earn."""
        original, amount = self._reversal_of(tx_id, points, refund)
        return amount >= _reversible(original)

    def _reversal_of(self, tx_id: str, points: int | None, refund: Money | None) -> tuple[TxRecord, int]:
        """The earn being reversed and how many points this reversal takes back."""
        original = self.require_transaction(tx_id)
        if original.kind != TxKind.EARN:
            raise FailedPrecondition(
                f"transaction {tx_id} is {original.kind.value}; only earns are reversed", field="transaction_id"
            )
        reversible = _reversible(original)
        if reversible <= 0:
            raise AlreadyReversed(f"transaction {tx_id} is already fully reversed", field="transaction_id")
        return original, self._reversal_amount(original, reversible, points, refund)

    @staticmethod
    def _reversal_amount(original: TxRecord, reversible: int, points: int | None, refund: Money | None) -> int:
        if points is not None:
            if points > reversible:
                raise FailedPrecondition(
                    f"only {reversible} points of transaction {original.tx_id} can still be reversed",
                    field="points",
                )
            return points
        if refund is None:
            return reversible
        if original.purchase_minor <= 0:
            raise FailedPrecondition(
                f"transaction {original.tx_id} recorded no purchase amount; reverse by points instead",
                field="refund_amount",
            )
        if refund.currency != original.purchase_currency:
            raise InvalidArgument(
                f"refund currency {refund.currency} differs from the purchase currency {original.purchase_currency}",
                field="refund_amount.currency",
            )
        refunded = original.refunded_minor + refund.amount_minor
        if refunded > original.purchase_minor:
            raise InvalidArgument(
                f"refunds total {refunded} minor units, more than the purchase of {original.purchase_minor}",
                field="refund_amount.amount_minor",
            )
        # Proportional on the cumulative refund, floored, so several partial refunds add up exactly.
        due = original.points * refunded // original.purchase_minor
        return max(0, min(reversible, due - original.reversed_points))

    # Transfers and merges move points through the transit account, one side per shard.

    def credit_transfer(self, member_id: str, unit: str, portions: Sequence[Portion], *, tx_id: str, kind: TxKind,
                        counterparty: str, transfer_id: str) -> Transaction:  # fmt: skip
        """Destination side of a transfer or merge; a second call with the same tx_id is a no-op."""
        existing = self.tx.get_transaction(tx_id)
        if existing is not None:
            return to_transaction(existing)
        total = sum(p for p, _ in portions)
        record = self._record(kind, member_id, unit, total, tx_id=tx_id, reference=transfer_id)
        legs, record.lot_id = self._credit_legs(member_id, unit, portions, tx_id)
        self._post(record, [(system_account("transit", unit), -total), *legs])
        self._normalise_lots(member_id, unit)
        return self._finish(
            record, "points_transferred",
            {"transfer_id": transfer_id, "transaction_id": tx_id, "counterparty_member_id": counterparty, "points": total},
        )  # fmt: skip

    def debit_transfer(self, member_id: str, unit: str, points: int, *, tx_id: str, counterparty: str,
                       transfer_id: str) -> tuple[Transaction, list[Portion]]:  # fmt: skip
        """Source side of a same-shard transfer: debit now, to the transit account."""
        lots = self._require_available(member_id, unit, points)
        record = self._record(TxKind.TRANSFER_OUT, member_id, unit, -points, tx_id=tx_id, reference=transfer_id)
        self._post(record, [(member_account(member_id, unit), -points), (system_account("transit", unit), points)])
        taken = self._consume_lots(member_id, unit, points, lots=lots)
        transaction = self._finish(
            record, "points_transferred",
            {"transfer_id": transfer_id, "transaction_id": tx_id, "counterparty_member_id": counterparty, "points": -points},
        )  # fmt: skip
        return transaction, taken

    def move_out_all(self, member_id: str, unit: str, target: str, merge_id: str) -> dict[str, Any] | None:
        """Source side of a merge: empties posted, pending and debt into transit, keeping lot details.

        A hold placed while the merge was starting is voided first (its capture then fails rather
        than overdrawing the emptied source); a transfer in flight makes the merge wait.
        """
        for hold in self.tx.placed_holds_of(member_id):
            if hold.unit != unit:
                continue
            if hold.saga_id:
                raise FailedPrecondition(
                    f"transfer {hold.saga_id} from member {member_id} is in flight; retry the merge",
                    field="source_member_id",
                )
            if self.require_hold(hold.hold_id).status == HoldStatus.PLACED:  # else an earlier void swept it
                self.void_hold(hold.hold_id)
        # Points past their date expire here, on the lots of the earns that gave them: a later
        # reversal of such an earn takes them back from breakage, not from the heir's points.
        self._sweep_due(member_id, unit)
        bal = self.balance(member_id, unit)
        # What the member earned goes with it too: the heir's lifetime_earned_points is the person's.
        lifetime = bal.lifetime_earned_points
        if not (bal.balance_points or bal.pending_points or bal.debt_points or lifetime):
            return None
        spendable = self.tx.spendable_lots(member_id, unit)
        pending = self.tx.pending_lots(member_id, unit)
        # Each lot goes with its earn and the points of it that expired here, which the earn's
        # reversal takes back from breakage wherever the lot ends up (a chain of merges too);
        # lots all spent or expired go only for that claim.
        spent = self.tx.spent_lots_with_expired(member_id, unit)
        moved = {
            "balance": bal.balance_points,
            "pending": bal.pending_points,
            "debt": bal.debt_points,
            "lifetime": lifetime,
            "lots": [
                [lot.remaining_points, lot.expires_at.isoformat() if lot.expires_at else None, lot.earn_transaction_id,
                 lot.expired_points]
                for lot in [*spendable, *spent]
            ],
            "pending_lots": [
                [lot.remaining_points, lot.expires_at.isoformat() if lot.expires_at else None,
                 lot.release_at.isoformat() if lot.release_at else None, lot.pending_review, lot.earn_transaction_id]
                for lot in pending
            ],
        }  # fmt: skip
        for lot in [*spendable, *pending, *spent]:
            lot.remaining_points = lot.expired_points = 0
            self.tx.update_lot(lot)
        net = bal.balance_points + bal.pending_points - bal.debt_points
        record = self._record(
            TxKind.MERGE_OUT,
            member_id,
            unit,
            -bal.balance_points,
            tx_id=f"{merge_id}-out{unit_tag(unit)}",
            reference=merge_id,
        )
        self._post(
            record,
            [
                (member_account(member_id, unit), -bal.balance_points),
                (pending_account(member_id, unit), -bal.pending_points),
                (debt_account(member_id, unit), bal.debt_points),
                (system_account("transit", unit), net),
            ],
        )
        self._finish(
            record,
            "members_merged",
            {"source_member_id": member_id, "target_member_id": target, "points": -bal.balance_points},
            earned_delta=-lifetime,
        )
        return moved

    def move_in_all(self, member_id: str, unit: str, moved: dict[str, Any], source: str, merge_id: str) -> None:
        tx_id = f"{merge_id}-in{unit_tag(unit)}"
        if self.tx.get_transaction(tx_id) is not None:
            return
        balance, pending, debt = int(moved["balance"]), int(moved["pending"]), int(moved["debt"])
        record = self._record(TxKind.MERGE_IN, member_id, unit, balance, tx_id=tx_id, reference=merge_id)
        for points, expires, *earned in moved["lots"]:
            # Keeps the earn that gave them and the claim on what of it expired (merges of before
            # 2026-12-07 name neither): its reversal takes those back from breakage.
            self.tx.add_lot(Lot(
                lot_id=new_lot_id(), member_id=member_id, unit=unit, earn_transaction_id=earned[0] if earned else tx_id,
                original_points=points, remaining_points=points,
                expires_at=datetime.fromisoformat(expires) if expires else None, created_at=self.now,
                expired_points=earned[1] if len(earned) > 1 else 0,
            ))  # fmt: skip
        for points, expires, release, review, earn_tx in moved["pending_lots"]:
            # Keeps the original earn id so ReleasePending of that earn still finds it.
            self.tx.add_lot(Lot(
                lot_id=new_lot_id(), member_id=member_id, unit=unit, earn_transaction_id=earn_tx,
                original_points=points, remaining_points=points,
                expires_at=datetime.fromisoformat(expires) if expires else None, created_at=self.now,
                pending=True, release_at=datetime.fromisoformat(release) if release else None, pending_review=review,
            ))  # fmt: skip
        net = balance + pending - debt
        # A negative balance moved in stops at the target's floor, as a reversal does; what lies
        # below it is debt (decision 0007). Two members at the limit merged into one must not
        # leave it at twice the limit, nor a target's open hold unfunded.
        below = 0
        if balance < 0:
            row = self._acct(member_account(member_id, unit))
            floor = row.reserved if row.reserved > 0 else -self.policy.negative_limit_points
            below = min(-balance, max(0, floor - (row.balance + balance)))
        self._post(
            record,
            [
                (system_account("transit", unit), -net),
                (member_account(member_id, unit), balance + below),
                (pending_account(member_id, unit), pending),
                (debt_account(member_id, unit), -debt - below),
            ],
        )
        self._normalise_lots(member_id, unit)
        self._finish(
            record,
            "members_merged",
            {"source_member_id": source, "target_member_id": member_id, "points": balance},
            earned_delta=int(moved.get("lifetime", 0)),  # none in merges of before 2026-12-07
        )
        self._settle_debt(member_id, unit)  # debt is paid first by any credit, a merge's too

    # Time-driven jobs --------------------------------------------------------------------

    def expire_due(self, limit: int = 500, after: object = None) -> tuple[int, int, object]:
        """Expires the due points of the accounts one page of due lots names, never the lots
        open holds keep (Hold.reserves, which their capture takes); returns (points expired,
        lots expired in part or whole, the next page's cursor or None). An account is settled
        whole from all its lots, so holds are counted once however many pages its due lots fill."""
        lots, cursor = self.tx.lots_expired_by(self.now, limit, after)
        accounts = dict.fromkeys((lot.member_id, lot.unit) for lot in lots)
        expired_points = touched = 0
        for member_id, unit in accounts:
            account_lots = self.tx.spendable_lots(member_id, unit)
            points, lots_touched = self._expire_account(
                member_id, unit, account_lots, self._free(member_id, unit, account_lots)
            )
            expired_points += points
            touched += lots_touched
        return expired_points, touched, cursor

    def _expire_account(self, member_id: str, unit: str, lots: list[Lot], frees: list[int]) -> tuple[int, int]:
        """Expires the account's due points that no open hold keeps (`lots` with their free
        points, earliest expiry first; never taking the balance below what holds reserve);
        returns (points expired, lots expired in part or whole). The lots are updated in place."""
        row = self._acct(member_account(member_id, unit))
        due = [(lot, free) for lot, free in zip(lots, frees, strict=True) if self._past_date(lot)]
        amount = max(0, min(sum(free for _, free in due), row.balance - row.reserved))
        if amount == 0:
            return 0, 0
        left, touched = amount, 0
        for lot, free in due:
            take = min(left, free)
            if take > 0:
                lot.remaining_points -= take
                lot.expired_points += take
                left -= take
                touched += 1
                self.tx.update_lot(lot)
            if left == 0:
                break
        record = self._record(TxKind.EXPIRY, member_id, unit, -amount)
        self._post(record, [(member_account(member_id, unit), -amount), (system_account("expired", unit), amount)])
        self._finish(record, "points_expired", {"transaction_id": record.tx_id, "points": amount})
        return amount, touched

    def release_due(self, limit: int = 500) -> int:
        lots = self.tx.pending_due_by(self.now, limit)
        for lot in lots:
            self.release_pending_lot(lot)
        return len(lots)

    def void_due_holds(self, limit: int = 500) -> int:
        holds = self.tx.holds_due_by(self.now, limit)
        for hold in holds:
            # One voided before it may have swept the member's other timed-out holds already.
            if self.require_hold(hold.hold_id).status == HoldStatus.PLACED:
                self.void_hold(hold.hold_id, expired=True)
        return len(holds)


def to_transaction(record: TxRecord, balance_after: Balance | None = None) -> Transaction:
    """The domain view of a stored transaction; `balance_after` saves decoding what was just encoded."""
    return Transaction(
        transaction_id=record.tx_id,
        kind=record.kind,
        member_id=record.member_id,
        unit=record.unit,
        points=record.points,
        recorded_at=record.recorded_at,
        business_time=record.business_time,
        reference=record.reference,
        balance_after=balance_after or codec.loads(Balance, record.balance_after_json),
    )


def _reversible(earn: TxRecord) -> int:
    """Points of an earn not yet taken back."""
    return earn.points - earn.reversed_points


def _free_of(lots: list[Lot], named: Sequence[Reserved], pooled: int) -> list[int]:
    """Each lot's points (lots earliest expiry first) beyond what open holds keep: the lots of
    each expiry a hold named keep its points; what finds no such lot any more (spent by a
    reversal of their earn) and the `pooled` points of holds that named none keep the
    earliest-expiring points left."""
    wanted: dict[datetime | None, int] = {}
    for r in named:
        wanted[r.expires_at] = wanted.get(r.expires_at, 0) + r.points
    free = []
    for lot in lots:
        kept = min(wanted.get(lot.expires_at, 0), lot.remaining_points)
        if kept:
            wanted[lot.expires_at] -= kept
        free.append(lot.remaining_points - kept)
    keep = pooled + sum(wanted.values())
    for i, points in enumerate(free):
        if keep <= 0:
            break
        kept = min(keep, points)
        free[i] -= kept
        keep -= kept
    return free


def _reserves(lots: list[Lot], frees: list[int], points: int) -> tuple[Reserved, ...]:
    """Up to `points` of the lots' free points, earliest expiry first, by expiry: a new hold's."""
    out: list[Reserved] = []
    for lot, free in zip(lots, frees, strict=True):
        if points <= 0:
            break
        take = min(points, free)
        if take > 0:
            if out and out[-1].expires_at == lot.expires_at:
                out[-1] = Reserved(out[-1].points + take, lot.expires_at)
            else:
                out.append(Reserved(take, lot.expires_at))
            points -= take
    return tuple(out)


def _first(reserves: Sequence[Reserved], points: int) -> list[Portion]:
    """The first `points` of a hold's lots (a partial capture takes the earliest-expiring)."""
    out: list[Portion] = []
    for r in reserves:
        if points <= 0:
            break
        take = min(points, r.points)
        out.append((take, r.expires_at))
        points -= take
    return out
