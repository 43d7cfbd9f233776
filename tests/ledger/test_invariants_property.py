"""Random operation sequences against an in-process ledger keep its books straight.

Each example builds a fresh sharded SQLite ledger, runs a generated list of operations and,
after every one, checks the ledger against itself (`reconcile`) and against a small model the
test keeps: what was earned, redeemed, captured, reversed and adjusted, which holds are open
and which earns are still pending. The model also predicts which business error, if any, each
operation must fail with, so a wrong refusal fails the test as surely as a wrong posting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger_svc import commands as c
from ledger_svc.domain import (
    AlreadyReversed,
    Balance,
    FailedPrecondition,
    HoldStatus,
    IdemKey,
    IdempotencyConflict,
    InsufficientPoints,
    InvalidArgument,
    LedgerError,
    Money,
    NotFound,
    TxKind,
)
from ledger_svc.postings import Policy
from ledger_svc.reconcile import reconcile
from ledger_svc.service import LedgerService
from ledger_svc.store.sqlite import SqliteLedgerStore
from pointmesh.clock import ManualClock

R = TypeVar("R")
UNITS = ("points", "tier_credits")
MEMBERS = 4
HOLD_TIMEOUT = timedelta(minutes=15)
HOLD_MAX = timedelta(days=7)
MISSING_HOLD = "h_0000" + "0" * 24
MISSING_TX = "tx_0000" + "0" * 24
Key = tuple[int, str]  # (member slot, unit)


@dataclass(frozen=True)
class EarnOp:
    member: int
    unit: str
    points: int
    review: bool
    release_in: timedelta | None
    purchase_minor: int | None
    backdate: timedelta | None
    expires_in: timedelta | None


@dataclass(frozen=True)
class RedeemOp:
    member: int
    unit: str
    points: int


@dataclass(frozen=True)
class HoldOp:
    member: int
    unit: str
    points: int
    timeout: timedelta | None


@dataclass(frozen=True)
class CaptureOp:
    pick: int
    percent: int  # 0 captures the whole hold; above 100 asks for more than was held


@dataclass(frozen=True)
class VoidOp:
    pick: int


@dataclass(frozen=True)
class ReverseOp:
    pick: int
    how: str  # points, refund, full, or not_earn (targets a redeem or adjustment)
    percent: int
    currency: str


@dataclass(frozen=True)
class TransferOp:
    source: int
    destination: int
    unit: str
    points: int


@dataclass(frozen=True)
class AdjustOp:
    member: int
    unit: str
    points: int


@dataclass(frozen=True)
class ReleaseOp:
    pick: int


@dataclass(frozen=True)
class AdvanceOp:
    delta: timedelta


@dataclass(frozen=True)
class ReplayOp:
    pick: int


@dataclass(frozen=True)
class ConflictOp:
    pick: int
    cross_type: bool


def _optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.none(), strategy)


_slot = st.integers(0, MEMBERS - 1)
_unit = st.sampled_from(UNITS)
_points = st.integers(1, 500)
_spend = st.one_of(st.integers(1, 80), _points)  # small spends mostly fit, large ones probe refusals
# Slot i lives on shard i % shards: (0, 3) share a shard when there are 3, (0, 2) and (1, 3) when 2.
_transfer_pair = st.one_of(st.tuples(_slot, _slot), st.sampled_from([(0, 3), (3, 0), (0, 2), (2, 1), (1, 3), (3, 1)]))
_pick = st.integers(0, 1_000)
_duration = st.one_of(
    st.integers(1, 120).map(lambda m: timedelta(minutes=m)),
    st.integers(1, 72).map(lambda h: timedelta(hours=h)),
    st.integers(1, 40).map(lambda d: timedelta(days=d)),
)
_earn = st.builds(
    EarnOp,
    member=_slot,
    unit=_unit,
    points=_points,
    review=st.sampled_from([False, False, False, True]),
    release_in=_optional(_duration),
    purchase_minor=_optional(st.integers(100, 50_000)),
    backdate=_optional(_duration),
    expires_in=_optional(_duration),
)
operations = st.one_of(
    _earn,
    _earn,
    st.builds(RedeemOp, _slot, _unit, _spend),
    st.builds(HoldOp, _slot, _unit, _spend, _optional(_duration)),
    st.builds(CaptureOp, _pick, st.one_of(st.just(0), st.integers(1, 100), st.integers(101, 150))),
    st.builds(VoidOp, _pick),
    st.builds(
        ReverseOp,
        _pick,
        st.sampled_from(["points", "refund", "full", "not_earn"]),
        st.integers(1, 130),
        st.sampled_from(["EUR", "EUR", "EUR", "USD"]),
    ),
    st.builds(lambda pair, unit, points: TransferOp(*pair, unit, points), _transfer_pair, _unit, _spend),
    st.builds(AdjustOp, _slot, _unit, st.integers(-500, 500).filter(bool)),
    st.builds(ReleaseOp, _pick),
    st.builds(AdvanceOp, _duration),
    st.builds(ReplayOp, _pick),
    st.builds(ConflictOp, _pick, st.booleans()),
)


@dataclass
class EarnModel:
    tx_id: str
    key: Key
    points: int
    purchase_minor: int
    pending: bool
    review: bool
    release_at: datetime | None
    reversed_points: int = 0
    refunded_minor: int = 0

    @property
    def reversible(self) -> int:
        return self.points - self.reversed_points


@dataclass
class HoldModel:
    hold_id: str
    key: Key
    points: int
    expires_at: datetime
    placed: bool = True
    expired: bool = False  # released by the maintenance pass at its timeout


@dataclass
class UnitTotals:
    earned: int = 0
    redeemed: int = 0
    captured: int = 0
    reversed: int = 0
    adjusted: int = 0


@dataclass
class Done:
    """A mutation that succeeded, kept to replay it or to reuse its key with another payload."""

    call: Callable[[Any], Awaitable[Any]]
    command: Any
    result: Any


def _net(b: Balance) -> int:
    return b.balance_points + b.pending_points - b.debt_points


def _pick(items: list[Any], pick: int) -> Any:
    return items[pick % len(items)] if items else None


def _pick_mostly(items: list[Any], pick: int, usable: Callable[[Any], bool]) -> Any:
    """Three picks in four go to a usable item when there is one, the rest to any item."""
    candidates = [item for item in items if usable(item)] if pick % 4 else []
    return _pick(candidates or items, pick // 4)


class Scenario:
    def __init__(self, workdir: Path, shards: int, negative_limit: int) -> None:
        self.workdir = workdir
        self.shards = shards
        self.limit = negative_limit
        self.clock = ManualClock()
        self.policy = Policy(UNITS, 30, HOLD_TIMEOUT, HOLD_MAX, negative_limit)
        self.members: list[str] = []
        self.keys_used = 0
        self.earns: list[EarnModel] = []
        self.holds: list[HoldModel] = []
        self.other_txs: list[str] = []
        self.done: list[Done] = []
        self.totals = {unit: UnitTotals() for unit in UNITS}
        self.reversed_accounts: set[Key] = set()
        self.expired_reported = 0
        # The earliest expiry any lot of each account may carry: once the clock reaches it, a
        # debit may expire due points first (how many is the ledger's to know, as for reversals).
        self.soonest: dict[Key, datetime] = {}
        self.step = ""
        # Filled by each operation: the change in balance+pending-debt it must cause per member
        # (None: not predictable per member), and checks that need the balances after it.
        self.expect_net: dict[Key, int] | None = {}
        self.post_checks: list[Callable[[dict[Key, Balance], dict[Key, Balance]], None]] = []

    async def run(self, ops: list[Any]) -> None:
        self.store = SqliteLedgerStore(self.workdir, self.shards)
        try:
            self.svc = LedgerService(self.store, self.clock, self.policy, card_secret="test")
            await self._create_members()
            before = await self._balances()
            await self._check(before)
            opening = [
                EarnOp(slot, unit, 300, False, None, 30_000, None, None) for slot in range(MEMBERS) for unit in UNITS
            ]
            for i, op in enumerate([*opening, *ops], start=-len(opening)):
                self.step = f"step {i} {op!r}"
                self.expect_net, self.post_checks = {}, []
                await self._apply(op, before)
                after = await self._balances()
                self._check_deltas(before, after)
                await self._check(after)
                before = after
            assert await self.svc.recover_sagas() == 0, "a transfer saga was left for recovery"
        finally:
            await self.store.close()

    async def _create_members(self) -> None:
        """Slot i lives on shard i % shards, so some transfers cross shards and some do not."""
        slots: list[str | None] = [None] * MEMBERS
        n = 0
        while None in slots:
            n += 1
            member = await self.svc.create_member(c.CreateMember(IdemKey("test", f"member-{n}")))
            shard = self.svc.shard_of(member.member_id)
            free = [i for i, m in enumerate(slots) if m is None and i % self.shards == shard]
            if free:
                slots[free[0]] = member.member_id
        self.members = [m for m in slots if m is not None]

    def _key(self) -> IdemKey:
        self.keys_used += 1
        return IdemKey("test", f"op-{self.keys_used}")

    async def _attempt(self, expect: type[LedgerError] | None, call: Callable[[Any], Awaitable[R]],
                       command: Any) -> R | None:  # fmt: skip
        """Runs the call; it must fail with exactly `expect`, or succeed when that is None."""
        try:
            result = await call(command)
        except LedgerError as exc:
            assert expect is not None, f"{self.step}: unexpected {exc!r}"
            assert type(exc) is expect, f"{self.step}: expected {expect.__name__}, got {exc!r}"
            return None
        assert expect is None, f"{self.step}: expected {expect.__name__}, but it succeeded: {result!r}"
        self.done.append(Done(call, command, result))
        return result

    def _credited(self, key: Key, expires_at: datetime | None) -> None:
        if expires_at is not None:
            self.soonest[key] = min(self.soonest.get(key, expires_at), expires_at)

    async def _debit(self, expect: type[LedgerError] | None, key: Key, points: int, before: dict[Key, Balance],
                     call: Callable[[Any], Awaitable[R]], command: Any) -> tuple[R | None, int]:  # fmt: skip
        """Runs a debit of `points` from `key`; returns its result and the points it expired.

        Points past their date expire before any debit, so once one of the account's lots may
        be due the debit may expire some, and may then find too few points left: refused, with
        fewer points available than the balance showed and nothing written."""
        if expect is None and before[key].available_points < points:
            expect = InsufficientPoints
        soonest = self.soonest.get(key)
        may_expire = expect is None and soonest is not None and soonest <= self.clock.now()
        expired_before = await self._expired_totals()
        if not may_expire:
            result = await self._attempt(expect, call, command)
        else:
            try:
                result = await call(command)
            except InsufficientPoints as exc:
                assert exc.available < min(points, before[key].available_points + 1), f"{self.step}: {exc!r}"
                return None, 0
            self.done.append(Done(call, command, result))
        expired = (await self._expired_totals())[key[1]] - expired_before[key[1]]
        assert expired == 0 or (may_expire and result is not None and expired > 0), f"{self.step}: expired {expired}"
        self.expired_reported += expired
        return result, expired

    async def _balances(self) -> dict[Key, Balance]:
        out: dict[Key, Balance] = {}
        for slot, member_id in enumerate(self.members):
            for unit in UNITS:
                out[(slot, unit)] = await self.svc.get_balance(member_id, unit)
        return out

    def _after(self, check: Callable[[dict[Key, Balance], dict[Key, Balance]], None]) -> None:
        self.post_checks.append(check)

    async def _apply(self, op: Any, before: dict[Key, Balance]) -> None:
        handler = {
            EarnOp: self._earn, RedeemOp: self._redeem, HoldOp: self._hold, CaptureOp: self._capture,
            VoidOp: self._void, ReverseOp: self._reverse, TransferOp: self._transfer, AdjustOp: self._adjust,
            ReleaseOp: self._release, AdvanceOp: self._advance, ReplayOp: self._replay, ConflictOp: self._conflict,
        }[type(op)]  # fmt: skip
        await handler(op, before)

    async def _earn(self, op: EarnOp, before: dict[Key, Balance]) -> None:
        now = self.clock.now()
        business_time = now - op.backdate if op.backdate else None
        release_at = now + op.release_in if op.release_in else None
        cmd = c.Earn(
            self._key(), self.members[op.member], op.unit, op.points,
            business_time=business_time,
            expires_at=(business_time or now) + op.expires_in if op.expires_in else None,
            release_at=release_at, pending_review=op.review,
            purchase=Money(op.purchase_minor, "EUR") if op.purchase_minor else None,
        )  # fmt: skip
        expiry = cmd.expires_at or (business_time or now) + timedelta(days=self.policy.expiry_days)
        if release_at is not None and release_at >= expiry:  # could never be spent: refused
            assert await self._attempt(InvalidArgument, self.svc.earn, cmd) is None
            return
        result = await self._attempt(None, self.svc.earn, cmd)
        assert result is not None
        pending = op.review or release_at is not None
        assert result.pending == pending, f"{self.step}: pending={result.pending}"
        key = (op.member, op.unit)
        self._credited(key, expiry)
        self.earns.append(EarnModel(result.transaction.transaction_id, key, op.points, op.purchase_minor or 0,
                                    pending, op.review, release_at))  # fmt: skip
        self.totals[op.unit].earned += op.points
        self.expect_net = {key: op.points}
        if pending:
            self._after(lambda b, a: self._eq(a[key].pending_points - b[key].pending_points, op.points, "pending"))
        else:
            self._after(lambda b, a: self._eq(_spendable_delta(b[key], a[key]), op.points, "balance-debt"))

    async def _redeem(self, op: RedeemOp, before: dict[Key, Balance]) -> None:
        key = (op.member, op.unit)
        cmd = c.Redeem(self._key(), self.members[op.member], op.unit, op.points)
        result, expired = await self._debit(None, key, op.points, before, self.svc.redeem, cmd)
        if result is None:
            return
        assert result.transaction is not None and result.hold is None  # unscreened: always paid out
        self.other_txs.append(result.transaction.transaction_id)
        self.totals[op.unit].redeemed += op.points
        self.expect_net = {key: -op.points - expired}
        self._after(
            lambda b, a: self._eq(a[key].available_points - b[key].available_points, -op.points - expired, "available")
        )
        self._after(lambda b, a: self._not_overdrawn(a[key]))

    async def _hold(self, op: HoldOp, before: dict[Key, Balance]) -> None:
        key = (op.member, op.unit)
        expect: type[LedgerError] | None = None
        if op.timeout is not None and op.timeout > HOLD_MAX:
            expect = InvalidArgument
        cmd = c.PlaceHold(self._key(), self.members[op.member], op.unit, op.points, timeout=op.timeout)
        result, expired = await self._debit(expect, key, op.points, before, self.svc.place_hold, cmd)
        if result is None:
            return
        expires_at = self.clock.now() + (op.timeout or HOLD_TIMEOUT)
        self._eq(result.hold.expires_at, expires_at, "hold expiry")
        self.holds.append(HoldModel(result.hold.hold_id, key, op.points, expires_at))
        self.expect_net = {key: -expired}
        self._after(
            lambda b, a: self._eq(a[key].available_points - b[key].available_points, -op.points - expired, "available")
        )
        self._after(lambda b, a: self._eq(a[key].reserved_points - b[key].reserved_points, op.points, "reserved"))
        self._after(lambda b, a: self._not_overdrawn(a[key]))

    async def _capture(self, op: CaptureOp, before: dict[Key, Balance]) -> None:
        now = self.clock.now()
        hold: HoldModel | None = _pick_mostly(self.holds, op.pick, lambda h: h.placed and h.expires_at > now)
        if hold is None:
            await self._attempt(NotFound, self.svc.capture_hold, c.CaptureHold(self._key(), MISSING_HOLD))
            return
        points = 0 if op.percent == 0 else max(1, hold.points * op.percent // 100)
        expect: type[LedgerError] | None = None
        if not hold.placed or hold.expires_at <= now:
            expect = FailedPrecondition
        elif points > hold.points:
            expect = InvalidArgument
        key = hold.key
        expired_before = await self._expired_totals()
        result = await self._attempt(expect, self.svc.capture_hold, c.CaptureHold(self._key(), hold.hold_id, points))
        if result is None:
            return
        captured = points or hold.points
        self._eq(result.hold.captured_points, captured, "captured points")
        hold.placed = False
        self.totals[hold.key[1]].captured += captured
        swept = await self._swept_since(expired_before, key)
        settled = _settled_by_freeing(before[key], hold.points - captured - swept)
        self.expect_net = {key: -captured - swept}
        self._after(lambda b, a: self._eq(a[key].reserved_points - b[key].reserved_points, -hold.points, "reserved"))
        self._after(
            lambda b, a: self._eq(a[key].balance_points - b[key].balance_points, -captured - settled - swept, "balance")
        )
        self._after(lambda b, a: self._eq(a[key].debt_points - b[key].debt_points, -settled, "debt"))

    async def _void(self, op: VoidOp, before: dict[Key, Balance]) -> None:
        hold: HoldModel | None = _pick_mostly(self.holds, op.pick, lambda h: h.placed)
        if hold is None:
            await self._attempt(NotFound, self.svc.void_hold, c.VoidHold(self._key(), MISSING_HOLD))
            return
        # A hold past its timeout answers EXPIRED, whether the pass released it (nothing more
        # moves) or not (this void releases it).
        expect = None if hold.placed or hold.expired else FailedPrecondition
        key = hold.key
        expired_before = await self._expired_totals()
        result = await self._attempt(expect, self.svc.void_hold, c.VoidHold(self._key(), hold.hold_id))
        if result is None:
            return
        timed_out = hold.expires_at <= self.clock.now()
        self._eq(result.hold.status, HoldStatus.EXPIRED if timed_out else HoldStatus.VOIDED, "hold status")
        if not hold.placed:
            return
        hold.placed, hold.expired = False, timed_out
        swept = await self._swept_since(expired_before, key)
        settled = _settled_by_freeing(before[key], hold.points - swept)
        self.expect_net = {key: -swept}
        self._after(lambda b, a: self._eq(a[key].reserved_points - b[key].reserved_points, -hold.points, "reserved"))
        self._after(lambda b, a: self._eq(a[key].balance_points - b[key].balance_points, -settled - swept, "balance"))
        self._after(lambda b, a: self._eq(a[key].debt_points - b[key].debt_points, -settled, "debt"))

    async def _reverse(self, op: ReverseOp, before: dict[Key, Balance]) -> None:
        if op.how == "not_earn" and self.other_txs:
            cmd = c.Reverse(self._key(), _pick(self.other_txs, op.pick), full=True)
            await self._attempt(FailedPrecondition, self.svc.reverse, cmd)
            return
        earn: EarnModel | None = _pick(self.earns, op.pick)
        if earn is None or op.how == "not_earn":
            await self._attempt(NotFound, self.svc.reverse, c.Reverse(self._key(), MISSING_TX, full=True))
            return
        expect, amount, cmd = self._plan_reversal(earn, op)
        expired_before = await self._expired_totals()
        newest_before = await self._newest_entry(earn.key)
        result = await self._attempt(expect, self.svc.reverse, cmd)
        if result is None:
            return
        self._eq(result.reversed_points, amount, "reversed points")
        # Points past their date expire before the reversal takes any (as before any debit);
        # points of the earn that expired unspent then come back from breakage, not from the
        # member (decision 0007). Which lot expired how much is the ledger's to know, the
        # share's bounds are the model's.
        swept = await self._expired_entries_since(earn.key, newest_before)
        assert swept == 0 or not earn.pending, f"{self.step}: a pending reversal expired {swept}"
        share = expired_before[earn.key[1]] + swept - (await self._expired_totals())[earn.key[1]]
        assert 0 <= share <= amount and not (earn.pending and share), f"{self.step}: expired share {share} of {amount}"
        self.expired_reported += swept - share
        earn.reversed_points += amount
        earn.refunded_minor += cmd.refund.amount_minor if cmd.refund else 0
        self.totals[earn.key[1]].reversed += amount
        self.reversed_accounts.add(earn.key)
        key = earn.key
        self.expect_net = {key: share - amount - swept}
        if earn.pending:
            self._eq(result.debt_points, 0, "debt of a pending reversal")
            self._after(lambda b, a: self._eq(a[key].pending_points - b[key].pending_points, -amount, "pending"))
            return
        row = before[key]
        floor = row.reserved_points if row.reserved_points > 0 else -self.limit
        take = max(0, min(amount - share, row.balance_points - swept - floor))
        self._eq(result.debt_points, amount - share - take, "debt points")
        self._after(lambda b, a: self._eq(a[key].balance_points - b[key].balance_points, -take - swept, "balance"))
        self._after(lambda b, a: self._eq(a[key].debt_points - b[key].debt_points, amount - share - take, "debt"))

    def _plan_reversal(self, earn: EarnModel, op: ReverseOp) -> tuple[type[LedgerError] | None, int, c.Reverse]:
        """The error the ledger must raise, or the points it must reverse, for this request."""
        key = self._key()
        if op.how == "points":
            points = max(1, earn.points * op.percent // 100)
            cmd = c.Reverse(key, earn.tx_id, points=points)
            if earn.reversible <= 0:
                return AlreadyReversed, 0, cmd
            if points > earn.reversible:
                return FailedPrecondition, 0, cmd
            return None, points, cmd
        if op.how == "full":
            cmd = c.Reverse(key, earn.tx_id, full=True)
            return (AlreadyReversed, 0, cmd) if earn.reversible <= 0 else (None, earn.reversible, cmd)
        refund_minor = max(1, (earn.purchase_minor or 10_000) * op.percent // 100)
        cmd = c.Reverse(key, earn.tx_id, refund=Money(refund_minor, op.currency))
        refunded = earn.refunded_minor + refund_minor
        if earn.reversible <= 0:
            return AlreadyReversed, 0, cmd
        if earn.purchase_minor <= 0:
            return FailedPrecondition, 0, cmd
        if op.currency != "EUR" or refunded > earn.purchase_minor:
            return InvalidArgument, 0, cmd
        due = earn.points * refunded // earn.purchase_minor
        return None, max(0, min(earn.reversible, due - earn.reversed_points)), cmd

    async def _transfer(self, op: TransferOp, before: dict[Key, Balance]) -> None:
        src, dst = (op.source, op.unit), (op.destination, op.unit)
        expect: type[LedgerError] | None = None
        if op.source == op.destination:
            expect = InvalidArgument
        cmd = c.Transfer(self._key(), self.members[op.source], self.members[op.destination], op.unit, op.points)
        result, expired = await self._debit(expect, src, op.points, before, self.svc.transfer, cmd)
        if result is None:
            return
        self._eq((result.debit.points, result.credit.points), (-op.points, op.points), "transfer legs")
        if src in self.soonest:
            self._credited(dst, self.soonest[src])  # the points keep their expiry dates
        self.expect_net = {src: -op.points - expired, dst: op.points}
        self._after(
            lambda b, a: self._eq(a[src].balance_points - b[src].balance_points, -op.points - expired, "source")
        )
        self._after(lambda b, a: self._eq(a[src].reserved_points, b[src].reserved_points, "source reserved"))
        self._after(lambda b, a: self._not_overdrawn(a[src]))
        self._after(lambda b, a: self._eq(_spendable_delta(b[dst], a[dst]), op.points, "destination"))

    async def _adjust(self, op: AdjustOp, before: dict[Key, Balance]) -> None:
        key = (op.member, op.unit)
        cmd = c.Adjust(self._key(), self.members[op.member], op.unit, op.points, reason="goodwill")
        if op.points < 0:
            result, expired = await self._debit(None, key, -op.points, before, self.svc.adjust, cmd)
        else:
            result, expired = await self._attempt(None, self.svc.adjust, cmd), 0
            self._credited(key, self.clock.now() + timedelta(days=self.policy.expiry_days))
        if result is None:
            return
        self.other_txs.append(result.transaction_id)
        self.totals[op.unit].adjusted += op.points
        self.expect_net = {key: op.points - expired}
        if op.points < 0:
            self._after(
                lambda b, a: self._eq(
                    a[key].available_points - b[key].available_points, op.points - expired, "available"
                )
            )
            self._after(lambda b, a: self._not_overdrawn(a[key]))

    async def _release(self, op: ReleaseOp, before: dict[Key, Balance]) -> None:
        earn: EarnModel | None = _pick_mostly(self.earns, op.pick, lambda e: e.pending)
        if earn is None:
            await self._attempt(NotFound, self.svc.release_pending, c.ReleasePending(self._key(), MISSING_TX))
            return
        releasable = earn.pending and earn.reversible > 0
        expect = None if releasable else FailedPrecondition
        cmd = c.ReleasePending(self._key(), earn.tx_id)
        if await self._attempt(expect, self.svc.release_pending, cmd) is None:
            return
        earn.pending = False
        key, points = earn.key, earn.reversible
        self._after(lambda b, a: self._eq(a[key].pending_points - b[key].pending_points, -points, "pending"))
        self._after(lambda b, a: self._eq(_spendable_delta(b[key], a[key]), points, "balance-debt"))

    async def _advance(self, op: AdvanceOp, before: dict[Key, Balance]) -> None:
        now = self.clock.advance(op.delta)
        due_holds = [h for h in self.holds if h.placed and h.expires_at <= now]
        due_earns = [
            e for e in self.earns
            if e.pending and not e.review and e.release_at is not None and e.release_at <= now and e.reversible > 0
        ]  # fmt: skip
        expired_before = await self._expired_totals()
        report = await self.svc.run_maintenance()
        self._eq(report.holds_voided, len(due_holds), "holds voided")
        self._eq(report.pending_released, len(due_earns), "pending released")
        self._eq(report.sagas_completed, 0, "sagas completed")
        for hold in due_holds:
            hold.placed, hold.expired = False, True
        for earn in due_earns:
            earn.pending = False
        self.expired_reported += report.expired_points
        expired_after = await self._expired_totals()
        self.expect_net = None

        def only_expiry_lowers_balances(b: dict[Key, Balance], a: dict[Key, Balance]) -> None:
            for unit in UNITS:
                drops = [_net(b[k]) - _net(a[k]) for k in b if k[1] == unit]
                assert all(d >= 0 for d in drops), f"{self.step}: maintenance raised a balance: {drops}"
                self._eq(sum(drops), expired_after[unit] - expired_before[unit], f"expired {unit}")

        self._after(only_expiry_lowers_balances)

    async def _swept_since(self, expired_before: dict[str, int], key: Key) -> int:
        """Points an operation that releases a hold expired: debt is paid from what is left once
        the account is swept, never with points past their date."""
        swept = (await self._expired_totals())[key[1]] - expired_before[key[1]]
        assert swept >= 0, f"{self.step}: expired {swept}"
        self.expired_reported += swept
        return swept

    async def _newest_entry(self, key: Key) -> int:
        page = await self.svc.list_entries(self.members[key[0]], key[1], 1, "")
        return page.entries[0].entry_id if page.entries else 0

    async def _expired_entries_since(self, key: Key, entry_id: int) -> int:
        """Points the account's EXPIRY entries newer than `entry_id` took."""
        page = await self.svc.list_entries(self.members[key[0]], key[1], 50, "")
        return -sum(e.points for e in page.entries if e.entry_id > entry_id and e.kind == TxKind.EXPIRY)

    async def _expired_totals(self) -> dict[str, int]:
        totals = (await reconcile(self.store, self.clock.now())).totals_by_account_class
        return {unit: totals.get(f"system:expired:{unit}", 0) for unit in UNITS}

    async def _replay(self, op: ReplayOp, before: dict[Key, Balance]) -> None:
        done: Done | None = _pick(self.done, op.pick)
        if done is None:
            return
        again = await done.call(done.command)
        self._eq(again, done.result, "replayed result")
        self._after(lambda b, a: self._eq(a, b, "balances after a replay"))

    async def _conflict(self, op: ConflictOp, before: dict[Key, Balance]) -> None:
        done: Done | None = _pick(self.done, op.pick)
        if done is None:
            return
        cmd, call = done.command, done.call
        cross_type = op.cross_type
        if isinstance(cmd, c.Earn | c.Redeem | c.PlaceHold) and not cross_type:
            cmd = dataclasses.replace(cmd, reference="changed")
        elif isinstance(cmd, c.Reverse | c.Transfer | c.Adjust) and not cross_type:
            cmd = dataclasses.replace(cmd, reason="changed")
        elif isinstance(cmd, c.CaptureHold) and not cross_type:
            cmd = dataclasses.replace(cmd, points=cmd.points + 1)
        else:
            cmd, call = c.Redeem(cmd.key, self.members[0], UNITS[0], 1, reference="changed"), self.svc.redeem
        try:
            await call(cmd)
        except IdempotencyConflict:
            pass
        else:
            raise AssertionError(f"{self.step}: reusing key {cmd.key} with {cmd!r} did not conflict")
        self._after(lambda b, a: self._eq(a, b, "balances after a conflicting request"))

    def _eq(self, actual: Any, expected: Any, what: str) -> None:
        assert actual == expected, f"{self.step}: {what}: expected {expected!r}, got {actual!r}"

    def _not_overdrawn(self, b: Balance) -> None:
        assert b.balance_points - b.reserved_points >= 0, f"{self.step}: left overdrawn: {b}"

    def _check_deltas(self, before: dict[Key, Balance], after: dict[Key, Balance]) -> None:
        if self.expect_net is not None:
            for key in after:
                self._eq(_net(after[key]) - _net(before[key]), self.expect_net.get(key, 0), f"net change of {key}")
        for check in self.post_checks:
            check(before, after)

    async def _check(self, balances: dict[Key, Balance]) -> None:
        report = await reconcile(self.store, self.clock.now())
        assert report.ok, f"{self.step}: " + "; ".join(d.describe() for d in report.differences)
        totals = report.totals_by_account_class
        for key, b in balances.items():
            assert b.balance_points >= -self.limit, f"{self.step}: {key} below the negative limit: {b}"
            assert min(b.debt_points, b.pending_points, b.reserved_points, b.available_points) >= 0, f"{self.step}: {b}"
            if key not in self.reversed_accounts:
                assert b.balance_points >= 0 and b.debt_points == 0, f"{self.step}: {key} negative unreversed: {b}"
            if b.reserved_points > 0:
                self._not_overdrawn(b)
            held = sum(h.points for h in self.holds if h.placed and h.key == key)
            self._eq(b.reserved_points, held, f"reserved points of {key}")
            pending = sum(e.reversible for e in self.earns if e.pending and e.key == key)
            self._eq(b.pending_points, pending, f"pending points of {key}")
        expired_all = 0
        for unit, t in self.totals.items():
            mine = [b for k, b in balances.items() if k[1] == unit]
            expired = totals.get(f"system:expired:{unit}", 0)
            expired_all += expired
            predicted = t.earned - t.redeemed - t.captured - t.reversed - expired + t.adjusted
            self._eq(sum(_net(b) for b in mine), predicted, f"members' {unit}")
            self._eq(totals.get(f"member:{unit}", 0), sum(b.balance_points for b in mine), f"member:{unit}")
            self._eq(totals.get(f"funding:program:{unit}", 0), t.reversed - t.earned, f"funding {unit}")
            self._eq(totals.get(f"system:redeemed:{unit}", 0), t.redeemed + t.captured, f"redeemed {unit}")
            self._eq(totals.get(f"system:adjustments:{unit}", 0), -t.adjusted, f"adjustments {unit}")
        self._eq(expired_all, self.expired_reported, "expired points reported by maintenance")


