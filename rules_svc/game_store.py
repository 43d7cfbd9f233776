"""Gamification progress on disk (SQLite in the rules data directory).

One transaction per purchase event: the event id is recorded with the progress it caused and
the rewards it earned, so a redelivered event changes nothing, and a reward is written before
anyone tries to pay it (the worker pays PENDING rewards until the ledger confirms).

What each purchase gave each item is kept (game_counted), so a purchase taken back (fully
returned, or its fraud review rejected) takes back that progress, in one transaction with its
event id too. An award it no longer earns goes REVOKE, then REVOKED once the ledger has taken
its points back (the worker drives that); an award earned again afterwards gets a new key
(`#2`, `#3`...), since the ledger posts one key once. A withdrawal can also earn: a returned
week that splits a paid streak in two runs pays the run left without an award (PENDING, posted
by the worker's retry loop).

A member merged into another hands its progress over once (`merge`, game_merge.py) and is
kept as merged (game_merges), so its events handled later count for the member it went to.

Reward statuses: PENDING, PAID, REFUSED:<code> (the ledger will never post it), REVOKE,
REVOKED.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rules_svc.game_engine import (
    WEEK,
    Award,
    Counted,
    ItemState,
    ProgramHistory,
    PurchaseFact,
    Revoked,
    apply,
    epoch_us,
    repay_runs,
    week_of,
    withdraw,
)
from rules_svc.game_merge import merge_progress
from rules_svc.program import Program

SCHEMA = """
CREATE TABLE IF NOT EXISTS game_events (
  event_id TEXT PRIMARY KEY, member_id TEXT NOT NULL, occurred_us INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS game_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS game_state (
  program TEXT NOT NULL, member_id TEXT NOT NULL, item_id TEXT NOT NULL, state TEXT NOT NULL,
  PRIMARY KEY (program, member_id, item_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS game_joins (
  program TEXT NOT NULL, challenge_id TEXT NOT NULL, member_id TEXT NOT NULL, joined_us INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (program, challenge_id, member_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS game_board (
  program TEXT NOT NULL, challenge_id TEXT NOT NULL, member_id TEXT NOT NULL, progress INTEGER NOT NULL,
  completed_us INTEGER, period TEXT NOT NULL DEFAULT '', PRIMARY KEY (program, challenge_id, member_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS game_board_rank ON game_board (program, challenge_id, progress DESC, completed_us);
CREATE TABLE IF NOT EXISTS game_rewards (
  reward_key TEXT PRIMARY KEY, program TEXT NOT NULL, member_id TEXT NOT NULL, item_id TEXT NOT NULL,
  name TEXT NOT NULL, points INTEGER NOT NULL, unit TEXT NOT NULL, status TEXT NOT NULL,
  transaction_id TEXT NOT NULL DEFAULT '') WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS game_rewards_pending ON game_rewards (status, member_id);
CREATE TABLE IF NOT EXISTS game_counted (
  program TEXT NOT NULL, member_id TEXT NOT NULL, purchase_id TEXT NOT NULL, item_id TEXT NOT NULL,
  value TEXT NOT NULL, period TEXT NOT NULL, counts INTEGER NOT NULL, receipt_us INTEGER NOT NULL,
  PRIMARY KEY (program, member_id, purchase_id, item_id, value)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS experiment_exposures (
  program TEXT NOT NULL, experiment_id TEXT NOT NULL, salt TEXT NOT NULL, member_id TEXT NOT NULL,
  arm TEXT NOT NULL, purchases INTEGER NOT NULL, points INTEGER NOT NULL,
  PRIMARY KEY (program, experiment_id, salt, member_id, arm)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS experiment_purchases (
  program TEXT NOT NULL, member_id TEXT NOT NULL, purchase_id TEXT NOT NULL, experiment_id TEXT NOT NULL,
  salt TEXT NOT NULL, arm TEXT NOT NULL, points INTEGER NOT NULL, receipt_us INTEGER NOT NULL,
  PRIMARY KEY (program, member_id, purchase_id, experiment_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS game_merges (
  program TEXT NOT NULL, source_member_id TEXT NOT NULL, target_member_id TEXT NOT NULL, merged_us INTEGER NOT NULL,
  PRIMARY KEY (source_member_id, program)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS game_merges_into ON game_merges (target_member_id);
"""
# After the columns they index exist (game_events.occurred_us came with retention).
INDEXES = """
CREATE INDEX IF NOT EXISTS game_events_age ON game_events (occurred_us);
CREATE INDEX IF NOT EXISTS game_counted_age ON game_counted (program, receipt_us);
CREATE INDEX IF NOT EXISTS experiment_purchases_age ON experiment_purchases (program, receipt_us);
"""
FORGOTTEN = "events_forgotten_before_us"  # game_meta: events that occurred before it may have been forgotten
FUTURE_TOLERANCE = timedelta(days=1)  # how far past this clock an event may move retention's "now"
FORGET_SLICE = 2_000  # rows a retention transaction deletes, so counting waits on none for long


log = logging.getLogger(__name__)
REVOKING = ("REVOKE", "REVOKED")
# The member and every member merged into it, however many merges back (a CTE named `family`).
FAMILY = ("WITH RECURSIVE family(member_id) AS (SELECT ? UNION SELECT m.source_member_id FROM game_merges m"
          " JOIN family f ON m.target_member_id = f.member_id)")  # fmt: skip
MERGE_HOPS = 64  # merges followed from a member to the one its progress went to
COUNTED_PER_PURCHASE = 1  # user_version from which progress before per-purchase rows is kept as rows


def _let_counting_in(since: float) -> None:
    """Between retention slices, as long as the slice took: threading.Lock is not fair, so the
    thread that just released it would take it straight back, and a count waiting on it would
    wait for the whole pass. Counting keeps half the store's time while a pass runs."""
    time.sleep(max(0.001, time.monotonic() - since))


def _week_of_run(period: str) -> int | None:
    """The first week of a streak award's run (`run-<week>`), None for any other period."""
    digits = period.removeprefix("run-")
    return int(digits) if digits != period and digits.lstrip("-").isdigit() else None


class PastRetention(Exception):
    """An event that occurred before the time retention forgot events from: whether it was
    handled then cannot be told, so it is not handled again."""

    def __init__(self, event_id: str, occurred_us: int, forgotten_before_us: int) -> None:
        super().__init__(f"event {event_id} occurred at {occurred_us} us, before {forgotten_before_us} us:"
                         " retention has forgotten whether it was handled")  # fmt: skip
        self.event_id = event_id


@dataclass(frozen=True, slots=True)
class Reward:
    key: str
    member_id: str
    item_id: str
    name: str
    points: int
    unit: str


@dataclass(frozen=True, slots=True)
class Forgotten:
    """What one retention pass deleted (game_store.GameStore.forget)."""

    events: int
    counted: int
    experiment_purchases: int


@dataclass(frozen=True, slots=True)
class BoardRow:
    member_id: str
    progress: int
    completed_us: int | None


class GameStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        if self._db.execute("PRAGMA user_version").fetchone()[0] < COUNTED_PER_PURCHASE:
            self._keep_progress_of_before()
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(game_board)")}
        if "period" not in columns:  # a store written before challenge windows were told apart
            self._db.execute("ALTER TABLE game_board ADD COLUMN period TEXT NOT NULL DEFAULT ''")
        if "joined_us" not in {row[1] for row in self._db.execute("PRAGMA table_info(game_joins)")}:
            # joins recorded before their time was kept count for every purchase, as they did
            self._db.execute("ALTER TABLE game_joins ADD COLUMN joined_us INTEGER NOT NULL DEFAULT 0")
        self._date_events_of_before()
        self._db.executescript(INDEXES)
        self._move_experiment_members()
        self._lock = threading.Lock()

    def _keep_progress_of_before(self) -> None:
        """A store written before purchases' progress was kept per purchase: the distinct values
        and streak weeks counted so far that no kept row gives are kept as given by no purchase
        (purchase id ''), which no withdrawal takes back, so returning a later purchase that
        gave the same value or week leaves them (a streak stored before its weeks were kept has
        them from its run). Challenge counts need nothing: a withdrawal takes back only its own
        place. Rewards the ledger refused for a key past its 128 characters go back to PENDING:
        they are now sent as a digest. Done once (user_version), in one transaction."""
        with self._immediate() as c:
            for program, member_id, item_id, body in c.execute("SELECT * FROM game_state").fetchall():
                state = json.loads(body)
                weeks = state.get("weeks") or []
                if not weeks and state.get("run", 0) > 0:
                    weeks = list(range(state["last_week"] - state["run"] + 1, state["last_week"] + 1))
                values = [(v, "") for v in state.get("seen", [])] + [(str(w), WEEK) for w in weeks]
                c.executemany(
                    "INSERT INTO game_counted SELECT ?,?,'',?,?,?,0,0 WHERE NOT EXISTS (SELECT 1 FROM game_counted"
                    " WHERE program=? AND member_id=? AND item_id=? AND value=? AND period=?)",
                    [(program, member_id, item_id, v, kind, program, member_id, item_id, v, kind) for v, kind in values],
                )  # fmt: skip
            c.execute("UPDATE game_rewards SET status='PENDING' WHERE status='REFUSED:INVALID_ARGUMENT'"
                      " AND length(reward_key) > 128")  # fmt: skip
            c.execute(f"PRAGMA user_version = {COUNTED_PER_PURCHASE}")

    def _date_events_of_before(self) -> None:
        """A store written before retention kept no time with an event id: those events count as
        handled now, so they are forgotten once retention has passed from the upgrade, and a
        replay of one before then still finds it."""
        if "occurred_us" in {row[1] for row in self._db.execute("PRAGMA table_info(game_events)")}:
            return
        with self._immediate() as c:
            c.execute("ALTER TABLE game_events ADD COLUMN occurred_us INTEGER NOT NULL DEFAULT 0")
            c.execute("UPDATE game_events SET occurred_us=?", (epoch_us(datetime.now(UTC)),))

    def _move_experiment_members(self) -> None:
        """A store written before exposures were kept per arm and salt: its rows (one per member,
        in the arm of its first purchase) move over with an unknown salt, which reports count."""
        c = self._db
        if not c.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='experiment_members'").fetchone():
            return
        with self._immediate():
            c.execute("INSERT OR IGNORE INTO experiment_exposures SELECT program, experiment_id, '', member_id, arm,"
                      " purchases, points FROM experiment_members")  # fmt: skip
            c.execute("DROP TABLE experiment_members")

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        c = self._db
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    def apply_event(self, program: Program, fact: PurchaseFact, history: ProgramHistory | None = None,
                    occurred_at: datetime | None = None) -> list[Award] | None:  # fmt: skip
        """Counts the purchase once (by event id) under `program`, the version in effect at its
        receipt time, and `history`, what all versions say (game_engine.apply); returns the
        awards it earned (already stored), or None when the event was counted before.
        `occurred_at` is when the ledger wrote the event (now when not given); an event from
        before what retention forgot is refused (PastRetention), as it may have been counted.
        A purchase of a member merged away (handled after the merge: the two members' events
        are not ordered) counts for the member its progress went to; its experiment arm's
        figures stay with the member who made it."""
        name = program.program
        with self._lock, self._immediate() as c:
            if not self._new_event(fact.event_id, fact.member_id, occurred_at):
                return None  # counted before: nothing written
            member = self._heir(fact.member_id)
            states = self._states(name, member)
            counted: list[Counted] = []
            awards = apply(program, states, self._joined(name, member), replace(fact, member_id=member), history,
                           counted)  # fmt: skip
            self._save_states(program, member, states)
            receipt_us = epoch_us(fact.receipt_time)
            c.executemany(
                "INSERT OR IGNORE INTO game_counted VALUES (?,?,?,?,?,?,?,?)",
                [(name, member, fact.purchase_id, x.item_id, x.value, x.period, int(x.counts), receipt_us)
                 for x in counted],
            )  # fmt: skip
            self._add_rewards(name, member, awards)
            salts = {e.id: e.salt for e in program.experiments}
            points = fact.points(program.units[0])
            for experiment_id, arm in fact.experiment_arms:
                salt = salts.get(experiment_id, "")
                self._expose(name, experiment_id, salt, fact.member_id, arm, 1, points)
                c.execute("INSERT OR IGNORE INTO experiment_purchases VALUES (?,?,?,?,?,?,?,?)",
                          (name, fact.member_id, fact.purchase_id, experiment_id, salt, arm, points, receipt_us))  # fmt: skip
        return awards

    def _add_rewards(self, program: str, member_id: str, awards: list[Award]) -> None:
        self._db.executemany(
            "INSERT OR IGNORE INTO game_rewards VALUES (?,?,?,?,?,?,?,'PENDING','')",
            [(self._fresh_key(a.key(program, member_id)), program, member_id, a.item_id, a.name, a.points, a.unit)
             for a in awards],
        )  # fmt: skip

    def _heir(self, member_id: str) -> str:
        """The member whose progress is this member's: itself, or the one its merges lead to."""
        for _ in range(MERGE_HOPS):
            row = self._db.execute("SELECT target_member_id FROM game_merges WHERE source_member_id=? LIMIT 1",
                                   (member_id,)).fetchone()  # fmt: skip
            if row is None:
                return member_id
            member_id = row[0]
        raise RuntimeError(f"more than {MERGE_HOPS} merges from member {member_id}")

    def merge(self, program: Program, source: str, target: str, history: ProgramHistory | None = None,
              at: datetime | None = None) -> list[Award] | None:  # fmt: skip
        """Makes the source member's progress the target's (game_merge.merge_progress), once per
        source: the ledger announces a merge on both members, once per unit, and a redelivery
        or a later sweep of the source (a return's points passed on) names the same source.
        Returns the awards the union earns (stored PENDING on the target), or None when the
        merge was handled before. Counted purchases, joins (the earlier join's time) and
        leaderboard rows go to the target; experiment exposures stay with the member who was
        exposed. The merge is kept (game_merges, never forgotten: one row per merge), so an
        event of the source handled later (a purchase, a return) finds the target, down a
        chain of merges. `at`: when the ledger merged them (now when not given)."""
        name = program.program
        with self._lock, self._immediate() as c:
            if c.execute("SELECT 1 FROM game_merges WHERE program=? AND source_member_id=?", (name, source)).fetchone():
                return None
            heir = self._heir(target)
            if heir == source:
                raise ValueError(f"member {source} cannot be merged into {target}: {target} was merged into it")
            at_us = epoch_us(at or datetime.now(UTC))
            c.execute("INSERT INTO game_merges VALUES (?,?,?,?)", (name, source, target, at_us))
            states = self._states(name, heir)
            awards = merge_progress(program, self._states(name, source), states, at_us, history)
            moved = (heir, name, source)
            c.execute("DELETE FROM game_state WHERE program=? AND member_id=?", (name, source))
            for table in ("game_counted", "game_board"):  # the target's row wins a clash (a value both gave)
                c.execute(f"UPDATE OR IGNORE {table} SET member_id=? WHERE program=? AND member_id=?", moved)
                c.execute(f"DELETE FROM {table} WHERE program=? AND member_id=?", (name, source))
            c.execute("INSERT INTO game_joins SELECT program, challenge_id, ?, joined_us FROM game_joins"
                      " WHERE program=? AND member_id=? ON CONFLICT (program, challenge_id, member_id)"
                      " DO UPDATE SET joined_us=min(joined_us, excluded.joined_us)", moved)  # fmt: skip
            c.execute("DELETE FROM game_joins WHERE program=? AND member_id=?", (name, source))
            self._save_states(program, heir, states)
            self._add_rewards(name, heir, awards)
        return awards

    def _new_event(self, event_id: str, member_id: str, occurred_at: datetime | None) -> bool:
        """Records the event as handled, in the caller's transaction; False when it was before."""
        c = self._db
        if c.execute("SELECT 1 FROM game_events WHERE event_id=?", (event_id,)).fetchone():
            return False
        occurred_us = epoch_us(occurred_at or datetime.now(UTC))
        row = c.execute("SELECT value FROM game_meta WHERE key=?", (FORGOTTEN,)).fetchone()
        if row is not None and occurred_us < row[0]:
            raise PastRetention(event_id, occurred_us, row[0])
        c.execute("INSERT INTO game_events VALUES (?,?,?)", (event_id, member_id, occurred_us))
        return True

    def _save_states(self, program: Program, member_id: str, states: dict[str, ItemState], *,
                     withdrawn: Collection[str] = ()) -> None:  # fmt: skip
        name, c = program.program, self._db
        c.executemany(
            "INSERT OR REPLACE INTO game_state VALUES (?,?,?,?)",
            [(name, member_id, item, json.dumps(asdict(st))) for item, st in states.items()],
        )
        for ch in program.gamification.challenges:
            st = states.get(ch.id)
            if st is not None and st.count:
                c.execute("INSERT OR REPLACE INTO game_board VALUES (?,?,?,?,?,?)", (
                    name, ch.id, member_id, st.count, st.last_completed_us or None, st.period))  # fmt: skip
            elif st is not None and ch.id in withdrawn:  # every place withdrawn: off the board
                c.execute("DELETE FROM game_board WHERE program=? AND challenge_id=? AND member_id=?",
                          (name, ch.id, member_id))  # fmt: skip

    def _fresh_key(self, base: str) -> str:
        """The award's key, or for an award earned again after its first was revoked the next
        `base#n` no revoked reward holds (the first earning keeps the bare key, as always)."""
        key, n = base, 1
        while (row := self._db.execute("SELECT status FROM game_rewards WHERE reward_key=?", (key,)).fetchone()) \
                and row[0] in REVOKING:  # fmt: skip
            n += 1
            key = f"{base}#{n}"
        return key

    def forget(self, program: str, history: ProgramHistory, retention: timedelta,
               slice_rows: int = FORGET_SLICE) -> Forgotten:  # fmt: skip
        """Retention, so the store does not grow with every purchase ever made. It runs on event
        time (the newest event handled is now), as counting does, so what it keeps does not
        depend on this process's clock agreeing with the ledger's.

        Event ids are kept `retention` (the ledger's key retention: replays come from a stream
        that keeps less), and events that occurred before then are refused from now on
        (PastRetention), so forgetting one never counts it twice. What a purchase gave is kept
        until it is final (`final_after_days`, the longest any version gives) and no event that
        could take it back is still accepted (`retention` again); then an achievement's values
        are kept as given by no purchase, up to the count any version asks for (more can never
        be needed to refill it), and a streak's weeks until they are older than any purchase
        that can still be taken back. A challenge's places go once every window of their run
        (`ProgramHistory.run_ends_us`) ended before that, since a withdrawal reads the run's
        places, stand-ins included. Experiment purchases go too (their arm keeps its figures).
        Each slice is a transaction of its own: counting waits for one slice at most.

        An event dated more than FUTURE_TOLERANCE past this process's clock does not move "now"
        (one event from a clock gone wrong would otherwise have every later event refused). With
        no version to say how long purchases stay open (`max_final_after_days` 0), only event ids
        are forgotten."""
        with self._lock:
            newest = self._db.execute("SELECT max(occurred_us) FROM game_events").fetchone()[0]
        if not newest:
            return Forgotten(0, 0, 0)
        now = datetime.fromtimestamp(newest / 1_000_000, UTC)
        if now > (latest := datetime.now(UTC) + FUTURE_TOLERANCE):
            log.warning("the newest event counted is dated %s, past this clock: retention runs at %s", now, latest)
            now = latest
        events_before = epoch_us(now - retention)
        final = now - retention - timedelta(days=history.max_final_after_days)
        final_before = epoch_us(final)
        # A week (as the program's zone has it) older than the UTC week of `final`, less one
        oldest_week = week_of(final.astimezone(UTC).date()) - 1
        with self._lock, self._immediate() as c:
            c.execute("INSERT INTO game_meta VALUES (?,?) ON CONFLICT (key) DO UPDATE"
                      " SET value=max(value, excluded.value)", (FORGOTTEN, events_before))  # fmt: skip
        events = self._delete_slices("game_events", "event_id", "occurred_us < ?", (events_before,), slice_rows)
        if history.max_final_after_days < 1:
            return Forgotten(events, 0, 0)
        counted = self._forget_counted(program, history, final_before, oldest_week, slice_rows)
        counted += self._delete_slices(  # rows given by no purchase have receipt_us 0 (the index finds them)
            "game_counted", "program, member_id, purchase_id, item_id, value",
            "program=? AND receipt_us=0 AND purchase_id='' AND period=? AND CAST(value AS INTEGER) < ?",
            (program, WEEK, oldest_week), slice_rows,
        )  # fmt: skip
        experiments = self._delete_slices(
            "experiment_purchases", "program, member_id, purchase_id, experiment_id",
            "program=? AND receipt_us < ?", (program, final_before), slice_rows,
        )  # fmt: skip
        return Forgotten(events, counted, experiments)

    def _delete_slices(self, table: str, key: str, where: str, args: tuple[object, ...], slice_rows: int) -> int:
        total = 0
        while True:
            started = time.monotonic()
            with self._lock, self._immediate() as c:
                n = c.execute(f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} WHERE {where} LIMIT ?)",
                              (*args, slice_rows)).rowcount  # fmt: skip
            total += n
            if n < slice_rows:
                return total
            _let_counting_in(started)

    def _forget_counted(self, program: str, history: ProgramHistory, final_before: int, oldest_week: int,
                        slice_rows: int) -> int:  # fmt: skip
        """game_counted rows of purchases made before `final_before` (forget's rules), a slice at
        a time in (receipt, key) order: places a run still needs stay, and are passed over."""
        after: tuple[object, ...] = (1, "", "", "", "")
        forgotten = 0
        run_ends: dict[tuple[str, str], int] = {}
        while True:
            started = time.monotonic()
            with self._lock, self._immediate() as c:
                rows = c.execute(  # purchases' rows only: those given by no purchase stay (receipt 0)
                    "SELECT receipt_us, member_id, purchase_id, item_id, value, period FROM game_counted"
                    " WHERE program=? AND receipt_us >= ? AND receipt_us < ? AND purchase_id!=''"
                    " AND (receipt_us, member_id, purchase_id, item_id, value) > (?,?,?,?,?)"
                    " ORDER BY receipt_us, member_id, purchase_id, item_id, value LIMIT ?",
                    (program, after[0], final_before, *after, slice_rows),
                ).fetchall()
                gone = []
                for _receipt_us, member_id, purchase_id, item_id, value, period in rows:
                    if period not in ("", WEEK):
                        if (item_id, period) not in run_ends:
                            run_ends[(item_id, period)] = history.run_ends_us(item_id, period)
                        if run_ends[(item_id, period)] >= final_before:
                            continue  # a place in a run a withdrawal may still read
                    gone.append((program, member_id, purchase_id, item_id, value))
                    if period == WEEK:
                        keep = value.lstrip("-").isdigit() and int(value) >= oldest_week
                    elif period == "":
                        keep = c.execute(
                            "SELECT count(*) FROM game_counted WHERE program=? AND member_id=? AND purchase_id=''"
                            " AND item_id=? AND period=''", (program, member_id, item_id),
                        ).fetchone()[0] < history.achievement_counts.get(item_id, 0)  # fmt: skip
                    else:
                        keep = False
                    if keep:
                        c.execute("INSERT OR IGNORE INTO game_counted VALUES (?,?,'',?,?,?,0,0)",
                                  (program, member_id, item_id, value, period))  # fmt: skip
                c.executemany("DELETE FROM game_counted WHERE program=? AND member_id=? AND purchase_id=?"
                              " AND item_id=? AND value=?", gone)  # fmt: skip
            forgotten += len(gone)
            if len(rows) < slice_rows:
                return forgotten
            after = tuple(rows[-1][:5])
            _let_counting_in(started)

    def counted_receipt(self, program: str, member_id: str, purchase_id: str) -> datetime | None:
        """When the purchase was made, if gamification counted it towards an item (for the
        member its progress went to, if it was merged) or an experiment arm (the version in
        effect then says what its items were)."""
        with self._lock:
            row = self._db.execute(
                "SELECT receipt_us FROM game_counted WHERE program=?1 AND member_id=?4 AND purchase_id=?3"
                " UNION ALL SELECT receipt_us FROM experiment_purchases"
                " WHERE program=?1 AND member_id=?2 AND purchase_id=?3 LIMIT 1",
                (program, member_id, purchase_id, self._heir(member_id)),
            ).fetchone()
        return None if row is None else datetime.fromtimestamp(row[0] / 1_000_000, UTC)

    def withdraw_event(self, program: Program, event_id: str, member_id: str, purchase_id: str,
                       history: ProgramHistory | None = None, occurred_at: datetime | None = None,
                       ) -> list[str] | None:  # fmt: skip
        """Takes back what the purchase gave, once per event id (game_engine.withdraw); returns
        the keys of the rewards it revoked, or None when the event was handled before (an event
        from before what retention forgot: PastRetention, as in `apply_event`). A purchase of a
        member merged since takes back from the member its progress went to (`member_id` is
        the one who made it, as the ledger's event names it)."""
        name = program.program
        with self._lock, self._immediate() as c:
            if not self._new_event(event_id, member_id, occurred_at):
                return None  # handled before: nothing written
            maker, member_id = member_id, self._heir(member_id)
            key = (name, member_id, purchase_id)
            gone = self._counted("purchase_id=?", key)
            c.execute("DELETE FROM game_counted WHERE program=? AND member_id=? AND purchase_id=?", key)
            items = sorted({x.item_id for x in gone})
            remaining = self._counted(f"item_id IN ({','.join('?' * len(items))})", (name, member_id, *items))
            states = self._states(name, member_id)
            revoked, promoted = withdraw(program, states, gone, remaining, history)
            keys, repaid = [], []
            streaks = {s.id: s for s in program.gamification.streaks}
            for r in revoked:
                went, kept_starts = self._revoke(name, member_id, r)
                if not r.periods:  # a streak's range: the engine left its completions to us
                    state = states[r.item_id]
                    state.completions = max(0, state.completions - len(went))
                    repaid += repay_runs(streaks[r.item_id], state, r, kept_starts)
                keys += went
            self._add_rewards(name, member_id, repaid)
            self._save_states(program, member_id, states, withdrawn=items)
            self._unexpose((name, maker, purchase_id))
            c.executemany(
                "UPDATE game_counted SET counts=1 WHERE program=? AND member_id=? AND purchase_id=? AND item_id=?"
                " AND value=?",
                [(name, member_id, x.purchase_id, x.item_id, x.value) for x in promoted],
            )  # fmt: skip
        return keys

    def _counted(self, where: str, args: tuple[str, ...]) -> list[Counted]:
        rows = self._db.execute(
            "SELECT item_id, value, period, counts, purchase_id, receipt_us FROM game_counted"
            " WHERE program=? AND member_id=?"
            f" AND {where} ORDER BY receipt_us, purchase_id",
            args,
        ).fetchall()
        return [Counted(item, value, period, bool(counts), purchase, receipt_us)
                for item, value, period, counts, purchase, receipt_us in rows]  # fmt: skip

    def _revoke(self, program: str, member_id: str, revoked: Revoked) -> tuple[list[str], list[int]]:
        """Marks the award's live rewards REVOKE (one the ledger refused for good: REVOKED, there
        is nothing to take back); returns their keys, and for a streak the first weeks of the
        range's awards that stay (for `repay_runs`). A streak's range may hold several awards
        (runs a late week joined): all but `revoked.keep` go, those whose runs began outside the
        runs still long enough first, then the latest of a run holding more than one. The
        awards of members merged into this one count as its own: the progress is one."""
        rows = self._db.execute(
            f"{FAMILY} SELECT reward_key, status, member_id FROM game_rewards WHERE program=? AND item_id=?"
            f" AND member_id IN family AND status NOT IN ({','.join('?' * len(REVOKING))})",
            (member_id, program, revoked.item_id, *REVOKING),
        ).fetchall()
        periods = set(revoked.periods)
        live: list[tuple[int, str, str]] = []  # (run start, key, status)
        for key, status, earner in rows:
            base = f"{program}:{revoked.item_id}:{earner}:"
            period = key[len(base) :].split("#", 1)[0] if key.startswith(base) else None
            if period is None:
                continue
            if periods:
                if period in periods:
                    live.append((0, key, status))
                continue
            start = _week_of_run(period)
            if start is not None and revoked.first_week <= start <= revoked.last_week:
                live.append((start, key, status))
        kept_starts = []
        if periods and revoked.keep:  # merged accounts each earned one: `keep` of them stay
            live = sorted(live, key=lambda x: x[1], reverse=True)[: max(0, len(live) - revoked.keep)]
        if not periods:
            run_of = {x: next((r for r in revoked.runs if r[0] <= x[0] <= r[1]), None) for x in live}
            outside = [x for x in live if run_of[x] is None]
            firsts = {min(x for x in live if run_of[x] == r) for r in set(run_of.values()) - {None}}
            surplus = [x for x in live if x not in outside and x not in firsts]
            # A run's first award goes last: revoking it would leave the run to be paid again.
            ordered = sorted(outside, reverse=True) + sorted(surplus, reverse=True) + sorted(firsts, reverse=True)
            cut = max(0, len(live) - revoked.keep)
            live, kept_starts = ordered[:cut], [start for start, _key, _status in ordered[cut:]]
        for _start, key, status in live:
            final = status.startswith("REFUSED")
            self._db.execute("UPDATE game_rewards SET status=? WHERE reward_key=?",
                             ("REVOKED" if final else "REVOKE", key))  # fmt: skip
        return [key for _start, key, _status in live], kept_starts

    def revoking(self, member_id: str = "", limit: int = 500, after: str = "") -> list[tuple[Reward, str]]:
        """REVOKE rewards in key order, each with the ledger transaction that paid it ('' when
        not known to be paid: the worker asks the ledger by posting its key again)."""
        return self._rewards("REVOKE", member_id, limit, after)

    def revoked(self, key: str, reversal_id: str) -> bool:
        """A REVOKE reward whose points the ledger took back; False when it was settled already."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE game_rewards SET status='REVOKED', transaction_id=? WHERE reward_key=? AND status='REVOKE'",
                (reversal_id, key),
            )
        return cursor.rowcount == 1

    def _expose(self, program: str, experiment_id: str, salt: str, member_id: str, arm: str, purchases: int,
                points: int) -> None:  # fmt: skip
        self._db.execute(
            "INSERT INTO experiment_exposures VALUES (?,?,?,?,?,?,?)"
            " ON CONFLICT (program, experiment_id, salt, member_id, arm)"
            " DO UPDATE SET purchases = purchases + excluded.purchases, points = points + excluded.points",
            (program, experiment_id, salt, member_id, arm, purchases, points),
        )

    def _unexpose(self, key: tuple[str, str, str]) -> None:
        """A purchase taken back leaves its arm's figures: an arm whose offer drew purchases that
        came back would otherwise look better than it did. The member stays exposed (assigned
        and seen) with what they kept, which may be nothing."""
        c = self._db
        for experiment_id, salt, arm, points in c.execute(
            "SELECT experiment_id, salt, arm, points FROM experiment_purchases"
            " WHERE program=? AND member_id=? AND purchase_id=?",
            key,
        ).fetchall():
            self._expose(key[0], experiment_id, salt, key[1], arm, -1, -points)
        c.execute("DELETE FROM experiment_purchases WHERE program=? AND member_id=? AND purchase_id=?", key)

    def record_exposure(self, program: str, experiment_id: str, member_id: str, arm: str, purchases: int,
                        points: int, *, salt: str = "") -> None:  # fmt: skip
        """What one member did in one arm (bulk loads and tests; events go through apply_event)."""
        with self._lock:
            self._expose(program, experiment_id, salt, member_id, arm, purchases, points)

    def experiment_members(self, program: str, experiment_id: str, salt: str) -> dict[str, list[tuple[int, int]]]:
        """Per arm, each member's (purchases, points) under the experiment's current salt (a new
        salt is a new assignment, so what came before it is not counted). A member seen in two
        arms (the allocation changed under them) is left out of every arm: their purchases
        cannot be told apart by the treatment that caused them."""
        with self._lock:
            rows = self._db.execute(
                "SELECT member_id, arm, SUM(purchases), SUM(points) FROM experiment_exposures"
                " WHERE program=? AND experiment_id=? AND salt IN (?, '') GROUP BY member_id, arm",
                (program, experiment_id, salt),
            ).fetchall()
        arms_of: dict[str, int] = {}
        for member_id, *_ in rows:
            arms_of[member_id] = arms_of.get(member_id, 0) + 1
        out: dict[str, list[tuple[int, int]]] = {}
        for member_id, arm, purchases, points in rows:
            if arms_of[member_id] == 1:
                out.setdefault(arm, []).append((int(purchases), int(points)))
        return out

    def _states(self, program: str, member_id: str) -> dict[str, ItemState]:
        rows = self._db.execute(
            "SELECT item_id, state FROM game_state WHERE program=? AND member_id=?", (program, member_id)
        ).fetchall()
        return {item: ItemState(**json.loads(state)) for item, state in rows}

    def states(self, program: str, member_id: str) -> dict[str, ItemState]:
        with self._lock:
            return self._states(program, member_id)

    def join(self, program: str, challenge_id: str, member_id: str, at: datetime) -> None:
        """Joining again keeps the first join's time (a member merged away joins for the
        member its progress went to)."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO game_joins VALUES (?,?,?,?)",
                             (program, challenge_id, self._heir(member_id), epoch_us(at)))  # fmt: skip

    def _joined(self, program: str, member_id: str) -> dict[str, int]:
        """Join key -> when joined (Unix microseconds)."""
        rows = self._db.execute(
            "SELECT challenge_id, joined_us FROM game_joins WHERE program=? AND member_id=?", (program, member_id)
        ).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def joined(self, program: str, member_id: str) -> dict[str, int]:
        with self._lock:
            return self._joined(program, member_id)

    def board(self, program: str, challenge_id: str, period: str, starts_us: int, limit: int, *,
              overlapping: Collection[str] = ()) -> list[BoardRow]:  # fmt: skip
        """The challenge's window `period`, with the `overlapping` windows of its id (the same
        challenge before its dates were corrected: a member's progress stays under the window it
        began in); a row written before windows were kept counts unless it was completed before
        the window began."""
        periods = sorted({period, *overlapping})
        with self._lock:
            rows = self._db.execute(
                "SELECT member_id, progress, completed_us FROM game_board WHERE program=? AND challenge_id=?"
                f" AND (period IN ({','.join('?' * len(periods))})"
                " OR (period='' AND (completed_us IS NULL OR completed_us>=?)))"
                " ORDER BY progress DESC, completed_us IS NULL, completed_us, member_id LIMIT ?",
                (program, challenge_id, *periods, starts_us, limit),
            ).fetchall()
        return [BoardRow(*r) for r in rows]

    def pending(self, member_id: str = "", limit: int = 500, after: str = "") -> list[Reward]:
        """PENDING rewards in key order, those after the key `after` (for paging through them all)."""
        return [reward for reward, _tx in self._rewards("PENDING", member_id, limit, after)]

    def _rewards(self, status: str, member_id: str, limit: int, after: str) -> list[tuple[Reward, str]]:
        """Rewards in `status` (of one person: the member, the one it was merged into and every
        other merged into that; or all) after the key `after`, in key order, each with its
        ledger transaction."""
        with self._lock:
            heir = self._heir(member_id) if member_id else ""
            rows = self._db.execute(
                f"{FAMILY} SELECT reward_key, member_id, item_id, name, points, unit, transaction_id FROM game_rewards"
                " WHERE status=?2 AND (?1='' OR member_id IN family) AND reward_key > ?3 ORDER BY reward_key LIMIT ?4",
                (heir, status, after, limit),
            ).fetchall()
        return [(Reward(*r[:6]), r[6]) for r in rows]

    def settle(self, key: str, status: str, transaction_id: str = "") -> bool:
        """Settles a PENDING reward; False when it was settled already (two payers raced)."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE game_rewards SET status=?, transaction_id=? WHERE reward_key=? AND status='PENDING'",
                (status, transaction_id, key),
            )
        return cursor.rowcount == 1

    def reward_totals(self, program: str, member_id: str, unit: str | None = None) -> dict[str, int]:
        """Reward amounts by status, of one unit when `unit` is given: amounts of different units
        (points and tier credits) do not add up to anything a member could spend. Those of
        members merged into this one are its own: the ledger paid them to it."""
        with self._lock:
            rows = self._db.execute(
                f"{FAMILY} SELECT status, SUM(points) FROM game_rewards WHERE program=?2 AND member_id IN family"
                " AND (?3 IS NULL OR unit=?3) GROUP BY status",
                (member_id, program, unit),
            ).fetchall()
        return {status: int(total) for status, total in rows}
