"""Purchases and returns inside one shard: the atomic half of accrual.

rules_svc says what a basket earns (a Quote of explained parts); here, in the member's shard
and in one transaction, the member-level guards are applied against the member's counters,
the points are earned per unit, the purchase number, caps and tier qualification are counted,
and the purchase is stored with its breakdown. A return later takes points back from that
stored breakdown, never from a new evaluation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from fractions import Fraction

from ledger_svc import codec
from ledger_svc import commands as c
from ledger_svc.domain import (
    DEFAULT_FUNDING,
    FailedPrecondition,
    InvalidArgument,
    MemberNotActive,
    Money,
    NotFound,
    TxKind,
    bucket_of,
    bucket_of_id,
    new_id,
)
from ledger_svc.postings import ShardBook
from ledger_svc.reviews import ReviewKind, open_review
from ledger_svc.screening import Screening, Verdict
from ledger_svc.store.base import ShardTx, TxRecord
from pointmesh.guards import Guard, apply_guards
from pointmesh.tiers import TierPolicy, effective_tier, lapse_of, same_standing
from pointmesh.tiers import bucket_of as month_bucket

CLAW_BACK = "claw_back"


class PurchaseStatus(StrEnum):
    EARNED = "EARNED"
    PENDING_ACCRUAL = "PENDING_ACCRUAL"
    REFUSED = "REFUSED"


@dataclass(frozen=True, slots=True)
class Part:
    rule_id: str
    unit: str
    points: int
    line: int
    detail: str
    matched: tuple[str, ...] = ()
    capped: str = ""
    guard: Guard | None = None
    threshold_minor: int = 0
    fixed: bool = False
    # A basket multiplier's (line, points multiplied there): a return by lines takes back the
    # returned lines' share. Empty for other parts, and on purchases recorded before it was
    # kept, whose basket multipliers come back in proportion to the refund as they always did.
    line_bases: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Quote:
    """What rules_svc answered for a basket, as the ledger keeps it."""

    program: str
    version: int
    parts: tuple[Part, ...]
    fx_rate: str
    expires_at: datetime | None
    release_at: datetime | None
    max_lateness_days: int
    basket_bonus_on_return: str
    tier: str
    tier_policy: TierPolicy | None
    experiment_arms: dict[str, str] = field(default_factory=dict)
    counts_purchases: bool = True  # the answer depends on the member's purchase count
    base_total: Money | None = None  # the basket in the program's base currency (what fraud compares)


@dataclass(frozen=True, slots=True)
class MemberState:
    purchase_count: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    qualification: dict[str, int] = field(default_factory=dict)
    tier: str = ""
    merged_from: tuple[str, ...] = ()  # members whose state was added in by a merge (once each)
    # Set on a merged-away member's state when the merge moves it out: a purchase that passed the
    # status check before the merge finds it in its own write and is refused, instead of earning
    # on the member after its count and caps went to the target.
    merged_into: str = ""
    # The tier last told to the member (a purchase's, or the maintenance job's when it lapsed),
    # and when to look at it again: the instant it drops with nothing more earned, or at once
    # after a return, reversal or merge moved the credits (tier_watch.py). None: nothing to watch.
    tier_due: datetime | None = None
    # Tier credits taken back (a return, a reversal) from this member after its merge moved its
    # months on: owed to the months of the member it was merged into, where they count, and
    # carried there by the next sweep of what reached this member (sagas._move_out).
    owed_qualification: dict[str, int] = field(default_factory=dict)
    # The sweeps whose owed credits this member took in (each once, however often its step runs).
    owed_taken: tuple[str, ...] = ()
    # Cap use given back (a return of capped points, by counter) on this member after its merge
    # moved its counters on: owed to the counters of the member it was merged into, carried
    # there by the next sweep like owed_qualification.
    owed_caps: dict[str, int] = field(default_factory=dict)
    # The latest receipt time whose tier credits counted while still ahead of the ledger's clock
    # (a till running a few minutes fast, within FUTURE_SKEW): see `tier_clock`.
    counted_ahead: datetime | None = None

    def tier_clock(self, now: datetime) -> datetime:
        """The instant the member's tier is read at: now, or a receipt stamped ahead whose
        credits count already. Its purchase told the member the tier it reached, maybe in a
        month the ledger's clock has not reached yet; read at now, that tier would seem to drop
        and the real one would never be told again."""
        ahead = self.counted_ahead
        return ahead if ahead is not None and ahead > now else now


def require_unmerged(member_id: str, state: MemberState, field: str = "member_id") -> None:
    """The member was active when checked, but a merge may have moved it out since (on another
    replica, whose status cache this one's does not hear of): its count, caps and points went
    to the target, so a purchase or an earn written here now would land on a member nothing
    reads. Refused in the write, as if the merge came first."""
    if state.merged_into:
        raise MemberNotActive(f"member {member_id} was merged into {state.merged_into}", field=field)


def take_in_merged_state(book: ShardBook, target: str, source: str, moved: MemberState) -> None:
    """A merge adds the source's purchase count, cap counters and tier qualification (month by
    month) to the target's, which keeps everything: the person's tier and caps do not reset
    because two accounts became one. Once per source, however often the saga step runs."""
    state = load_state(book, target)
    if source in state.merged_from:
        return
    ahead = max(state.tier_clock(book.now), moved.tier_clock(book.now))
    merged = replace(
        state, purchase_count=state.purchase_count + moved.purchase_count,
        counters=_added(state.counters, moved.counters), qualification=_added(state.qualification, moved.qualification),
        merged_from=(*state.merged_from, source), tier_due=book.now,
        counted_ahead=ahead if ahead > book.now else None,
    )  # fmt: skip
    keep_state(book, target, state, merged)


# Sweep ids kept to apply each once: a sweep's step reruns only until its saga is done, long
# before this many later sweeps of the same member's heir.
OWED_SWEEPS_KEPT = 64


def take_in_owed(book: ShardBook, target: str, sweep_id: str, owed: dict[str, int], caps: dict[str, int]) -> None:
    """What a sweep carries from a merged-away member, once per sweep: tier credits taken back
    (MemberState.owed_qualification) added to the target's months, cap use given back
    (owed_caps) taken off its counters; a target merged on in turn owes them further."""
    state = load_state(book, target)
    if sweep_id in state.owed_taken:
        return
    months = _added(state.owed_qualification if state.merged_into else state.qualification, owed)
    taken = (*state.owed_taken, sweep_id)[-OWED_SWEEPS_KEPT:]
    if state.merged_into:
        after = replace(state, owed_qualification=months, owed_caps=_added(state.owed_caps, caps), owed_taken=taken)
    else:  # the tier may drop: the maintenance job asks rules_svc on its next pass
        after = replace(
            state, qualification=months, counters=_given_back(state.counters, caps), owed_taken=taken,
            tier_due=book.now if owed else state.tier_due,
        )  # fmt: skip
    keep_state(book, target, state, after)


def _added(counts: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    total = dict(counts)
    for key, n in more.items():
        total[key] = total.get(key, 0) + n
    return total


def _given_back(counters: dict[str, int], used: dict[str, int]) -> dict[str, int]:
    """Cap counters with the given use taken off (a counter at zero is dropped)."""
    left = dict(counters)
    for key, points in used.items():
        n = left.get(key, 0) - points
        if n > 0:
            left[key] = n
        else:
            left.pop(key, None)
    return left


def keep_state(book: ShardBook, member_id: str, before: MemberState, after: MemberState) -> None:
    """Writes a member's state, and its tier's due time where the maintenance job finds it
    when that moved (most writes leave it: one row less for them)."""
    book.tx.put_member_state(member_id, codec.dumps(after))
    if after.tier_due != before.tier_due:
        book.tx.set_tier_due(member_id, after.tier_due)


@dataclass(frozen=True, slots=True)
class PurchaseRecord:
    purchase_id: str
    member_id: str
    program: str
    channel: str
    store_id: str
    receipt_id: str
    total: Money
    lines: tuple[c.PurchaseLine, ...]
    receipt_time: datetime
    received_at: datetime
    status: PurchaseStatus
    status_reason: str = ""
    version: int = 0
    fx_rate: str = ""
    parts: tuple[Part, ...] = ()
    returned_points: tuple[int, ...] = ()
    earn_transactions: dict[str, str] = field(default_factory=dict)
    purchase_number: int = 0
    tier_before: str = ""
    tier_after: str = ""
    tender_transaction_id: str = ""
    tender_points: int = 0
    tender_recredited: int = 0
    returned_quantities: tuple[int, ...] = ()
    refunded_minor: int = 0
    experiment_arms: dict[str, str] = field(default_factory=dict)
    return_mode: str = ""
    basket_bonus_on_return: str = CLAW_BACK
    qualification_bucket: str = ""
    metric_unit: str = ""
    screening: Screening | None = None
    base_total: Money | None = None  # the total in the program's base currency (fraud compares these)
    # How long the program let this purchase's points live, in seconds: 0 never expire, -1 not
    # recorded (a purchase saved before this field; the ledger's default applies). Points paid as
    # tender and given back on a return live as long, from the return.
    lot_lifetime_s: int = -1

    def earned(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for part in self.parts:
            out[part.unit] = out.get(part.unit, 0) + part.points
        return out


@dataclass(frozen=True, slots=True)
class ReturnResult:
    purchase: PurchaseRecord
    reversed: dict[str, int]
    tender_recredited: int
    debt_points: int
    # Reversals of a merged-away member's earns, finished on the member it was merged into.
    reversal_sagas: tuple[str, ...] = ()
    refunded_now: int = 0  # this return's refund, in the purchase's currency (minor units)


def purchase_id_for(member_id: str, program: str, natural_key: str) -> str:
    """Deterministic, and routed to the member's shard like every other id of theirs."""
    digest = hashlib.sha256(f"{program}|{natural_key}".encode()).hexdigest()[:24]
    return f"pu_{bucket_of(member_id):04x}{digest}"


