"""Proves the ledger is internally consistent, from the journal up.

Checks, per shard: every transaction's entries sum to zero; every stored balance equals the
sum of its account's entries; spendable lots add up to the positive posted balance and
pending lots to the pending balance; reserved points equal the open holds; no saga is left
open; no hold is still placed past its timeout (found by a scan, not the ledger's timers, so
a timer lost or stuck shows here; the running ledger voids what this finds). Across shards:
all accounts together sum to zero, and transit is empty. The same code runs on every store.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ledger_svc.domain import member_account, pending_account
from ledger_svc.store.base import LedgerStore, ShardTx


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

    @property
    def ok(self) -> bool:
        return not self.differences


@dataclass(slots=True)
class _ShardFindings:
    differences: list[Difference]
    balances: dict[str, int]
    overdue: list[str]
    held: int


def _check_shard(shard: int, now: datetime, tx: ShardTx) -> _ShardFindings:
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
    for saga in tx.open_sagas():
        diffs.append(
            Difference(shard, f"{saga.kind} saga left open in state {saga.state.value}", saga.saga_id, 0, saga.points)
        )
    overdue = [h for h in tx.placed_holds() if not h.saga_id and h.expires_at <= now]
    for hold in overdue:
        diffs.append(Difference(shard, "hold still placed past its timeout", hold.hold_id, 0, hold.points))
    balances = {a: r.balance for a, r in accounts.items()}
    return _ShardFindings(diffs, balances, [h.hold_id for h in overdue], sum(holds.values()))


def _stranded_on_merged(merged: set[str], shard: int, balances: dict[str, int]) -> list[Difference]:
    """Points left on a member merged away (a posting that raced the merge) belong to no one."""
    return [
        Difference(shard, "points left on a merged member", account, 0, balance)
        for account, balance in sorted(balances.items())
        if balance and account.startswith(("member:", "pending:", "debt:")) and account.split(":")[1] in merged
    ]


def account_class(account: str) -> str:
    """Groups accounts for totals: members' points together, system and funding ones by name."""
    parts = account.split(":")
    if parts[0] in ("member", "pending", "debt"):
        return f"{parts[0]}:{parts[-1]}"
    return account


async def reconcile(store: LedgerStore, now: datetime | None = None) -> ReconcileReport:
    report = ReconcileReport(shards=store.shard_count)
    now = now or datetime.now(UTC)
    totals: dict[str, int] = defaultdict(int)
    merged = {source for source, _target in await store.read_directory(lambda d: d.merged_members())}
    for shard in range(store.shard_count):
        found = await store.scan(shard, functools.partial(_check_shard, shard, now))
        report.differences.extend(found.differences)
        report.overdue_holds += [(shard, hold_id) for hold_id in found.overdue]
        report.held_points += found.held
        report.differences.extend(_stranded_on_merged(merged, shard, found.balances))
        report.accounts += len(found.balances)
        for account, balance in found.balances.items():
            totals[account_class(account)] += balance
    grand_total = sum(totals.values())
    if grand_total != 0:
        report.differences.append(Difference(-1, "all accounts together do not sum to zero", "ledger", 0, grand_total))
    for name, total in totals.items():
        if name.startswith("system:transit:") and total != 0 and not any("saga" in d.kind for d in report.differences):
            report.differences.append(Difference(-1, "transit account not empty", name, 0, total))
    report.totals_by_account_class = dict(sorted(totals.items()))
    return report
