"""One thread per SQLite database that owns its connection and commits in groups.

Concurrent requests queue their unit of work; the thread runs every queued unit inside one
BEGIN IMMEDIATE ... COMMIT, each under its own SAVEPOINT so a unit that raises rolls back
alone. One fsync (or WAL append) then covers the whole group, which is what lets a single
SQLite file keep up with thousands of postings a second.
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
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

MAX_GROUP = 512


def connect(path: Path, synchronous: str, *, readonly: bool = False) -> sqlite3.Connection:
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA busy_timeout=30000")
    if not readonly:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("PRAGMA cache_size=-65536")
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


class _Stop:
    pass


class DbWorker:
    """Serialises access to one connection; `group` decides whether writes are batched."""

    def __init__(
        self, name: str, conn: sqlite3.Connection, wrap: Callable[[sqlite3.Connection], Any], *, group: bool
    ) -> None:
        self._conn = conn
        self._tx = wrap(conn)
        self._group = group
        self._queue: queue.SimpleQueue[tuple[Callable[[Any], Any], Future[Any]] | _Stop] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def submit(self, work: Callable[[Any], T]) -> T:
        fut: Future[T] = Future()
        self._queue.put((work, fut))
        return await asyncio.wrap_future(fut)

    def submit_sync(self, work: Callable[[Any], T]) -> T:
        fut: Future[T] = Future()
        self._queue.put((work, fut))
        return fut.result()

    def close(self) -> None:
        self._queue.put(_Stop())
        self._thread.join(timeout=30)
        self._conn.close()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if isinstance(first, _Stop):
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_GROUP:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Stop):
                    stop = True
                    break
                batch.append(item)
            if self._group:
                self._run_group(batch)
            else:
                for work, fut in batch:
                    self._run_one(work, fut)
            if stop:
                return

    def _run_one(self, work: Callable[[Any], Any], fut: Future[Any]) -> None:
        """Runs a read inside one read transaction, so it sees a single committed snapshot."""
        self._conn.execute("BEGIN")
        try:
            fut.set_result(work(self._tx))
        except BaseException as exc:  # delivered to the awaiting coroutine
            fut.set_exception(exc)
        finally:
            self._conn.execute("ROLLBACK")

    def _run_group(self, batch: list[tuple[Callable[[Any], Any], Future[Any]]]) -> None:
        conn = self._conn
        results: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            for _, fut in batch:
                fut.set_exception(exc)
            return
        for work, fut in batch:
            conn.execute("SAVEPOINT unit")
            try:
                value = work(self._tx)
            except BaseException as exc:
                conn.execute("ROLLBACK TO unit")
                conn.execute("RELEASE unit")
                results.append((fut, None, exc))
                continue
            conn.execute("RELEASE unit")
            results.append((fut, value, None))
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.exception("group commit failed; every unit in the group fails")
            conn.execute("ROLLBACK")
            for fut, _, _ in results:
                fut.set_exception(exc)
            return
        for fut, value, error in results:
            if error is None:
                fut.set_result(value)
            else:
                fut.set_exception(error)
