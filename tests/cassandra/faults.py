"""A driver session stand-in for Cassandra store tests: it passes everything to the real
session, and can fail chosen statements the way the driver does or record what went out."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from cassandra import Unavailable

from ledger_svc.store.cassandra import CassandraLedgerStore

Fault = Callable[[str, tuple[Any, ...]], BaseException | None]


class WatchedSession:
    """Installed on a store after it prepared its statements (`WatchedSession.on(store)`)."""

    def __init__(self, store: CassandraLedgerStore) -> None:
        self._session = store.session
        self._names = {id(stmt): name for name, stmt in store._stmts.items()}
        self._lock = threading.Lock()
        self.fault: Fault | None = None  # (statement name, params) -> exception to raise, or None
        # The next statement of this name is refused by "the node" (its future fails), while
        # the statements sent beside it run: one partition short of replicas.
        self.refuse_next = ""
        self.sent: list[tuple[str, tuple[Any, ...]]] = []
        self.in_flight = 0
        self.most_in_flight = 0

    @classmethod
    def on(cls, store: CassandraLedgerStore) -> WatchedSession:
        watched = cls(store)
        store.session = watched
        return watched

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def _check(self, stmt: Any, params: Any) -> None:
        name = self._names.get(id(stmt), "")
        args = tuple(params or ())
        with self._lock:
            self.sent.append((name, args))
        error = self.fault(name, args) if self.fault is not None else None
        if error is not None:
            raise error

    def execute(self, stmt: Any, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        self._check(stmt, params)
        return self._session.execute(stmt, params, *args, **kwargs)

    def execute_async(self, stmt: Any, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        self._check(stmt, params)
        if self.refuse_next and self._names.get(id(stmt)) == self.refuse_next:
            self.refuse_next = ""
            return _Refused(Unavailable("too few replicas for this partition (refused by the test)"))
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        future = self._session.execute_async(stmt, params, *args, **kwargs)
        future.add_callbacks(self._done, self._done)
        return future

    def _done(self, _result: Any) -> None:
        with self._lock:
            self.in_flight -= 1


class _Refused:
    """A driver future for a statement the node refused: it never applied."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def result(self) -> Any:
        raise self.error

    def add_callbacks(self, *_: Any) -> None:
        pass
