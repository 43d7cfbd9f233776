"""RecordPurchase and RecordReturn: ask the points engine, then earn or reverse atomically.

Order of a purchase: validate -> member active -> read the member's accrual state -> quote
from rules_svc (deadline-bound) -> claim the receipt's natural key -> one shard write that
applies the guards, earns and stores the purchase (purchases.py). A purchase whose quote
cannot be had (rules_svc down or slow) is stored as PENDING_ACCRUAL; so is every later
purchase of that member until the queue drains, which keeps a member's purchases earning in
receipt order, so an outage leaves the same balances as a run without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Protocol

from ledger_svc import codec
from ledger_svc import commands as c
from ledger_svc import validation as v
from ledger_svc.domain import (
    REFUSALS,
    FailedPrecondition,
    IdemKey,
    IdempotencyConflict,
    InvalidArgument,
    LedgerError,
    MemberStatus,
    Money,
    NotFound,
    Unavailable,
)
from ledger_svc.postings import ShardBook
from ledger_svc.purchases import (
    MemberState,
    PurchaseRecord,
    PurchaseStatus,
    Quote,
    ReturnResult,
    accrue,
    load_purchase,
    load_state,
    lot_lifetime,
    name_tender,
    purchase_id_for,
    require_unmerged,
    save_purchase,
    take_back,
    tender_points,
)
from ledger_svc.reviews import new_review_id
from ledger_svc.screening import ScreenedKind, Screening, ScreeningContext, ScreeningRequest
from ledger_svc.screening import event_id as screening_event_id
from ledger_svc.store.base import IdemRecord, ShardTx
from pointmesh.bounds import within_key_length
from pointmesh.tiers import TierStanding, effective_tier
from pointmesh.timestamps import utc_instant

if TYPE_CHECKING:
    from ledger_svc.service import LedgerService

log = logging.getLogger(__name__)
FUTURE_SKEW = v.FUTURE_SKEW
KEY_MARGIN = timedelta(hours=1)  # > FUTURE_SKEW: a receipt's key outlives its lateness by this much
BREAKER_SECONDS = 1.0
WAITING_SCAN_PAGES = 20  # pages a waiting pass reads past purchases held on a failing basket
MAX_LINES = 500
MAX_LINE_TEXT = 64  # characters of a line's sku or category, as the gateway bounds them


class EngineUnavailable(Exception):
    """The points engine did not answer in time; the purchase waits instead of failing."""


class EngineFailedOnBasket(EngineUnavailable):
    """The engine failed on this basket alone (an error of its own, not a refusal): a bug the
    basket trips. The purchase waits for a fixed engine like in an outage, but nothing else
    does: the breaker stays closed, and a waiting pass goes on with other members."""


class StaleQuote(Exception):
    """A quote was made for a member state the purchase did not meet (batch accrual)."""


class MergedMeanwhile(Exception):
    """A return found its member merged away in its write, after it had looked where the points
    live and found them still with the member: it looks again."""


RETURN_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Priced:
    """A purchase ready for its shard write: keys claimed, quoted (None: it waits), screened.
    `assumed_count` is the purchase count the quote was made for, checked in the write: a
    purchase-number rule the quote left out (the member's 2nd purchase, quoted as its 1st while
    another purchase of the member was being written) cannot be added by the guards, only cut.
    None: the write's guards settle on the count it meets (the last-resort write)."""

    cmd: c.RecordPurchase
    fp: str
    pid: str
    quote: Quote | None
    screening: Screening | None
    assumed_count: int | None = None


# A unary purchase whose quote went stale in its write (another purchase of the member was
# written meanwhile: its count moved, or its tier) is quoted again this many times; then it is
# written on its last quote.
STALE_REQUOTES = 3


def _require_fresh(
    book: ShardBook, member_id: str, state: MemberState, quote: Quote, assumed_count: int | None, at: datetime
) -> None:
    """A quote depends on the member's state only through the purchase count and the tier; and
    a purchase parked meanwhile for rules_svc must earn first (receipt order)."""
    if book.tx.member_waiting_purchases(member_id):
        raise StaleQuote("a purchase of the member waits for rules_svc")
    if assumed_count is not None and quote.counts_purchases and state.purchase_count != assumed_count:
        raise StaleQuote(f"quoted as purchase {assumed_count + 1}, is purchase {state.purchase_count + 1}")
    if quote.tier_policy is not None and effective_tier(quote.tier_policy, state.qualification, at) != quote.tier:
        raise StaleQuote(f"quoted at tier {quote.tier!r}, which the member no longer has")


class ReceiptRecorded(FailedPrecondition):
    """The receipt's purchase is stored already (see _require_unrecorded)."""