def load_state(book: ShardBook, member_id: str) -> MemberState:
    raw = book.tx.get_member_state(member_id)
    return MemberState() if raw is None else codec.loads(MemberState, raw)


# A purchase this recent is priced under the version in effect now (one published to start in
# between aside) and tells the member's tier itself; an older one leaves that to the pass.
TOLD_BY_PURCHASE = timedelta(minutes=10)
PURCHASE_REFERENCE = "purchase "  # an accrual earn's reference: "purchase <purchase id>"


def qualification_bucket_of(tx: ShardTx, earn_tx: str) -> str:
    """The tier-qualification month an accrual earn counted its points in ("" if it counted none:
    not a purchase's earn, or not in the program's qualifying unit)."""
    return _qualifying_month(tx, tx.get_transaction(earn_tx))


def _qualifying_month(tx: ShardTx, earn: TxRecord | None) -> str:
    record = _purchase_of(tx, earn)
    if earn is None or record is None or record.earn_transactions.get(record.metric_unit) != earn.tx_id:
        return ""
    return record.qualification_bucket


def _purchase_of(tx: ShardTx, earn: TxRecord | None) -> PurchaseRecord | None:
    """The purchase an accrual earn was made for (None: not a purchase's earn)."""
    if earn is None or not earn.reference.startswith(PURCHASE_REFERENCE):
        return None
    found = tx.get_purchase(earn.reference.removeprefix(PURCHASE_REFERENCE))
    return None if found is None else codec.loads(PurchaseRecord, found[1])