def _settled_by_freeing(before: Balance, freed_points: int) -> int:
    """Reserved points a hold gives back pay recorded debt first, like a credit (decision 0007)."""
    return min(before.debt_points, before.available_points + freed_points)


def _spendable_delta(before: Balance, after: Balance) -> int:
    """A credit pays debt first, then the balance; together they rise by the credit."""
    return (after.balance_points - after.debt_points) - (before.balance_points - before.debt_points)


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """A private loop per example: pytest-asyncio owns the session loop and its policy."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(coro)
    finally:
        loop.close()


@settings(max_examples=40, deadline=None)
@given(
    shards=st.sampled_from([2, 3]),
    negative_limit=st.sampled_from([0, 50]),
    ops=st.lists(operations, min_size=20, max_size=40),
)
def test_random_operation_sequences_keep_ledger_invariants(shards: int, negative_limit: int, ops: list[Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="ledger-prop-") as workdir:
        _run(Scenario(Path(workdir), shards, negative_limit).run(ops))


def test_replayed_earn_returns_the_original_result_after_its_expiry_date() -> None:
    async def scenario(workdir: Path) -> None:
        clock = ManualClock()
        store = SqliteLedgerStore(workdir, 2)
        try:
            svc = LedgerService(store, clock, Policy(UNITS, 30, HOLD_TIMEOUT, HOLD_MAX, 0), card_secret="test")
            member = await svc.create_member(c.CreateMember(IdemKey("test", "member")))
            cmd = c.Earn(IdemKey("test", "earn"), member.member_id, "points", 100,
                         expires_at=clock.now() + timedelta(minutes=1))  # fmt: skip
            first = await svc.earn(cmd)
            clock.advance(timedelta(minutes=2))
            assert await svc.earn(cmd) == first
        finally:
            await store.close()

    with tempfile.TemporaryDirectory(prefix="ledger-replay-") as workdir:
        _run(scenario(Path(workdir)))


def test_points_freed_by_a_voided_hold_pay_the_debt_a_reversal_recorded() -> None:
    async def scenario(workdir: Path) -> None:
        store = SqliteLedgerStore(workdir, 2)
        try:
            svc = LedgerService(store, ManualClock(), Policy(UNITS, 30, HOLD_TIMEOUT, HOLD_MAX, 0), card_secret="test")
            member = (await svc.create_member(c.CreateMember(IdemKey("test", "member")))).member_id
            earn = await svc.earn(c.Earn(IdemKey("test", "earn"), member, "points", 100))
            hold = await svc.place_hold(c.PlaceHold(IdemKey("test", "hold"), member, "points", 100))
            reversal = await svc.reverse(c.Reverse(IdemKey("test", "rev"), earn.transaction.transaction_id, full=True))
            assert (reversal.reversed_points, reversal.debt_points) == (100, 100)
            voided = await svc.void_hold(c.VoidHold(IdemKey("test", "void"), hold.hold.hold_id))
            balance = await svc.get_balance(member, "points")
            assert voided.balance_after == balance
            assert (balance.balance_points, balance.available_points, balance.debt_points) == (0, 0, 0)
            assert (await reconcile(store)).ok
        finally:
            await store.close()

    with tempfile.TemporaryDirectory(prefix="ledger-settle-") as workdir:
        _run(scenario(Path(workdir)))


@pytest.mark.parametrize("negative_limit", [0, 50])
@pytest.mark.parametrize(
    "closing",
    [VoidOp(pick=0), CaptureOp(pick=0, percent=40)],
    ids=["void", "partial-capture"],
)
def test_model_expects_points_freed_by_a_closing_hold_to_pay_recorded_debt(closing: Any, negative_limit: int) -> None:
    # Opening earn 0 credits slot 0's points; the full reversal leaves 100 debt behind the 100-point hold.
    ops = [HoldOp(0, "points", 100, None), ReverseOp(pick=0, how="full", percent=100, currency="EUR"), closing]
    with tempfile.TemporaryDirectory(prefix="ledger-model-settle-") as workdir:
        _run(Scenario(Path(workdir), 2, negative_limit).run(ops))