def _require_unrecorded(book: ShardBook, purchase_id: str, cmd: c.RecordPurchase) -> None:
    """A purchase id is the receipt's, so a stored purchase under it is this receipt: arrived
    again after its keys were purged (the lateness bound keeps that from happening), or a copy
    sent at the same moment whose write came first (record_purchase answers with its result).
    Refused, never written over, so it cannot earn twice."""
    found = book.tx.get_purchase(purchase_id)
    if found is not None:
        raise ReceiptRecorded(
            f"receipt {cmd.receipt_id} was recorded as purchase {purchase_id} before; its replay record has expired",
            field="receipt_id",
        )


class PointsEngine(Protocol):
    async def quote(
        self, program: str, cmd: c.RecordPurchase, state: MemberState, profile: dict[str, str]
    ) -> Quote: ...

    async def tier_status(
        self, program: str, qualification: dict[str, int], at: datetime | None = None
    ) -> tuple[str, int, TierStanding]:
        """(program, version, standing) at `at` (None: rules_svc's now); EngineUnavailable, or
        the ledger's refusal."""
        ...

    async def quote_many(
        self, program: str, items: Sequence[tuple[c.RecordPurchase, MemberState, dict[str, str]]]
    ) -> list[Quote | LedgerError | EngineFailedOnBasket | None]: ...

    async def program_document(self, program: str, version: int) -> str:
        """The version's validated document as canonical JSON; EngineUnavailable, or the
        ledger's refusal."""
        ...


def natural_key(program: str, cmd: c.RecordPurchase) -> IdemKey:
    return IdemKey(f"purchase:{program}", within_key_length(f"{cmd.channel}/{cmd.store_id}/{cmd.receipt_id}"))


