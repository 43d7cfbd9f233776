"""What gamification retention costs and saves, printed as figures; never a pass/fail.

Fills a gamification store with purchases spread over `--days` (each counted through
`GameStore.apply_event`, as the consumer does, under a program with a distinct-store
achievement, a three-week streak and a monthly challenge reused every month), then, in one
process:
  * counting a purchase (apply_event) on the full store, p50/p99;
  * the first retention pass (`GameStore.forget`, 35-day retention, `final_after_days` 30):
    elapsed, rows forgotten, file size before and after a VACUUM;
  * counting while that pass runs in another thread, p50/p99 (each slice is its own
    transaction, so a count waits for one slice at most);
  * a second pass the next day (the steady state: a day of rows).
The baseline is the same count on the same store before the pass.

    python -m benchmarks.game_retention_bench [--purchases 200000] [--members 20000] [--days 400]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rules_svc.game_engine import ProgramHistory, PurchaseFact
from rules_svc.game_store import GameStore
from rules_svc.program import Program, load_program

START = datetime(2025, 11, 1, tzinfo=UTC)
RETENTION = timedelta(days=35)
STORES = [f"S-{n:03d}" for n in range(50)]


def _month(index: int) -> datetime:
    return datetime(START.year + (START.month - 1 + index) // 12, (START.month - 1 + index) % 12 + 1, 1, tzinfo=UTC)


def _version(month: int) -> Program:
    """The version for one month: the challenge id is reused with that month's window."""
    stores = "\n".join(f"  - {{id: {s}, region: FI, timezone: Europe/Helsinki}}" for s in STORES)
    return load_program(f"""
program: bench
default_timezone: Europe/Helsinki
units: [points]
channels: [pos]
stores:
{stores}
base_rates: [{{currency: EUR, unit: points, points: 1, per_minor: 100}}]
gamification:
  final_after_days: 30
  achievements:
    - {{id: stores3, name: Three stores, distinct: store, count: 3, reward: {{points: 50}}}}
  streaks:
    - {{id: weekly3, name: Three weeks, weeks: 3, reward: {{points: 300}}}}
  challenges:
    - {{id: monthly, name: Five a month, starts: '{_month(month).isoformat()}',
       ends: '{_month(month + 1).isoformat()}', purchases: 5, reward: {{points: 100}}}}
""")


class Versions:
    """A version per month, as marketing would publish them."""

    def __init__(self, days: int) -> None:
        self.programs = [_version(m) for m in range(days // 28 + 3)]
        self.history = ProgramHistory.of(self.programs)

    def at(self, when: datetime) -> Program:
        return self.programs[(when.year - START.year) * 12 + when.month - START.month]


def _fact(n: int, members: int, at: datetime, rng: random.Random) -> PurchaseFact:
    member = f"m{rng.randrange(members):06d}"
    return PurchaseFact(f"ev-{n}", member, f"p-{n}", "pos", rng.choice(STORES), 2_500, "EUR", at)


def _count_latencies(store: GameStore, versions: Versions, facts: list[PurchaseFact], at: datetime) -> list[float]:
    out = []
    for f in facts:
        t = time.perf_counter()
        store.apply_event(versions.at(f.receipt_time), f, versions.history, at)
        out.append(time.perf_counter() - t)
    return out


def _describe(name: str, latencies: list[float]) -> None:
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(f"{name:<44} n={len(ms):>6}  p50 {statistics.median(ms):6.3f} ms  p99 {p99:6.3f} ms  max {ms[-1]:7.2f} ms")


def _rows(store: GameStore) -> str:
    db = store._db
    return ", ".join(f"{t} {db.execute(f'SELECT count(*) FROM {t}').fetchone()[0]:,}"
                     for t in ("game_events", "game_counted", "experiment_purchases"))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--purchases", type=int, default=200_000)
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--days", type=int, default=400)
    args = parser.parse_args()
    versions = Versions(args.days)
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gamification.db"
        store = GameStore(path)
        step = timedelta(days=args.days) / args.purchases
        t0 = time.perf_counter()
        for n in range(args.purchases):
            at = START + step * n
            store.apply_event(versions.at(at), _fact(n, args.members, at, rng), versions.history, at)
        end = START + timedelta(days=args.days)
        print(f"filled {args.purchases:,} purchases of {args.members:,} members over {args.days} days"
              f" in {time.perf_counter() - t0:.1f} s: {_rows(store)}; {path.stat().st_size / 1e6:.1f} MB")  # fmt: skip

        extra = iter(range(args.purchases, 10 * args.purchases))
        baseline = [_fact(next(extra), args.members, end, rng) for _ in range(3_000)]
        _describe("count a purchase (baseline, no pass running)", _count_latencies(store, versions, baseline, end))

        during: list[float] = []
        done = threading.Event()

        def count_meanwhile() -> None:
            while not done.is_set():
                f = _fact(next(extra), args.members, end, rng)
                during.extend(_count_latencies(store, versions, [f], end))

        counter = threading.Thread(target=count_meanwhile)
        counter.start()
        t0 = time.perf_counter()
        forgotten = store.forget("bench", versions.history, RETENTION)
        elapsed = time.perf_counter() - t0
        done.set()
        counter.join()
        total = forgotten.events + forgotten.counted + forgotten.experiment_purchases
        print(f"first retention pass: {elapsed:.2f} s, {total:,} rows forgotten ({total / elapsed:,.0f} rows/s):"
              f" {forgotten}")  # fmt: skip
        _describe("count a purchase while the pass runs", during)
        store._db.execute("VACUUM")
        print(f"after: {_rows(store)}; {path.stat().st_size / 1e6:.1f} MB after VACUUM")

        day = [
            _fact(next(extra), args.members, end + timedelta(days=1), rng) for _ in range(args.purchases // args.days)
        ]
        _count_latencies(store, versions, day, end + timedelta(days=1))
        t0 = time.perf_counter()
        forgotten = store.forget("bench", versions.history, RETENTION)
        print(f"next day's pass: {time.perf_counter() - t0:.3f} s, {forgotten}")
        store.close()


if __name__ == "__main__":
    main()
