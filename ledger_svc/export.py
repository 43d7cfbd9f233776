"""Finance export: a period's opening balance, movements by kind and closing balance per
account class and unit, straight from the journal.

Member accounts are summed into one class per unit (members:points, pending:points, debt:
points), which is the outstanding liability; funding and system accounts stay separate, so
the file answers "how many points are outstanding and who funded them".
"""

from __future__ import annotations

import csv
import functools
from collections import defaultdict
from datetime import datetime
from typing import TextIO

from ledger_svc.domain import TxKind
from ledger_svc.reconcile import account_class
from ledger_svc.store.base import LedgerStore, ShardTx

KINDS = [k.value for k in TxKind]


def _collect(
    start: datetime, end: datetime, tx: ShardTx
) -> tuple[dict[str, int], dict[str, int], list[tuple[str, str, int]]]:
    return tx.sum_entries_before(start), tx.sum_entries_before(end), tx.movements_between(start, end)


async def export_csv(store: LedgerStore, start: datetime, end: datetime, out: TextIO) -> int:
    """Writes the CSV; returns the number of rows."""
    opening: dict[str, int] = defaultdict(int)
    closing: dict[str, int] = defaultdict(int)
    moves: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for shard in range(store.shard_count):
        before, until_end, movements = await store.scan(shard, functools.partial(_collect, start, end))
        for account, points in before.items():
            opening[account_class(account)] += points
        for account, points in until_end.items():
            closing[account_class(account)] += points
        for account, kind, points in movements:
            moves[account_class(account)][kind] += points
    writer = csv.writer(out)
    writer.writerow(["unit", "account", "opening_points", *[k.lower() + "_points" for k in KINDS], "closing_points"])
    rows = 0
    for name in sorted(set(opening) | set(closing) | set(moves)):
        unit = name.rsplit(":", 1)[-1]
        writer.writerow([unit, name, opening[name], *[moves[name][k] for k in KINDS], closing[name]])
        rows += 1
    return rows