class Accrual:
    def __init__(self, service: LedgerService, engine: PointsEngine | None, program: str) -> None:
        self.svc = service
        self.engine = engine
        self.program = program
        self.tier_policies: dict[int, str] = {}  # program version -> digest of its tier policy
        self._down_until = 0.0

    # Tiers --------------------------------------------------------------------------------

    async def member_tier(self, member_id: str) -> tuple[str, int, TierStanding]:
        """The member's standing: the credits by month kept here (a merged member's included),
        tiered by rules_svc under the version in effect now."""
        member = await self.svc.member(member_id)
        if member.merged_into:  # MERGED, or erased since (erasure keeps the merge): its months moved on
            raise FailedPrecondition(
                f"member {member_id} was merged into {member.merged_into}; its tier is that member's",
                field="member_id",
            )
        if self.engine is None:
            raise FailedPrecondition("this ledger runs without rules_svc: it keeps no tiers", field="member_id")
        now = self.svc.clock.now()
        state = await self.svc.store.read(
            self.svc.shard_of(member_id), lambda tx: load_state(ShardBook(tx, now, self.svc.policy), member_id)
        )
        try:
            at = state.tier_clock(now)  # None: rules_svc's own now
            return await self.engine.tier_status(self.program, dict(state.qualification), at if at > now else None)
        except EngineUnavailable as exc:
            raise Unavailable(f"rules_svc did not answer: {exc}", metadata={"service": "rules_svc"}) from None

    # Purchases ----------------------------------------------------------------------------

    def _check(self, cmd: c.RecordPurchase) -> c.RecordPurchase:
        v.member_id(cmd.member_id)
        v.name(cmd.channel, "channel")
        if cmd.store_id:
            v.name(cmd.store_id, "store_id")
        v.required_text(cmd.receipt_id, "receipt_id", max_len=128)
        if cmd.receipt_id != cmd.receipt_id.strip():
            # Files and webhooks strip their ids: " W-77" over REST and "W-77" in the vendor's
            # feed would be two natural keys for one receipt, and it would earn twice.
            raise InvalidArgument("must not start or end with blanks", field="receipt_id")
        v.money(cmd.total, "total", allow_zero=True)
        if not cmd.lines:
            raise InvalidArgument("a purchase needs at least one line", field="lines")
        if len(cmd.lines) > MAX_LINES:
            raise InvalidArgument(f"at most {MAX_LINES} lines", field="lines")
        for i, line in enumerate(cmd.lines):
            if line.quantity <= 0:
                raise InvalidArgument(f"must be positive, got {line.quantity}", field=f"lines[{i}].quantity")
            if line.amount_minor < 0:
                raise InvalidArgument(
                    f"must not be negative, got {line.amount_minor}", field=f"lines[{i}].amount.amount_minor"
                )
            v.amount(line.amount_minor, f"lines[{i}].amount.amount_minor", allow_zero=True)
        total = sum(line.amount_minor for line in cmd.lines)
        if total != cmd.total.amount_minor:
            raise InvalidArgument(
                f"lines sum to {total} minor units but the total says {cmd.total.amount_minor}",
                field="total.amount_minor",
            )
        if cmd.receipt_time > self.svc.clock.now() + FUTURE_SKEW:
            raise InvalidArgument(f"{cmd.receipt_time.isoformat()} is in the future", field="receipt_time")
        if cmd.tender_transaction_id:
            v.object_id(cmd.tender_transaction_id, "tx", "tender_transaction_id")
        v.screening_context(cmd.context, self.svc.clock.now())
        transport = v.idem_key(cmd.transport_key) if cmd.transport_key is not None and cmd.transport_key.key else None
        return replace(cmd, key=natural_key(self.program, cmd), transport_key=transport)

    @staticmethod
    def check_new(cmd: c.RecordPurchase) -> None:
        """What only a receipt not recorded before is held to (one recorded before these bounds
        still replays): a line's sku and category, so the event carrying 500 of them fits the bus."""
        for i, line in enumerate(cmd.lines):
            for name, text in (("sku", line.sku), ("category", line.category)):
                if len(text) > MAX_LINE_TEXT:
                    raise InvalidArgument(f"at most {MAX_LINE_TEXT} characters, got {len(text)}",
                                          field=f"lines[{i}].{name}")  # fmt: skip

    def engine_up(self) -> bool:
        """False without an engine, and for a moment after it failed (a short breaker, so an
        outage costs one deadline a second rather than one per purchase)."""
        return self.engine is not None and time.monotonic() >= self._down_until

    def engine_down(self, what: str, why: Exception) -> None:
        log.warning("points engine unavailable; %s waits: %s", what, why)
        self._down_until = time.monotonic() + BREAKER_SECONDS

    async def _quote(self, cmd: c.RecordPurchase, state: MemberState) -> Quote | None:
        """The engine's answer, or None when it is unavailable (the purchase will wait)."""
        if not self.engine_up():
            return None
        assert self.engine is not None
        profile = await self.svc.member_profile(cmd.member_id)
        try:
            return await self.engine.quote(self.program, cmd, state, profile)
        except EngineFailedOnBasket as exc:
            log.error("points engine failed on purchase %s, which waits: %s", cmd.receipt_id, exc)
            return None
        except EngineUnavailable as exc:
            self.engine_down(f"purchase {cmd.receipt_id}", exc)
            return None

    async def _quote_stored(self, cmd: c.RecordPurchase, state: str | None, waiting: int) -> tuple[Quote | None, int]:
        """The quote on the member's stored state (JSON, None: a first purchase), or None while a
        purchase of the member waits for rules_svc: this one then waits behind it (receipt order);
        and the purchase count it was quoted for."""
        known = MemberState() if state is None else codec.loads(MemberState, state)
        if waiting:
            return None, known.purchase_count
        return await self._quote(cmd, known), known.purchase_count

    def _late(self, cmd: c.RecordPurchase, quote: Quote, arrived: datetime) -> str:
        late = arrived - cmd.receipt_time
        if late > timedelta(days=quote.max_lateness_days):
            return (
                f"receipt from {cmd.receipt_time.isoformat()} arrived {late.days} days later; "
                f"program {quote.program} accepts receipts up to {quote.max_lateness_days} days late"
            )
        # Its natural key is kept this long from its first arrival, which was no earlier than its
        # receipt time less the skew allowed: a receipt older than that could arrive again
        # unrecognised and earn twice.
        retention = self.svc.policy.key_retention
        if late > retention - KEY_MARGIN:
            return (
                f"receipt from {cmd.receipt_time.isoformat()} arrived {late.days} days later; the ledger keeps"
                f" receipts' keys {retention.days} days, so it takes receipts less late than that"
                " (POINTMESH_IDEMPOTENCY_RETENTION_DAYS)"
            )
        return ""

    async def record_purchase(self, cmd: c.RecordPurchase) -> tuple[PurchaseRecord, bool]:
        cmd = self._check(cmd)
        svc = self.svc
        fp = c.fingerprint(cmd)
        shard = svc.shard_of(cmd.member_id)
        member_id, ns, natural = cmd.member_id, cmd.key.namespace, cmd.key.key
        await svc._require_exists(member_id)

        # One read answers three questions: a replay?, the member's counters, anything waiting?
        def read(tx: ShardTx) -> tuple[IdemRecord | None, PurchaseRecord | None, str | None, int]:
            # A tender that is not one refuses the receipt before its keys are claimed, so it
            # can come again corrected.
            if cmd.tender_transaction_id:
                tender_points(ShardBook(tx, svc.clock.now(), svc.policy), member_id, cmd.tender_transaction_id)
            stored = tx.get_idempotency(ns, natural)
            other = stored is not None and stored.fingerprint != fp  # the same receipt but its tender?
            found = tx.get_purchase(codec.loads(str, stored.result_json)) if stored and other else None
            return (
                stored,
                None if found is None else codec.loads(PurchaseRecord, found[1]),
                tx.get_member_state(member_id),
                tx.member_waiting_purchases(member_id),
            )

        stored, recorded, state, waiting = await svc.store.read(shard, read)
        same = stored is not None and (
            stored.fingerprint == fp or self._same_but_tender(cmd, stored.fingerprint, recorded)
        )
        if stored is not None and same:
            if cmd.transport_key is not None:
                await self._claim_keys(cmd, stored.fingerprint)
            # (Read already with the idempotency record when the fingerprints differ.)
            purchase = recorded or await self.get_purchase(codec.loads(str, stored.result_json))
            if cmd.tender_transaction_id and purchase.tender_transaction_id != cmd.tender_transaction_id:
                purchase = await self._name_tender(purchase, cmd)
            return purchase, True
        self.check_new(cmd)
        await svc._require_active(member_id)
        quote, count = await self._quote_stored(cmd, state, waiting)
        now = svc.clock.now()
        if quote is not None:
            late = self._late(cmd, quote, now)
            if late:
                raise FailedPrecondition(late, field="receipt_time")
        pid = purchase_id_for(member_id, self.program, natural)
        screening = await self._screen(cmd, quote, pid) if quote is not None else None
        try:
            claimed = await self._claim_keys(cmd, fp)
        except IdempotencyConflict as conflict:
            earlier = await self.replay_of_merged(cmd, conflict)
            if earlier is None:
                raise
            return earlier, True
        try:
            return await self._write_fresh(cmd, fp, pid, quote, screening, now, count)
        except ReceiptRecorded:
            # A copy of this request sent at the same moment (a till's retry) wrote first; on
            # Cassandra its purchase row can be read a moment before its idempotency record.
            # Its answer is this one's, and the keys stay claimed: the receipt is recorded.
            twin = await svc.twin_result(cmd.key, fp, shard, str)
            if twin is not None:
                return await self.get_purchase(twin), True
            await svc.release_claims(claimed)
            raise
        except REFUSALS:  # refused in the write (the member merged meanwhile): nothing was written
            await svc.release_claims(claimed)
            raise

    @staticmethod
    def _same_but_tender(cmd: c.RecordPurchase, stored_fp: str, recorded: PurchaseRecord | None) -> bool:
        """The receipt first recorded, but for its tender: a file's copy of what the till sent
        with one (no file carries it), or the till's copy, naming it, of what a file brought
        first. Another tender than the one recorded is another payment, so a conflict."""
        if recorded is None:
            return False
        for tender in {"", recorded.tender_transaction_id}:
            if c.fingerprint(replace(cmd, tender_transaction_id=tender)) != stored_fp:
                continue
            if cmd.tender_transaction_id in ("", recorded.tender_transaction_id) or not recorded.tender_transaction_id:
                return True
            raise _another_tender(cmd, recorded)
        return False

    async def _name_tender(self, purchase: PurchaseRecord, cmd: c.RecordPurchase) -> PurchaseRecord:
        """The till's tender for a receipt recorded without one; a copy that named it first
        (the till's retry) leaves it as it is."""
        tender = cmd.tender_transaction_id

        def body(book: ShardBook) -> PurchaseRecord:
            record = load_purchase(book, purchase.purchase_id)
            if record.tender_transaction_id == tender:
                return record
            if record.tender_transaction_id:
                raise _another_tender(cmd, record)
            return name_tender(book, record, tender)

        return await self.svc._book(self.svc.shard_of_id(purchase.purchase_id), body)

    async def _write_fresh(
        self, cmd: c.RecordPurchase, fp: str, pid: str, quote: Quote | None, screening: Screening | None,
        now: datetime, count: int,
    ) -> tuple[PurchaseRecord, bool]:  # fmt: skip
        member_id = cmd.member_id
        for _ in range(STALE_REQUOTES):
            written = await self.write_many([Priced(cmd, fp, pid, quote, screening, count)], now, fresh=True)
            if written:
                return written[0]
            # Another purchase of the member changed its count or tier (or was parked) between the
            # quote and the write: it is quoted again on the state it meets.
            state, waiting = await self.svc.store.read(
                self.svc.shard_of(member_id),
                lambda tx: (tx.get_member_state(member_id), tx.member_waiting_purchases(member_id)),
            )
            quote, count = await self._quote_stored(cmd, state, waiting)
        log.warning("purchase %s: quoted %d times on a changing member; written on the last quote", pid,
                    STALE_REQUOTES + 1)  # fmt: skip
        return await self.write(cmd, fp, pid, quote, screening, now)

    async def replay_of_merged(self, cmd: c.RecordPurchase, conflict: IdempotencyConflict) -> PurchaseRecord | None:
        """The receipt recorded for a member since merged into this one, with the same body
        otherwise: the same purchase sent again (a legacy file re-run after the merge), answered
        as a replay rather than a conflict. None when it is a real conflict. (A copy without the
        tender the till named is the same receipt; one naming a tender cannot link it any more.)"""
        if conflict.namespace != cmd.key.namespace or conflict.key != cmd.key.key:
            return None  # the transport key, used for another request
        ns, natural = cmd.key.namespace, cmd.key.key
        for earlier in await self.svc.merged_into_member(cmd.member_id):
            as_earlier = replace(cmd, member_id=earlier, transport_key=None)
            stored = await self.svc.store.read(self.svc.shard_of(earlier), lambda tx: tx.get_idempotency(ns, natural))
            if stored is None:
                continue
            recorded = await self.get_purchase(codec.loads(str, stored.result_json))
            if stored.fingerprint == c.fingerprint(as_earlier) or (
                not cmd.tender_transaction_id and self._same_but_tender(as_earlier, stored.fingerprint, recorded)
            ):
                return recorded
        return None

    async def write(
        self, cmd: c.RecordPurchase, fp: str, pid: str, quote: Quote | None, screening: Screening | None,
        now: datetime,
    ) -> tuple[PurchaseRecord, bool]:  # fmt: skip
        """The shard write of a purchase whose keys are claimed: accrue (or wait without a
        quote), with the idempotency record beside it."""
        return (await self.write_many([Priced(cmd, fp, pid, quote, screening)], now))[0]

    async def write_many(
        self, priced: Sequence[Priced], now: datetime, *, fresh: bool = False
    ) -> list[tuple[PurchaseRecord, bool]]:
        """One member's purchases in one shard write, in order, each replayed or accrued with
        its idempotency record. Stops before the first whose quote is stale for the state it
        meets: the result is shorter than `priced` by that one and the ones after it. A quote
        is checked when it assumed a purchase count, and with `fresh` (unary) for the tier too.
        (A store may run the unit more than once, Cassandra after a lost race: only what the
        attempt that committed returns counts.)"""
        svc = self.svc
        member_id = priced[0].cmd.member_id

        def body(p: Priced, done: list[PurchaseRecord], book: ShardBook) -> str:
            cmd, quote = p.cmd, p.quote
            state = load_state(book, member_id)  # read once: the checks and the earn use it
            require_unmerged(member_id, state)
            _require_unrecorded(book, p.pid, cmd)
            if quote is not None and (fresh or p.assumed_count is not None):
                _require_fresh(book, member_id, state, quote, p.assumed_count, cmd.receipt_time)
            record = PurchaseRecord(
                p.pid, member_id, self.program, cmd.channel, cmd.store_id, cmd.receipt_id, cmd.total, cmd.lines,
                cmd.receipt_time, now, PurchaseStatus.PENDING_ACCRUAL,
                tender_transaction_id=cmd.tender_transaction_id,
                tender_points=tender_points(book, member_id, cmd.tender_transaction_id),
                returned_quantities=tuple(0 for _ in cmd.lines),
            )  # fmt: skip
            if quote is None:
                record = replace(record, status_reason="waiting for rules_svc")
                save_purchase(book, record)
            else:
                record = accrue(book, record, quote, p.screening, new_review_id(member_id), state)
            done.append(record)
            return p.pid

        def run(book: ShardBook) -> list[tuple[str, PurchaseRecord | None]]:
            done: list[tuple[str, PurchaseRecord | None]] = []
            for p in priced:
                made: list[PurchaseRecord] = []
                try:
                    pid, replayed = svc._run_idempotent(book, p.cmd, p.fp, str, partial(body, p, made))
                except StaleQuote:  # raised before the purchase wrote anything
                    break
                done.append((pid, None if replayed else made[0]))
            return done

        written = await svc.write(svc.shard_of(member_id), svc._in_book(run))
        return [
            (record, False) if record is not None else (await self.get_purchase(pid), True) for pid, record in written
        ]

    async def _screen(self, cmd: c.RecordPurchase, quote: Quote, purchase_id: str) -> Screening | None:
        """fraud_svc's verdict on the purchase, scored on the points the quote would earn."""
        svc = self.svc
        if svc.fraud is None:
            return None
        unit = svc.policy.units[0]
        balance = await svc.get_balance(cmd.member_id, unit)
        return await svc.fraud.screen(ScreeningRequest(
            event_id=purchase_id, kind=ScreenedKind.PURCHASE, member_id=cmd.member_id, occurred_at=cmd.receipt_time,
            context=replace(cmd.context, channel=cmd.channel, store_id=cmd.store_id),
            points=sum(p.points for p in quote.parts if p.unit == unit), amount=quote.base_total or cmd.total,
            balance_points=balance.available_points, member_since=await svc.member_since(cmd.member_id),
        ))  # fmt: skip

    async def _claim_keys(self, cmd: c.RecordPurchase, fp: str) -> list[tuple[IdemKey, str]]:
        """The natural key decides; a transport key names at most one accepted receipt (a
        refused receipt claims neither key). Returns the keys this call claimed (not a copy
        of it before), with their fingerprints: the ones to give back if the write refuses."""
        claims = [(cmd.key, "RecordPurchase", fp)]
        if cmd.transport_key is not None:
            transport_fp = hashlib.sha256(f"{cmd.key.key}|{fp}".encode()).hexdigest()
            claims.insert(0, (cmd.transport_key, "RecordPurchase", transport_fp))
        before = await self.svc._claim_all(claims)
        return [(key, key_fp) for (key, _, key_fp), seen in zip(claims, before, strict=True) if not seen]

    async def get_purchase(self, purchase_id: str) -> PurchaseRecord:
        v.object_id(purchase_id, "pu", "purchase_id")
        return await self.svc.store.read(
            self.svc.shard_of_id(purchase_id),
            lambda tx: load_purchase(ShardBook(tx, self.svc.clock.now(), self.svc.policy), purchase_id),
        )

    async def list_purchases(
        self, channel: str, store_id: str, start: datetime, end: datetime, page_size: int, page_token: str
    ) -> tuple[list[PurchaseRecord], str]:
        """A channel's purchases (of one store, or all) received for [start, end), oldest first;
        the token is the (receipt time, id) of the last one returned."""
        v.name(channel, "channel")
        if store_id:
            v.name(store_id, "store_id")
        if end <= start:
            raise InvalidArgument("must be later than receipt_time_from", field="receipt_time_until")
        if end - start > MAX_LISTED_SPAN:
            raise InvalidArgument(f"may span at most {MAX_LISTED_SPAN.days} days", field="receipt_time_until")
        size = v.page_size(page_size, "page_size")
        after = _purchase_cursor(page_token)
        # Each shard's next size+1 in order: their merge holds this page and tells whether
        # another follows, reading at most shards x (size+1) purchases whatever the window holds.
        per_shard = await asyncio.gather(*(
            self.svc.store.scan(shard, lambda tx: tx.list_purchases(channel, store_id, start, end, after, size + 1))
            for shard in range(self.svc.store.shard_count)
        ))  # fmt: skip
        found = sorted(row for rows in per_shard for row in rows)
        page = [codec.loads(PurchaseRecord, body) for _, _, body in found[:size]]
        token = f"{found[size - 1][0].isoformat()}|{found[size - 1][1]}" if len(found) > size else ""
        return page, token

    async def find_purchase(self, member_id: str, channel: str, store_id: str, receipt_id: str) -> str:
        """A purchase by member and natural key (a return slip names the original receipt)."""
        v.member_id(member_id)
        if not (channel and receipt_id):
            raise InvalidArgument(
                "give purchase_id, or member_id with original channel and receipt id", field="purchase_id"
            )
        probe = c.RecordPurchase(
            IdemKey("", ""), member_id, channel, store_id, receipt_id, Money(0, "EUR"), (), datetime.min
        )
        natural = natural_key(self.program, probe).key
        purchase_id = purchase_id_for(member_id, self.program, natural)
        try:
            await self.get_purchase(purchase_id)
        except NotFound:
            # The receipt may be a purchase of a member merged into this one (a till looks the
            # card up and finds the member it is an alias of now): ids carry the buyer's bucket.
            for earlier in await self.svc.merged_into_member(member_id):
                candidate = purchase_id_for(earlier, self.program, natural)
                try:
                    await self.get_purchase(candidate)
                except NotFound:
                    continue
                return candidate
            raise
        return purchase_id

    # Waiting purchases ----------------------------------------------------------------------

    async def process_waiting(self, limit: int = 500) -> int:
        """Earns purchases that waited for rules_svc, oldest receipt first; stops at the first
        engine outage so order is kept. A basket the engine fails on keeps waiting, and so do
        its member's later purchases (their order counts); other members' go on. Returns how
        many were settled (earned or refused)."""
        if self.engine is None:
            return 0
        settled = 0
        held: set[str] = set()
        for shard in range(self.svc.store.shard_count):
            want = limit
            while True:
                # Held members' purchases stay first in the list: the page widens past them, so
                # they cannot crowd out everyone behind (up to WAITING_SCAN_PAGES pages a pass).
                waiting = await self.svc.store.read(shard, partial(_waiting, size=want))
                skipped = 0
                for purchase_id, member_id in waiting:
                    if member_id in held:
                        skipped += 1
                        continue
                    done = await self._settle(shard, purchase_id, member_id)
                    if done is None:
                        return settled
                    if done < 0:
                        held.add(member_id)
                        skipped += 1
                        continue
                    settled += done
                if len(waiting) < want or not skipped or want >= limit * WAITING_SCAN_PAGES:
                    break
                want += limit
        return settled

    async def _settle(self, shard: int, purchase_id: str, member_id: str) -> int | None:
        svc = self.svc
        record, state = await svc.store.read(
            shard,
            lambda tx: (
                load_purchase(ShardBook(tx, svc.clock.now(), svc.policy), purchase_id),
                load_state(ShardBook(tx, svc.clock.now(), svc.policy), member_id),
            ),
        )
        if record.status != PurchaseStatus.PENDING_ACCRUAL:
            return 0
        status = await svc._status(member_id, "member_id")
        if status is MemberStatus.BLOCKED:
            return -1  # earns nothing while blocked; keeps waiting, in case the block is lifted
        merged = status is MemberStatus.MERGED
        if merged:
            # Merged while this waited: it earns on the member, then follows the merge (a merge
            # that stopped short of it, sagas._require_settled, completes once nothing waits).
            status = MemberStatus.ACTIVE
        cmd = c.RecordPurchase(
            IdemKey("", ""), record.member_id, record.channel, record.store_id, record.receipt_id, record.total,
            record.lines, record.receipt_time, record.tender_transaction_id,
        )  # fmt: skip
        assert self.engine is not None
        # Erased since it was accepted.
        refusal = "" if status is MemberStatus.ACTIVE else f"member {member_id} is {status.value}"
        quote = None
        screening = None
        try:
            profile = await svc.member_profile(member_id)
            quote = await self.engine.quote(self.program, cmd, state, profile)
            refusal = refusal or self._late(cmd, quote, record.received_at)
            screening = None if refusal else await self._screen(cmd, quote, purchase_id)
        except EngineFailedOnBasket as exc:
            log.error("points engine failed on waiting purchase %s, which keeps waiting: %s", purchase_id, exc)
            return -1
        except (EngineUnavailable, Unavailable):  # not the purchase's fault: it waits for the next pass
            return None
        except LedgerError as error:
            refusal = f"{error.field}: {error.message}" if error.field else error.message
        review_id = new_review_id(member_id)

        def settle(book: ShardBook) -> int:
            current = load_purchase(book, purchase_id)
            if current.status != PurchaseStatus.PENDING_ACCRUAL:
                return 0
            if refusal or quote is None:
                # Its tender, given back on a return, lives as long as the program gives points
                # (the ledger's default only when rules_svc gave no quote).
                life = -1 if quote is None else lot_lifetime(quote, current.receipt_time)
                refused = replace(current, status=PurchaseStatus.REFUSED, status_reason=refusal, lot_lifetime_s=life)
                save_purchase(book, refused)
            else:
                accrue(book, current, quote, screening, review_id)
            return 1

        settled = await svc._book(shard, settle)
        if settled and merged:
            await svc.sagas.follow_merge(member_id)
        return settled

    # Returns ----------------------------------------------------------------------------------

    async def record_return(self, cmd: c.RecordReturn) -> tuple[ReturnResult, bool]:
        v.idem_key(cmd.key)
        v.object_id(cmd.purchase_id, "pu", "purchase_id")
        v.name(cmd.channel, "channel")
        if cmd.store_id:
            v.name(cmd.store_id, "store_id")
        if bool(cmd.lines) == (cmd.refund is not None):
            raise InvalidArgument("give either lines or refund, not both", field="lines")
        for i, line in enumerate(cmd.lines):
            if line.quantity <= 0:
                raise InvalidArgument(f"must be positive, got {line.quantity}", field=f"lines[{i}].quantity")
        if cmd.refund is not None:
            v.money(cmd.refund, "refund")
        # The time fraud_svc counts the return at (its velocity windows run on event time).
        if cmd.return_time is not None and cmd.return_time > self.svc.clock.now() + FUTURE_SKEW:
            raise InvalidArgument(f"{cmd.return_time.isoformat()} is in the future", field="return_time")

        svc, fp = self.svc, c.fingerprint(cmd)
        shard = svc.shard_of_id(cmd.purchase_id)
        claimed_before = await svc._claim(cmd.key, type(cmd).__name__, fp)
        if claimed_before:
            stored = await svc._stored_result(cmd.key, fp, shard, ReturnResult)
            if stored is not None:
                return await self._finish_return(stored, await self._merged_into(stored.purchase.member_id)), True
        merged_into = ""

        def body(book: ShardBook) -> ReturnResult:
            record = load_purchase(book, cmd.purchase_id)
            # A merge that moved the points out after `run` looked would leave this return taking
            # them from the emptied member, as debt, while the target kept them.
            if not merged_into and load_state(book, record.member_id).merged_into:
                raise MergedMeanwhile(record.member_id)
            return take_back(book, record, cmd, merged_into)

        async def run() -> tuple[ReturnResult, bool]:
            nonlocal merged_into
            for _ in range(RETURN_ATTEMPTS):
                owner = await svc.store.read(shard, lambda tx: tx.get_purchase(cmd.purchase_id))
                if owner is not None:
                    merged_into = await self._merged_into(codec.loads(PurchaseRecord, owner[1]).member_id)
                with contextlib.suppress(MergedMeanwhile):
                    return await svc.write(shard, svc._idempotent_unit(cmd, fp, ReturnResult, body))
            raise FailedPrecondition(  # merges of this member one after another: refused, nothing written
                f"the member of purchase {cmd.purchase_id} was merged while this return ran; send it again",
                field="purchase_id",
            )

        # A refused return (more refunded than paid, an unknown line) gives its key back, so the
        # corrected return may use it.
        result, replayed = await svc.claimed_write(cmd, fp, shard, claimed_before, ReturnResult, run)
        result = await self._finish_return(result, merged_into)
        if not replayed:
            await svc._observe(ScreenedKind.RETURN, screening_event_id("return", cmd.key.namespace, cmd.key.key),
                               result.purchase.member_id, sum(result.reversed.values()),
                               _refund_in_base(result.purchase, result.refunded_now),
                               context=ScreeningContext(channel=cmd.channel, store_id=cmd.store_id),
                               at=cmd.return_time)  # fmt: skip
        return result, replayed

    async def _merged_into(self, member_id: str) -> str:
        """Where a purchase's points live if its member was merged away (erased since or not)."""
        return await self.svc.merge_heir(await self.svc.member(member_id, "purchase_id"), "purchase_id")

    async def _finish_return(self, result: ReturnResult, merged_into: str) -> ReturnResult:
        """A merged-away member's return: the reversals finish on the member it was merged into
        (their debt is known only then), and a tender or cap use given back to the merged-away
        member follows it there. A replay does both again: each step is idempotent, and a sweep a
        failure cut off the first time happens now."""
        if result.reversal_sagas:
            debt = 0
            for saga_id in result.reversal_sagas:
                debt += (await self.svc.sagas.drive_reversal(saga_id)).debt_points
            result = replace(result, debt_points=debt)
        if merged_into and (result.tender_recredited or result.reversed):
            # A tender given back, or cap use given back to a credit still here (owed_caps).
            await self.svc.sagas.sweep_merged(result.purchase.member_id, merged_into)
        return result


