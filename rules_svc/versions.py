"""Published program versions: immutable rows in a small SQLite file.

A version is never updated once written: publishing always adds a row, so every evaluation
can name the exact rules it used, and a return years later can be explained. Which version
applies to a receipt is decided by `effective_from` against the receipt time.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
  program TEXT NOT NULL, version INTEGER NOT NULL, published_at TEXT NOT NULL,
  effective_from TEXT NOT NULL, published_by TEXT NOT NULL, sha256 TEXT NOT NULL,
  document_json TEXT NOT NULL, PRIMARY KEY (program, version));
CREATE TABLE IF NOT EXISTS publish_keys (
  namespace TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL, program TEXT NOT NULL,
  version INTEGER NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (namespace, key));
CREATE TRIGGER IF NOT EXISTS versions_immutable BEFORE UPDATE ON versions
BEGIN SELECT RAISE(ABORT, 'program versions are immutable'); END;
"""


@dataclass(frozen=True, slots=True)
class VersionInfo:
    program: str
    version: int
    published_at: datetime
    effective_from: datetime
    published_by: str
    sha256: str


@dataclass(frozen=True, slots=True)
class PublishKey:
    fingerprint: str
    program: str
    version: int
    created_at: datetime


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text)


class VersionStore:
    """Thread-safe; the service calls it from one executor thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def publish(
        self, *, namespace: str, key: str, fingerprint: str, program: str, document_json: str, sha256: str,
        effective_from: datetime, published_by: str, now: datetime,
    ) -> tuple[VersionInfo, PublishKey | None]:  # fmt: skip
        """Adds the next version, or returns what this key already published (and the key record)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                done = self._published_with(namespace, key)
                if done is not None:
                    self._db.execute("ROLLBACK")
                    return done
                (latest,) = self._db.execute(
                    "SELECT COALESCE(MAX(version), 0) FROM versions WHERE program=?", (program,)
                ).fetchone()
                info = VersionInfo(program, latest + 1, now, effective_from, published_by, sha256)
                self._db.execute(
                    "INSERT INTO versions VALUES (?,?,?,?,?,?,?)",
                    (program, info.version, _ts(now), _ts(effective_from), published_by, sha256, document_json),
                )
                self._db.execute(
                    "INSERT INTO publish_keys VALUES (?,?,?,?,?,?)",
                    (namespace, key, fingerprint, program, info.version, _ts(now)),
                )
                self._db.execute("COMMIT")
                return info, None
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def copy(self, info: VersionInfo, document_json: str) -> bool:
        """Stores a version published elsewhere (a follower copying its leader's) under the
        leader's number; False if it is already here. A different document under that number
        means this file has history of its own, and is refused rather than mixed."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                held = self._get(info.program, info.version)
                if held is None:
                    self._db.execute(
                        "INSERT INTO versions VALUES (?,?,?,?,?,?,?)",
                        (info.program, info.version, _ts(info.published_at), _ts(info.effective_from),
                         info.published_by, info.sha256, document_json),
                    )  # fmt: skip
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        if held is not None and held.sha256 != info.sha256:
            raise ValueError(
                f"{info.program} v{info.version} here has sha256 {held.sha256}, the leader's {info.sha256}"
            )
        return held is None

    def published_with(self, namespace: str, key: str) -> tuple[VersionInfo, PublishKey] | None:
        """What this idempotency key published, if anything."""
        with self._lock:
            return self._published_with(namespace, key)

    def _published_with(self, namespace: str, key: str) -> tuple[VersionInfo, PublishKey] | None:
        row = self._db.execute(
            "SELECT fingerprint, program, version, created_at FROM publish_keys WHERE namespace=? AND key=?",
            (namespace, key),
        ).fetchone()
        if row is None:
            return None
        used = PublishKey(row[0], row[1], row[2], _dt(row[3]))
        found = self._get(used.program, used.version)
        assert found is not None
        return found, used

    def _get(self, program: str, version: int) -> VersionInfo | None:
        row = self._db.execute(
            "SELECT program, version, published_at, effective_from, published_by, sha256 FROM versions "
            "WHERE program=? AND version=?",
            (program, version),
        ).fetchone()
        return _info(row) if row else None

    def versions(self) -> list[VersionInfo]:
        with self._lock:
            rows = self._db.execute(
                "SELECT program, version, published_at, effective_from, published_by, sha256 FROM versions "
                "ORDER BY program, version"
            ).fetchall()
        return [_info(r) for r in rows]

    def document(self, program: str, version: int) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT document_json FROM versions WHERE program=? AND version=?", (program, version)
            ).fetchone()
        return str(row[0]) if row else None


def _info(row: tuple[str, int, str, str, str, str]) -> VersionInfo:
    return VersionInfo(row[0], row[1], _dt(row[2]), _dt(row[3]), row[4], row[5])