def give_back_caps(book: ShardBook, member_id: str, used: dict[str, int]) -> None:
    """Capped points a return took back count against the member's caps no more: an exchange
    the same day (return the shirt, buy the other size) earns the capped bonus again, as a
    member would expect. The purchase's place in the member's count stays (a first purchase
    returned was still the first). A member merged away has its counters on its heir: the use
    given back is owed there (MemberState.owed_caps), and the next sweep carries it."""
    if not used:  # most returns: nothing capped, so no state read
        return
    state = load_state(book, member_id)
    if state.merged_into:
        after = replace(state, owed_caps=_added(state.owed_caps, used))
    else:
        after = replace(state, counters=_given_back(state.counters, used))
    keep_state(book, member_id, state, after)


def _capped_points(record: PurchaseRecord, deltas: list[int], unit: str) -> dict[str, int]:
    """The unit's points taken back (`deltas`, part by part) from parts a member cap counted, by
    counter."""
    used: dict[str, int] = {}
    for part, delta in zip(record.parts, deltas, strict=True):
        if delta and part.unit == unit and part.guard is not None and part.guard.counter:
            used[part.guard.counter] = used.get(part.guard.counter, 0) + delta
    return used


def take_off_qualification(book: ShardBook, member_id: str, bucket: str, points: int) -> None:
    """Tier credits taken back come off the month they counted in, on the member whose tier they
    count for now (the member itself, or the one it was merged into, who has its months)."""
    if not bucket or points <= 0:
        return
    state = load_state(book, member_id)
    if state.merged_into:  # its months moved on (a merge that ran while the reversal did)
        owed = dict(state.owed_qualification)
        owed[bucket] = owed.get(bucket, 0) - points
        keep_state(book, member_id, state, replace(state, owed_qualification=owed))
        return
    qualification = dict(state.qualification)
    qualification[bucket] = qualification.get(bucket, 0) - points
    # The tier may drop with them: the maintenance job asks rules_svc on its next pass.
    keep_state(book, member_id, state, replace(state, qualification=qualification, tier_due=book.now))


