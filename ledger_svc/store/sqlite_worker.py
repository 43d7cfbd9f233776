"""Runs units of work against one SQLite connection, committing concurrent writes in groups.

Requests queue their unit of work; the executor runs every queued unit inside one
BEGIN IMMEDIATE ... COMMIT, each under its own SAVEPOINT so a unit that raises rolls back
alone. One commit then covers the whole group.

Two executors share that logic:
* `LoopExecutor` runs groups on the event loop itself. With synchronous=NORMAL a commit does
  not fsync, so a group is pure CPU work, and running it on the loop avoids handing every unit
  to another thread and back (the GIL makes those hand-offs cost more than the SQL). Default.
* `ThreadExecutor` runs groups on a dedicated thread; for synchronous=FULL/EXTRA, where a
  commit waits on fsync and must not block the loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ledger_svc.store.base import StoreClosed

T = TypeVar("T")
log = logging.getLogger(__name__)

MAX_GROUP = 512
Outcome = tuple[bool, Any]  # (ok, value or exception)


def connect(
    path: Path, synchronous: str, *, readonly: bool = False, autocheckpoint: bool = True, cache_kib: int = 65536
) -> sqlite3.Connection:
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA busy_timeout=30000")
    if not readonly:
        conn.execute("PRAGMA journal_mode=WAL")
    if not autocheckpoint:
        conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


def run_group(conn: sqlite3.Connection, tx: Any, works: list[Callable[[Any], Any]]) -> list[Outcome]:
    """One transaction for many units; each unit's failure is rolled back to its savepoint.

    A lone unit needs no savepoint: its failure rolls back the whole transaction.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        return [(False, exc)] * len(works)
    if len(works) == 1:
        try:
            outcomes: list[Outcome] = [(True, _unit(tx, works[0]))]
        except Exception as exc:
            tx.discard()
            conn.execute("ROLLBACK")
            return [(False, exc)]
    else:
        outcomes = [_in_savepoint(conn, tx, work) for work in works]
    try:
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        log.exception("group commit failed; every unit in the group fails")
        conn.execute("ROLLBACK")
        return [(False, exc)] * len(works)
    return outcomes


def _unit(tx: Any, work: Callable[[Any], Any]) -> Any:
    """The unit, then the writes its transaction object kept in memory (SqliteShardTx): a
    failure writing them is the unit's failure, rolled back with it."""
    value = work(tx)
    tx.flush()
    return value


def _in_savepoint(conn: sqlite3.Connection, tx: Any, work: Callable[[Any], Any]) -> Outcome:
    conn.execute("SAVEPOINT unit")
    try:
        value = _unit(tx, work)
    except Exception as exc:
        tx.discard()
        conn.execute("ROLLBACK TO unit")
        conn.execute("RELEASE unit")
        return False, exc
    conn.execute("RELEASE unit")
    return True, value


def run_read(conn: sqlite3.Connection, tx: Any, work: Callable[[Any], Any]) -> Outcome:
    """A read inside one read transaction, so it sees a single committed snapshot."""
    conn.execute("BEGIN")
    try:
        return True, work(tx)
    except Exception as exc:
        return False, exc
    finally:
        tx.discard()
        conn.execute("ROLLBACK")


def _run(conn: sqlite3.Connection, tx: Any, works: list[Callable[[Any], Any]], group: bool) -> list[Outcome]:
    return run_group(conn, tx, works) if group else [run_read(conn, tx, w) for w in works]


class Executor(Protocol):
    async def submit(self, work: Callable[[Any], T]) -> T: ...
    def close(self) -> None: ...


class LoopExecutor:
    """Collects submitted units and runs them as one group.

    Adaptive group commit: a unit submitted while the executor is idle runs on the next loop
    iteration; while it is busy (the last group ran less than `window` seconds ago) units
    wait for the window to close, so that each commit, whose cost grows with the pages it
    writes rather than with the units in it, carries many units under load.
    """

    def __init__(
        self, conn: sqlite3.Connection, wrap: Callable[[sqlite3.Connection], Any], *, group: bool, window: float = 0
    ) -> None:
        self._conn = conn
        self._tx = wrap(conn)
        self._group = group
        self._window = window
        self._last_flush = 0.0
        self._pending: list[tuple[Callable[[Any], Any], asyncio.Future[Any]]] = []
        self._closed = False

    async def submit(self, work: Callable[[Any], T]) -> T:
        if self._closed:
            raise StoreClosed("sqlite")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if not self._pending:
            wait = self._last_flush + self._window - loop.time()
            if wait > 0:
                loop.call_later(wait, self._flush)
            else:
                loop.call_soon(self._flush)
        self._pending.append((work, fut))
        return await fut

    def _flush(self) -> None:
        self._last_flush = asyncio.get_running_loop().time()
        while self._pending:
            batch, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
            outcomes = _run(self._conn, self._tx, [w for w, _ in batch], self._group)
            for (_, fut), (ok, value) in zip(batch, outcomes, strict=True):
                if fut.cancelled():
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

    def close(self) -> None:
        """Runs what was handed over before closing (a caller's posting is not dropped)."""
        if self._closed:
            return
        self._closed = True
        if self._pending:
            self._flush()
        self._conn.close()


