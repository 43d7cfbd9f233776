"""Proves the ledger is internally consistent, from the journal up.

Checks, per shard: every transaction's entries sum to zero; every stored balance equals the
sum of its account's entries; spendable lots add up to the positive posted balance and
pending lots to the pending balance; reserved points equal the open holds; no saga is left
open past SAGA_GRACE; no hold is still placed past its timeout (found by a scan, not the ledger's timers, so
a timer lost or stuck shows here; the running ledger voids what this finds); every lot holds
between zero and its original points (a per-member sum hides one lot's error another cancels);
every journal leg's transaction row exists; fraud reviews and what they guard agree (a placed
hold a review or transfer owns has that owner still open, a purchase's credit held for review
has its open review, an open review's hold or credit is still there: otherwise the points
stay reserved or pending for ever, since only the decision settles them); and, on SQLite, every
transaction recent enough that retention cannot have taken its event still has that event (one
lost before it was published), looking only at the 24 hours up to the shard's newest event
(store/sqlite.py EVENT_CHECK_WINDOW: a loss older than that is not reported, so an hourly pass
reads a day of events, not the whole retention period). Across shards: each unit's accounts together sum to zero, and transit is
empty while no saga is open; the shards are read one after another, so when these disagree the
balances are read again (a transfer completing between two shards' reads; half a second apart
while sagas are on their way), and only a disagreement that stays is reported. Transit left
non-empty while sagas are still on their way is not checked, and the report says so
(`unchecked`): a saga's points pass through it. The same code runs on every store (the event check only
where the store can tell).
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ledger_svc import codec
from ledger_svc.domain import Hold, SagaState, member_account, pending_account
from ledger_svc.purchases import PURCHASE_REFERENCE
from ledger_svc.reviews import Review, ReviewKind, ReviewStatus
from ledger_svc.store.base import LedgerStore, SagaRecord, ShardTx

REVIEW_PAGE = 500
# A saga open longer than this is reported; a younger one is a transfer or merge on its way.
SAGA_GRACE = timedelta(minutes=1)
# Reads of every shard's balances for the cross-shard sums, when the pass's own reads (one
# shard after another) disagree across shards: a transfer between two shards completing between
# their reads shows the credit without the debit (transit not empty, totals overstated).
CUT_ATTEMPTS = 3
SETTLE_SECONDS = 0.5  # between those reads, while sagas are on their way


@dataclass(frozen=True, slots=True)
class Difference:
    shard: int
    kind: str
    subject: str
    expected: int
    actual: int

    def describe(self) -> str:
        where = "all shards" if self.shard < 0 else f"shard {self.shard}"
        return f"{where}: {self.kind} {self.subject}: expected {self.expected}, found {self.actual}"


@dataclass(slots=True)
class ReconcileReport:
    shards: int = 0
    accounts: int = 0
    differences: list[Difference] = field(default_factory=list)
    totals_by_account_class: dict[str, int] = field(default_factory=dict)
    # Placed holds past their timeout: (shard, hold_id); also listed in differences.
    overdue_holds: list[tuple[int, str]] = field(default_factory=list)
    held_points: int = 0
    # Checks the store could not make (Cassandra: events lost before they were published).
    unchecked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences


@dataclass(slots=True)
class _ShardFindings:
    differences: list[Difference]
    balances: dict[str, int]
    overdue: list[str]
    held: int
    unchecked: list[str]
    open_sagas: int = 0
    on_the_way: set[str] = field(default_factory=set)  # members an open saga moves points to or from


def _check_shard(shard: int, now: datetime, saga_grace: timedelta, tx: ShardTx) -> _ShardFindings:
    diffs: list[Difference] = []
    for tx_id, total in tx.unbalanced_transactions():
        diffs.append(Difference(shard, "transaction does not sum to zero", tx_id, 0, int(total)))
    sums = tx.sum_entries_by_account()
    accounts = {row.account: row for row in tx.list_accounts()}
    for account in sorted(set(sums) | set(accounts)):
        stored = accounts[account].balance if account in accounts else 0
        journal = int(sums.get(account, 0))
        if stored != journal:
            diffs.append(Difference(shard, "stored balance differs from its entries", account, journal, stored))
    lots = tx.lot_totals()
    holds = tx.placed_hold_totals()
    members = {(a.split(":")[1], a.split(":")[2]) for a in accounts if a.startswith(("member:", "pending:"))}
    members |= {(m, u) for (m, u, _p) in lots}
    for member_id, unit in sorted(members):
        main = accounts.get(member_account(member_id, unit))
        posted = main.balance if main else 0
        spendable = int(lots.get((member_id, unit, False), 0))
        if spendable != max(posted, 0):
            diffs.append(
                Difference(shard, "lots differ from posted balance", f"{member_id}:{unit}", max(posted, 0), spendable)
            )
        pending_row = accounts.get(pending_account(member_id, unit))
        pending = pending_row.balance if pending_row else 0
        pending_lots = int(lots.get((member_id, unit, True), 0))
        if pending_lots != pending:
            diffs.append(
                Difference(
                    shard, "pending lots differ from pending balance", f"{member_id}:{unit}", pending, pending_lots
                )
            )
        reserved = main.reserved if main else 0
        held = int(holds.get(f"{member_id}:{unit}", 0))
        if reserved != held:
            diffs.append(Difference(shard, "reserved differs from open holds", f"{member_id}:{unit}", held, reserved))
    sagas = tx.open_sagas()
    for saga in sagas:
        if saga.created_at <= now - saga_grace:  # a younger one is most likely still on its way
            diffs.append(Difference(
                shard, f"{saga.kind} saga left open in state {saga.state.value}", saga.saga_id, 0, saga.points
            ))  # fmt: skip
    placed = tx.placed_holds()
    overdue = [h for h in placed if not h.saga_id and h.expires_at <= now]
    for hold in overdue:
        diffs.append(Difference(shard, "hold still placed past its timeout", hold.hold_id, 0, hold.points))
    for lot in tx.lots_out_of_bounds():
        diffs.append(
            Difference(
                shard, f"lot of {lot.member_id}:{lot.unit} outside 0..{lot.original_points} points", lot.lot_id,
                min(max(lot.remaining_points, 0), lot.original_points), lot.remaining_points,
            )
        )  # fmt: skip
    for tx_id, legs in tx.entries_without_transaction():
        diffs.append(Difference(shard, "journal legs without their transaction row", tx_id, 0, legs))
    unpublished = tx.transactions_without_events()
    for tx_id in unpublished or []:
        diffs.append(Difference(shard, "transaction without its outbox event (never published)", tx_id, 1, 0))
    diffs += _review_differences(shard, tx, placed)
    balances = {a: r.balance for a, r in accounts.items()}
    unchecked = ["outbox events lost before publishing (not told by this store)"] if unpublished is None else []
    return _ShardFindings(diffs, balances, [h.hold_id for h in overdue], sum(holds.values()), unchecked, len(sagas),
                          _on_the_way(sagas))  # fmt: skip


def _on_the_way(sagas: list[SagaRecord]) -> set[str]:
    return {m for s in sagas for m in (s.source_member, s.dest_member)}


def _open_reviews(tx: ShardTx) -> dict[str, Review]:
    found: dict[str, Review] = {}
    after = None
    while page := tx.list_reviews(ReviewStatus.OPEN.value, "", after, REVIEW_PAGE):
        for _at, review_id, body in page:
            found[review_id] = codec.loads(Review, body)
        if len(page) < REVIEW_PAGE:
            break
        after = (page[-1][0], page[-1][1])
    return found


def _review_state(tx: ShardTx, review_id: str) -> str:
    body = tx.get_review(review_id)
    return "missing" if body is None else codec.loads(Review, body).status.value


def _screened_to_review(tx: ShardTx, earn_tx: str) -> str:
    """The review a purchase's screening opened for this earn, "" if none. Earn's own
    `pending_review` credits wait for ReleasePending with no review at all, so only a purchase
    that was sent to review (its record names the review) says one must be open."""
    record = tx.get_transaction(earn_tx)
    if record is None or not record.reference.startswith(PURCHASE_REFERENCE):
        return ""
    purchase = tx.get_purchase(record.reference.removeprefix(PURCHASE_REFERENCE))
    if purchase is None:
        return ""
    screening = json.loads(purchase[1]).get("screening") or {}
    return str(screening.get("review_id") or "")


def _review_differences(shard: int, tx: ShardTx, placed: list[Hold]) -> list[Difference]:
    """Points a review (or a transfer) owns are settled by its decision alone: VoidHold refuses
    such a hold, maintenance skips it, ReleasePending refuses such a credit. So an owner gone or
    decided while they are still reserved or pending leaves them there for ever; and an open
    review whose hold or credit is gone can never be decided."""
    diffs: list[Difference] = []
    reviews = _open_reviews(tx)
    holds = {h.hold_id: h for h in placed}
    for hold in placed:
        if hold.saga_id.startswith("rv_"):
            review = reviews.get(hold.saga_id)
            if review is None or hold.hold_id not in review.subject_ids:
                state = "open without naming it" if review else _review_state(tx, hold.saga_id)
                diffs.append(Difference(shard, f"hold placed for fraud review {hold.saga_id}, which is {state}",
                                        hold.hold_id, 0, hold.points))  # fmt: skip
        elif hold.saga_id:
            saga = tx.get_saga(hold.saga_id)
            if saga is None or saga.state in (SagaState.DONE, SagaState.CANCELLED):
                state = "missing" if saga is None else saga.state.value
                diffs.append(Difference(shard, f"hold placed for transfer {hold.saga_id}, which is {state}",
                                        hold.hold_id, 0, hold.points))  # fmt: skip
            elif saga.state is SagaState.REVIEW:
                review_id = str(json.loads(saga.payload_json).get("review_id", ""))
                if review_id not in reviews:
                    state = _review_state(tx, review_id) if review_id else "missing"
                    diffs.append(Difference(
                        shard, f"hold placed for transfer {hold.saga_id} under fraud review {review_id or '?'},"
                        f" which is {state}", hold.hold_id, 0, hold.points))  # fmt: skip
    held = {lot.earn_transaction_id: lot for lot in tx.review_held_lots()}
    named = {t for r in reviews.values() if r.kind is ReviewKind.EARN for t in r.subject_ids}
    for earn_tx, lot in sorted(held.items()):
        review_id = "" if earn_tx in named else _screened_to_review(tx, earn_tx)
        if review_id:
            diffs.append(Difference(
                shard, f"pending credit held for fraud review {review_id}, which is {_review_state(tx, review_id)}",
                f"{earn_tx} (lot {lot.lot_id})", 0, lot.remaining_points))  # fmt: skip
    for review_id, review in sorted(reviews.items()):
        if review.kind is ReviewKind.EARN:
            for earn_tx in review.subject_ids:
                if earn_tx in held:
                    continue
                credit = tx.lot_of_transaction(earn_tx, review.member_id)
                # No points left (a return took the credit back) is fine: the review still waits.
                if credit is None or credit.remaining_points > 0:
                    state = "missing" if credit is None else "no longer held for review"
                    diffs.append(Difference(shard, f"open fraud review's pending credit {earn_tx} is {state}",
                                            review_id, review.points, 0))  # fmt: skip
            continue
        owner = review.transfer_id if review.kind is ReviewKind.TRANSFER else review_id
        for hold_id in review.subject_ids:
            subject = holds.get(hold_id)
            if subject is None or subject.saga_id != owner:
                found = tx.get_hold(hold_id) if subject is None else None
                if subject is not None:
                    state = f"owned by {subject.saga_id or 'its caller'}"
                else:
                    state = "missing" if found is None else found.status.value
                diffs.append(Difference(shard, f"open fraud review's hold {hold_id} is {state}", review_id,
                                        review.points, 0 if subject is None else subject.points))  # fmt: skip
    return diffs


def _stranded_on_merged(merged: set[str], shard: int, balances: dict[str, int]) -> list[Difference]:
    """Points left on a member merged away (a posting that raced the merge) belong to no one."""
    return [
        Difference(shard, "points left on a merged member", account, 0, balance)
        for account, balance in sorted(balances.items())
        if balance and account.startswith(("member:", "pending:", "debt:")) and account.split(":")[1] in merged
    ]


async def _stranded(
    store: LedgerStore, merged: set[str], balances: list[dict[str, int]], on_the_way: set[str]
) -> list[Difference]:
    """Points on members merged away, but not those of a merge or transfer on its way: a member
    an open saga names (one open too long is reported as such), and points still there after
    a moment's settling (a merge marked but not yet moved, a transfer credited to a member
    merged meanwhile and not yet swept on), looked at again up to CUT_ATTEMPTS times."""
    found = [d for shard, b in enumerate(balances) for d in _stranded_on_merged(merged - on_the_way, shard, b)]
    for _ in range(CUT_ATTEMPTS - 1):
        if not found:
            break
        await asyncio.sleep(SETTLE_SECONDS)
        on_the_way = set().union(*[await store.read(s, lambda tx: _on_the_way(tx.open_sagas()))
                                   for s in range(store.shard_count)])  # fmt: skip
        again: list[Difference] = []
        for shard in sorted({d.shard for d in found}):
            read = functools.partial(_accounts, [d.subject for d in found if d.shard == shard])
            again += _stranded_on_merged(merged - on_the_way, shard, await store.read(shard, read))
        found = again
    return found


def account_class(account: str) -> str:
    """Groups accounts for totals: members' points together, system and funding ones by name."""
    parts = account.split(":")
    if parts[0] in ("member", "pending", "debt"):
        return f"{parts[0]}:{parts[-1]}"
    return account