def untier(book: ShardBook, earn_tx: str, points: int) -> None:
    """A purchase's earn reversed other than by a return (a rejected fraud review, ops): the
    tier credits it counted toward qualification come off its month too, as a return's do, so
    the member's tier follows what they keep. Each point is reversed once, whoever reverses it,
    so nothing comes off twice. (A merged-away member's reversal does this on the member it was
    merged into: Sagas.drive_reversal.) Reversed whole, its capped points count against the
    member's caps no more either (`capped_unreturned`)."""
    earn = book.tx.get_transaction(earn_tx)
    if earn is not None:
        take_off_qualification(book, earn.member_id, _qualifying_month(book.tx, earn), points)
        if points > 0 and not book.reversible_points(earn_tx):
            give_back_caps(book, earn.member_id, capped_unreturned(book.tx, earn_tx))


def capped_unreturned(tx: ShardTx, earn_tx: str) -> dict[str, int]:
    """The capped points of a purchase's earn that no return gave back to the member's caps, by
    counter: what reversing the rest of it whole gives back (a rejected review, ops reversing it
    in full). A partial reversal by ops gives none back: which of the purchase's points it took
    is not known, and a later return still gives back its lines' share."""
    record = _purchase_of(tx, tx.get_transaction(earn_tx))
    unit = next((u for u, t in record.earn_transactions.items() if t == earn_tx), None) if record else None
    if record is None or unit is None:
        return {}
    returned = record.returned_points or (0,) * len(record.parts)
    left = [max(0, part.points - done) for part, done in zip(record.parts, returned, strict=True)]
    return _capped_points(record, left, unit)


def credit_still_here(tx: ShardTx, earn_tx: str, member_id: str) -> bool:
    """Whether an earn's credit still waits on its own member as a pending lot: a purchase
    reviewed after its member was merged away (a late review) keeps its credit there until the
    decision, so a reversal takes it from there, not from the member the rest went to."""
    lot = tx.lot_of_transaction(earn_tx, member_id) if earn_tx else None
    return lot is not None and lot.pending and lot.member_id == member_id and lot.remaining_points > 0


def load_purchase(book: ShardBook, purchase_id: str) -> PurchaseRecord:
    found = book.tx.get_purchase(purchase_id)
    if found is None:
        raise NotFound(f"purchase {purchase_id} does not exist", field="purchase_id")
    return codec.loads(PurchaseRecord, found[1])


def save_purchase(book: ShardBook, record: PurchaseRecord) -> None:
    book.tx.put_purchase(
        record.purchase_id, record.member_id, record.status.value, record.receipt_time, codec.dumps(record),
        record.channel, record.store_id,
    )  # fmt: skip


def tender_points(book: ShardBook, member_id: str, tx_id: str) -> int:
    if not tx_id:
        return 0
    # An id routed to another member's bucket is not this member's redemption: said so whether
    # it lives in this shard or another (which would have read as "does not exist").
    ours = bucket_of_id(tx_id) == bucket_of(member_id)
    tender = book.require_transaction(tx_id, "tender_transaction_id") if ours else None
    if tender is None or tender.member_id != member_id or tender.kind not in (TxKind.REDEEM, TxKind.HOLD_CAPTURE):
        raise InvalidArgument(
            f"transaction {tx_id} is not a redemption of member {member_id}", field="tender_transaction_id"
        )
    return -tender.points