def _refund_in_base(record: PurchaseRecord, refunded_minor: int) -> Money:
    """This return's refund as fraud_svc compares amounts: in the program's base currency,
    in proportion to the purchase's base total (the receipt's currency for older purchases)."""
    base = record.base_total
    if base is None or not record.total.amount_minor:
        return Money(refunded_minor, record.total.currency)
    return Money(base.amount_minor * refunded_minor // record.total.amount_minor, base.currency)


MAX_LISTED_SPAN = timedelta(days=31)


def _purchase_cursor(token: str) -> tuple[datetime, str] | None:
    if not token:
        return None
    when, _, purchase_id = token.partition("|")
    try:  # the tokens this API returns carry a UTC offset; without one the time compares with nothing
        return utc_instant(datetime.fromisoformat(when)), v.object_id(purchase_id, "pu", "page_token")
    except (ValueError, InvalidArgument):
        raise InvalidArgument("is not a token this API returned", field="page_token") from None


def _waiting(tx: ShardTx, size: int) -> list[tuple[str, str]]:
    return tx.waiting_purchases(size)


def _another_tender(cmd: c.RecordPurchase, recorded: PurchaseRecord) -> IdempotencyConflict:
    return IdempotencyConflict(
        cmd.key.namespace, cmd.key.key, "RecordPurchase", recorded.received_at, field="tender_transaction_id",
        detail=f"receipt {cmd.receipt_id} was recorded with tender {recorded.tender_transaction_id}; this copy"
        f" names {cmd.tender_transaction_id}",
    )  # fmt: skip