async def reconcile(
    store: LedgerStore, now: datetime | None = None, *, saga_grace: timedelta = SAGA_GRACE
) -> ReconcileReport:
    report = ReconcileReport(shards=store.shard_count)
    now = now or datetime.now(UTC)
    merged = {source for source, _target in await store.read_directory(lambda d: d.merged_members())}
    balances: list[dict[str, int]] = []
    open_sagas = 0
    on_the_way: set[str] = set()
    for shard in range(store.shard_count):
        found = await store.scan(shard, functools.partial(_check_shard, shard, now, saga_grace))
        report.differences.extend(found.differences)
        report.overdue_holds += [(shard, hold_id) for hold_id in found.overdue]
        report.held_points += found.held
        report.unchecked += [u for u in found.unchecked if u not in report.unchecked]
        report.accounts += len(found.balances)
        balances.append(found.balances)
        open_sagas += found.open_sagas
        on_the_way |= found.on_the_way
    report.differences.extend(await _stranded(store, merged, balances, on_the_way))
    totals = _totals(balances)
    for attempt in range(CUT_ATTEMPTS):
        if not _across_shards(totals, strict=True):
            break
        if attempt:
            await asyncio.sleep(SETTLE_SECONDS)  # sagas on their way land meanwhile
        again = [await store.read(shard, _balances_and_sagas) for shard in range(store.shard_count)]
        totals, open_sagas = _totals([b for b, _ in again]), sum(n for _, n in again)
    across = _across_shards(totals, strict=not open_sagas)
    if len(across) < len(_across_shards(totals, strict=True)):
        report.unchecked.append(f"transit not checked: {open_sagas} sagas were on their way through it")
    report.differences.extend(across)
    report.totals_by_account_class = dict(sorted(totals.items()))
    return report