def lot_lifetime(quote: Quote, receipt_time: datetime) -> int:
    """How long the purchase's points live, in seconds from the lot's start (0: never expire),
    as its program gives them: also the life of its tender given back on a return."""
    return 0 if quote.expires_at is None else int((quote.expires_at - receipt_time).total_seconds())


def accrue(
    book: ShardBook,
    record: PurchaseRecord,
    quote: Quote,
    screening: Screening | None = None,
    review_id: str = "",
    state: MemberState | None = None,
) -> PurchaseRecord:
    """Guards, earns, counters, tier and the stored purchase, all in this one shard write
    (`state`: the member's, when the caller read it in this write already).

    A purchase fraud screening denied is stored as REFUSED and earns nothing; one it sent to
    review earns as pending credit with a review item (reviews.py) beside it.
    """
    lifetime = lot_lifetime(quote, record.receipt_time)
    if screening is not None and screening.verdict is Verdict.DENY:
        # Its tender, given back on a return, lives as long as the program gives points.
        refused = replace(record, status=PurchaseStatus.REFUSED, screening=screening, lot_lifetime_s=lifetime,
                          status_reason=f"refused by fraud screening: {screening.why}")  # fmt: skip
        save_purchase(book, refused)
        return refused
    held = screening is not None and screening.verdict is Verdict.REVIEW
    state = state if state is not None else load_state(book, record.member_id)
    ordinal = state.purchase_count + 1
    granted, used = apply_guards([(p.guard, p.points) for p in quote.parts], state.counters, ordinal)
    parts = tuple(
        p if g.points == p.points else replace(p, points=g.points, capped=f"{p.capped}; {g.note}".strip("; "))
        for p, g in zip(quote.parts, granted, strict=True)
    )
    record = replace(
        record, status=PurchaseStatus.EARNED, status_reason="", version=quote.version, fx_rate=quote.fx_rate,
        experiment_arms=dict(quote.experiment_arms),
        parts=parts, returned_points=tuple(0 for _ in parts), purchase_number=ordinal, tier_before=quote.tier,
        basket_bonus_on_return=quote.basket_bonus_on_return, base_total=quote.base_total,
        lot_lifetime_s=lifetime,
    )  # fmt: skip
    txs: dict[str, str] = {}
    for unit, points in record.earned().items():
        if points <= 0:
            continue
        if unit not in book.policy.units:
            raise FailedPrecondition(f"program earns {unit!r}, which this ledger does not hold", field="program")
        earned = book.earn(
            record.member_id, unit, points, funding_source=DEFAULT_FUNDING, business_time=record.receipt_time,
            expires_at=quote.expires_at, release_at=quote.release_at, pending_review=held, purchase=record.total,
            never_expires=quote.expires_at is None,  # the program gives every earn a date, or none: never
            reference=f"{PURCHASE_REFERENCE}{record.purchase_id}",
        )  # fmt: skip
        txs[unit] = earned.transaction.transaction_id
    counters = dict(state.counters)
    for key, n in used.items():
        counters[key] = counters.get(key, 0) + n
    qualification, tier_after, bucket, metric = dict(state.qualification), quote.tier, "", ""
    # The tier as of now, not the receipt's (a late receipt is priced at the tier of its own
    # time): what the member was last told is compared with it, and its lapse watched. A version
    # without tiers leaves the tier told as it was.
    told, tier_now, due = state.tier or quote.tier, state.tier, state.tier_due
    at = state.tier_clock(book.now)
    if (policy := quote.tier_policy) is not None:
        metric = policy.metric_unit
        bucket = month_bucket(record.receipt_time, policy.timezone)
        qualification[bucket] = qualification.get(bucket, 0) + record.earned().get(metric, 0)
        tier_after = effective_tier(policy, qualification, record.receipt_time)
    if policy is not None and book.now - record.receipt_time > TOLD_BY_PURCHASE:
        # Priced under the version of its own time, which may not be the one in effect now
        # (its thresholds, its tier codes): the maintenance pass asks rules_svc at once, and
        # tells a change from the tier told, or from the one this purchase was priced at.
        tier_now, due = told, book.now
    elif policy is not None:
        at = max(at, record.receipt_time)
        if not same_standing(policy, record.receipt_time, at):
            # The tier is read at another month (or grace end) than the receipt's: now, or a
            # receipt stamped ahead that counted already. The version in effect then need not be
            # this quote's (a new one starting at the month), so the pass asks rules_svc there.
            tier_now, due = told, book.now
        elif (tier_now := tier_after) == policy.levels[0][0]:
            due = None  # the entry level: nothing to lose
        elif tier_now != state.tier or due is None:  # credits only ever push a known lapse later
            due = lapse_of(policy, qualification, at)
    kept = replace(state, purchase_count=ordinal, counters=counters, qualification=qualification, tier=tier_now,
                   tier_due=due, counted_ahead=at if at > book.now else None)  # fmt: skip
    keep_state(book, record.member_id, state, kept)  # `merged_from` stays: merges apply once
    if held and screening is not None and txs:
        unit = book.policy.units[0] if book.policy.units[0] in txs else next(iter(txs))
        review = open_review(book, review_id, ReviewKind.EARN, record.member_id, unit, record.earned()[unit],
                             tuple(txs.values()), screening, record.purchase_id)  # fmt: skip
        screening = review.screening
    record = replace(
        record, earn_transactions=txs, tier_after=tier_after, qualification_bucket=bucket, metric_unit=metric,
        screening=screening,
    )  # fmt: skip
    save_purchase(book, record)
    _announce(book, record, told, tier_now)
    return record