class _Stop:
    pass


class Checkpointer:
    """Copies WAL frames into the database files on its own thread.

    SQLite's automatic checkpoint runs inside whichever COMMIT crosses the page threshold, and
    with synchronous=NORMAL it fsyncs there: on the event-loop executor that stalled every
    request queued behind that commit. The writers turn it off and this thread runs PASSIVE
    checkpoints instead (they never block writers or readers); sqlite3 releases the GIL while
    it copies and syncs.
    """

    def __init__(self, paths: list[Path], synchronous: str, interval: float = 0.5) -> None:
        self._paths = paths
        self._synchronous = synchronous
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        conns = [connect(p, self._synchronous) for p in self._paths]
        try:
            while not self._stop.wait(self._interval):
                for conn in conns:
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    except sqlite3.Error:
                        log.exception("WAL checkpoint failed; retrying next interval")
        finally:
            for conn in conns:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class ThreadExecutor:
    """Owns its connection on a dedicated thread; the queue forms the groups.

    Closing runs what was queued before it, then fails whatever is left with StoreClosed. With
    `abandon_on_close` (long reads) it fails even the queued work and stops the statement
    running, and any the read starts after that, so a reconciliation pass does not hold a
    shutdown for minutes.
    """

    def __init__(
        self, name: str, conn: sqlite3.Connection, wrap: Callable[[sqlite3.Connection], Any], *, group: bool,
        abandon_on_close: bool = False,
    ) -> None:  # fmt: skip
        self._name = name
        self._conn = conn
        self._tx = wrap(conn)
        self._group = group
        self._abandon = abandon_on_close
        self._queue: queue.SimpleQueue[tuple[Callable[[Any], Any], Future[Any]] | _Stop] = queue.SimpleQueue()
        self._closed = False
        self._closing = threading.Lock()  # a submit never lands behind the drain that follows close
        if abandon_on_close:
            # sqlite3_interrupt alone misses a statement that starts after it: a read between
            # statements (decoding rows) would run on. The handler stops every one from then on.
            # Called every million VM steps (a few ms): an aggregate over a whole shard runs
            # without the GIL, and a frequent handler would make it take the GIL back each time.
            conn.set_progress_handler(lambda: 1 if self._closed else 0, 1_000_000)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    async def submit(self, work: Callable[[Any], T]) -> T:
        fut: Future[T] = Future()
        with self._closing:
            if self._closed:
                raise StoreClosed(self._name)
            self._queue.put((work, fut))
        return await asyncio.wrap_future(fut)

    def close(self) -> None:
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_Stop())
        if self._abandon:
            self._conn.interrupt()
        self._thread.join(timeout=30)
        running = self._thread.is_alive()
        self._fail_queued()
        if running:  # still in a unit: it owns the connection, and stops once it is done
            log.warning("%s: still running 30 s after close; leaving it to finish", self._name)
            self._queue.put(_Stop())
            return
        self._conn.close()

    def _fail_queued(self) -> None:
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not isinstance(item, _Stop) and item[1].set_running_or_notify_cancel():
                item[1].set_exception(StoreClosed(self._name))

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if isinstance(first, _Stop):
                return
            batch = [first]
            stop = False
            while len(batch) < (1 if self._abandon else MAX_GROUP):  # long reads one at a time
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Stop):
                    stop = True
                    break
                batch.append(item)
            # A caller that gave up (deadline, cancellation) is skipped; once running, it cannot be.
            live = [(w, f) for w, f in batch if f.set_running_or_notify_cancel()]
            if self._closed and self._abandon:
                for _, fut in live:
                    fut.set_exception(StoreClosed(self._name))
                return
            outcomes = _run(self._conn, self._tx, [w for w, _ in live], self._group)
            for (_, fut), (ok, value) in zip(live, outcomes, strict=True):
                if not ok and self._closed and isinstance(value, sqlite3.OperationalError):
                    closed = StoreClosed(self._name)  # stopped by close (interrupted), not a fault
                    closed.__cause__ = value
                    value = closed
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)
            if stop:
                return


def executor(name: str, conn: sqlite3.Connection, wrap: Callable[[sqlite3.Connection], Any], *, group: bool,
             threaded: bool, window: float = 0, abandon_on_close: bool = False) -> Executor:  # fmt: skip
    if threaded:
        return ThreadExecutor(name, conn, wrap, group=group, abandon_on_close=abandon_on_close)
    return LoopExecutor(conn, wrap, group=group, window=window)