def _accounts(names: list[str], tx: ShardTx) -> dict[str, int]:
    return {row.account: row.balance for row in tx.get_accounts(names)}


def _balances_and_sagas(tx: ShardTx) -> tuple[dict[str, int], int]:
    return {row.account: row.balance for row in tx.list_accounts()}, len(tx.open_sagas())


def _totals(balances: list[dict[str, int]]) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for shard in balances:
        for account, balance in shard.items():
            totals[account_class(account)] += balance
    return dict(totals)


def _across_shards(totals: dict[str, int], *, strict: bool) -> list[Difference]:
    """Each unit's accounts sum to zero, and (`strict`: no saga on its way) transit is empty.
    Per unit: the ledger never converts between units, and a leg posted in the wrong one
    balances the other's in a grand total."""
    found = []
    by_unit: dict[str, int] = defaultdict(int)
    for name, total in totals.items():
        by_unit[name.rpartition(":")[2]] += total
    for unit, total in sorted(by_unit.items()):
        if total:
            found.append(Difference(-1, f"the {unit} accounts together do not sum to zero", unit, 0, total))
    for name, total in sorted(totals.items()):
        if strict and name.startswith("system:transit:") and total != 0:
            found.append(Difference(-1, "transit account not empty", name, 0, total))
    return found