def _announce(book: ShardBook, record: PurchaseRecord, told: str, tier_now: str) -> None:
    """Events for live channels and gamification: the purchase, and a tier change if any
    since the tier the member was last told (one that lapsed unannounced included)."""
    balance = book.balance(record.member_id, book.policy.units[0])
    book.emit("purchase_recorded", balance, {
        "purchase_id": record.purchase_id, "channel": record.channel, "store_id": record.store_id,
        "total_minor": record.total.amount_minor, "currency": record.total.currency,
        "receipt_time": record.receipt_time.isoformat(), "earned": record.earned(),
        "purchase_number": record.purchase_number,
        "categories": sorted({line.category for line in record.lines if line.category}),
        "experiment_arms": record.experiment_arms,
    })  # fmt: skip
    if told and tier_now and told != tier_now:
        book.emit("tier_changed", balance, {
            "tier_before": told, "tier_after": tier_now, "purchase_id": record.purchase_id,
        })  # fmt: skip


def _fully_returned(record: PurchaseRecord, quantities: tuple[int, ...], refunded: int) -> bool:
    """Every line back, or everything refunded (a zero total is full only by lines)."""
    every_line = record.return_mode == "lines" and all(
        q >= ln.quantity for q, ln in zip(quantities, record.lines, strict=True)
    )
    return every_line or 0 < record.total.amount_minor <= refunded


def _return_targets(record: PurchaseRecord, quantities: tuple[int, ...], refunded: int) -> list[int]:
    """Points each part should have given back after this return, cumulatively (floored)."""
    full = _fully_returned(record, quantities, refunded)
    remaining = record.total.amount_minor - refunded
    targets = []
    for part in record.parts:
        if full:
            target = part.points
        elif part.fixed:
            target = 0  # a fixed bonus stays until the purchase is fully returned (or its threshold fails)
        elif record.return_mode == "lines" and part.line >= 0:
            line = record.lines[part.line]
            target = part.points * quantities[part.line] // line.quantity
        elif record.return_mode == "lines" and part.line_bases:
            target = _share_of_lines(part, record.lines, quantities)
        else:
            target = part.points * refunded // record.total.amount_minor if record.total.amount_minor else 0
        if part.threshold_minor and remaining < part.threshold_minor and record.basket_bonus_on_return == CLAW_BACK:
            target = part.points
        targets.append(target)
    return targets


def _share_of_lines(part: Part, lines: tuple[c.PurchaseLine, ...], quantities: tuple[int, ...]) -> int:
    """A basket multiplier's points due back once these quantities are returned: its points
    times the returned share of the points it multiplied, floored (exact fractions, since a
    line's returned share of its points need not be whole)."""
    multiplied = sum(points for _, points in part.line_bases)
    if not multiplied:
        return 0
    returned = sum(Fraction(points * quantities[i], lines[i].quantity) for i, points in part.line_bases)
    return int(part.points * returned // multiplied)


def _give_back_tender(
    book: ShardBook, record: PurchaseRecord, quantities: tuple[int, ...], refunded: int, reason: str
) -> int:
    """Re-credits what is due of the points paid as tender once these quantities and this
    refund are back (in proportion to the refund, all of it on a full return), less what came
    back before; the points re-credited."""
    if _fully_returned(record, quantities, refunded):
        target = record.tender_points
    elif record.total.amount_minor:
        target = record.tender_points * refunded // record.total.amount_minor
    else:  # a zero total returned by some of its lines: the tender comes back with the last one
        target = 0
    recredit = max(0, target - record.tender_recredited)
    if recredit:
        # A redemption named as tender by several purchases gives back at most what it took.
        recredit = min(recredit, book.tender_left(record.tender_transaction_id))
    if recredit:
        book.recredit_tender(record.tender_transaction_id, recredit, reason=reason, lifetime_s=record.lot_lifetime_s)
    return recredit


def name_tender(book: ShardBook, record: PurchaseRecord, tx_id: str) -> PurchaseRecord:
    """Links the redemption that paid part of a receipt first recorded without it (from a file,
    the till's copy arriving later): a later return gives those points back, and what earlier
    returns refunded gives back its share now."""
    require_unmerged(record.member_id, load_state(book, record.member_id))
    record = replace(record, tender_transaction_id=tx_id, tender_points=tender_points(book, record.member_id, tx_id))
    quantities = record.returned_quantities or tuple(0 for _ in record.lines)
    recredit = _give_back_tender(
        book, record, quantities, record.refunded_minor, f"tender named for returned purchase {record.purchase_id}"
    )
    record = replace(record, tender_recredited=recredit)
    save_purchase(book, record)
    return record


def _explain_capped(record: PurchaseRecord, deltas: list[int], unit: str, taken: int) -> None:
    """Trims the unit's parts' share of a return (last part first) to the `taken` points it
    could still reverse (ops or a rejected review took the rest back first): a part's
    returned_points says what returns took back, and a later return computes its share from
    the part's target again, capped the same way, so no point goes twice."""
    over = sum(d for part, d in zip(record.parts, deltas, strict=True) if part.unit == unit) - taken
    for k in reversed(range(len(deltas))):
        if over <= 0:
            return
        if record.parts[k].unit == unit:
            cut = min(over, deltas[k])
            deltas[k] -= cut
            over -= cut


def take_back(book: ShardBook, record: PurchaseRecord, cmd: c.RecordReturn, merged_into: str = "") -> ReturnResult:
    """The return in the purchase's shard. For a member merged into `merged_into`, whose points
    live there now, each reversal is started here and finished there (a saga the caller drives),
    and what comes back to the merged-away member (tender) is the caller's to sweep across."""
    # A purchase fraud screening refused earned nothing, but the goods were sold, and any points
    # paid as its tender come back with them: its return reverses nothing and gives those back.
    if record.status not in (PurchaseStatus.EARNED, PurchaseStatus.REFUSED):
        raise FailedPrecondition(
            f"purchase {record.purchase_id} is {record.status.value}; returns apply once it has earned",
            field="purchase_id",
        )
    if cmd.return_time is not None and cmd.return_time < record.receipt_time:
        raise InvalidArgument(
            f"{cmd.return_time.isoformat()} is before the purchase's receipt time "
            f"{record.receipt_time.isoformat()}", field="return_time",
        )  # fmt: skip
    before = record
    mode = "lines" if cmd.lines else "amount"
    if record.return_mode and record.return_mode != mode:
        raise FailedPrecondition(
            f"earlier returns of this purchase were by {record.return_mode}; continue the same way",
            field="lines" if cmd.lines else "refund",
        )
    quantities = list(record.returned_quantities or [0] * len(record.lines))
    refunded = record.refunded_minor
    if cmd.lines:
        for i, ret in enumerate(cmd.lines):
            if not 0 <= ret.line_index < len(record.lines):
                raise InvalidArgument(f"purchase has {len(record.lines)} lines", field=f"lines[{i}].line_index")
            line = record.lines[ret.line_index]
            if quantities[ret.line_index] + ret.quantity > line.quantity:
                raise FailedPrecondition(
                    f"returns {quantities[ret.line_index] + ret.quantity} of line {ret.line_index}, "
                    f"but {line.quantity} were bought",
                    field=f"lines[{i}].quantity",
                )
            quantities[ret.line_index] += ret.quantity
        refunded = sum(ln.amount_minor * q // ln.quantity for ln, q in zip(record.lines, quantities, strict=True))
    else:
        assert cmd.refund is not None
        if cmd.refund.currency != record.total.currency:
            raise InvalidArgument(f"the purchase was in {record.total.currency}", field="refund.currency")
        refunded += cmd.refund.amount_minor
        if refunded > record.total.amount_minor:
            raise FailedPrecondition(
                f"refunds total {refunded} minor units, more than the purchase of {record.total.amount_minor}",
                field="refund.amount_minor",
            )
    record = replace(record, return_mode=mode)
    targets = _return_targets(record, tuple(quantities), refunded)
    by_unit: dict[str, int] = {}
    deltas = [max(0, target - done) for target, done in zip(targets, record.returned_points, strict=True)]
    for part, delta in zip(record.parts, deltas, strict=True):
        by_unit[part.unit] = by_unit.get(part.unit, 0) + delta
    # The points paid as tender come back first: a reversal then takes from them like any
    # points the member has, and owes as debt only what is not there once they are back.
    recredit = _give_back_tender(book, record, tuple(quantities), refunded, f"return {cmd.key.key}")
    # Where each unit's credit is taken back from: here, or (merged away) the member it went to.
    here = {
        u: not merged_into or credit_still_here(book.tx, tx, record.member_id)
        for u, tx in record.earn_transactions.items()
    }
    debt = 0
    sagas: list[str] = []
    caps_here: dict[str, int] = {}
    for unit, points in by_unit.items():
        # What is still reversible: ops or a rejected fraud review may have taken the earn back
        # already, and the return must still go through (and give back the tender).
        if points > 0:
            points = by_unit[unit] = min(points, book.reversible_points(record.earn_transactions[unit]))
            _explain_capped(record, deltas, unit, points)
        if points <= 0:
            continue
        reason = f"return {cmd.key.key} of purchase {record.purchase_id}"
        caps = _capped_points(record, deltas, unit)
        if not here[unit]:
            sagas.append(book.start_merged_reversal(
                record.earn_transactions[unit], points=points, refund=None, reason=reason, target=merged_into,
                saga_id=new_id("rv", record.member_id), caps=caps,
            ))  # fmt: skip
        else:
            for key, n in caps.items():
                caps_here[key] = caps_here.get(key, 0) + n
            debt += book.reverse(record.earn_transactions[unit], points=points, refund=None, reason=reason).debt_points
    returned = [done + d for done, d in zip(record.returned_points, deltas, strict=True)]
    give_back_caps(book, record.member_id, caps_here)
    if record.metric_unit and here.get(record.metric_unit, True):  # else the reversal saga does it on the heir
        take_off_qualification(book, record.member_id, record.qualification_bucket, by_unit.get(record.metric_unit, 0))
    record = replace(
        record, returned_points=tuple(returned), returned_quantities=tuple(quantities), refunded_minor=refunded,
        tender_recredited=record.tender_recredited + recredit,
    )  # fmt: skip
    save_purchase(book, record)
    refunded_now = record.refunded_minor - before.refunded_minor
    book.emit("purchase_returned", book.balance(record.member_id, book.policy.units[0]), {
        "purchase_id": record.purchase_id, "return_key": cmd.key.key, "currency": record.total.currency,
        "refunded_minor": refunded_now, "refunded_total_minor": record.refunded_minor,
        "points_reversed": {u: p for u, p in by_unit.items() if p},
        "fully_returned": _fully_returned(record, tuple(quantities), refunded),
        "receipt_time": record.receipt_time.isoformat(),
    })  # fmt: skip
    return ReturnResult(record, {u: p for u, p in by_unit.items() if p}, recredit, debt, tuple(sagas), refunded_now)
