"""Per-channel API keys: stored hashed, bound to a channel, its stores and scopes.

A key looks like `pmk_<id>_<secret>`; only SHA-256 of the whole key is stored, so a leaked
database does not leak keys. The id part finds the row without scanning. Gateways cache a
verified key for a few seconds, so a revocation takes effect within that time on every process.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ledger_svc.domain import is_valid_name

SCOPES = (
    "members:read", "members:write", "purchases:write", "redemptions:write", "transfers:write",
    "program:read", "ops:read", "ops:write", "legacy:write", "admin",
)  # fmt: skip
CACHE_SECONDS = 5.0
# Every key id is secrets.token_hex(6); anything else names no key and is refused unread.
_KEY_ID_RE = re.compile(r"^[0-9a-f]{12}$")
_NAME_RULE = "1..64 letters, digits and _.:-, starting with a letter or digit"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
  key_id TEXT PRIMARY KEY, key_hash TEXT NOT NULL, channel TEXT NOT NULL, stores TEXT NOT NULL,
  scopes TEXT NOT NULL, label TEXT NOT NULL, created_at TEXT NOT NULL, revoked_at TEXT);
"""


class KeyRequestError(ValueError):
    """A key request that cannot be honoured (unknown scope, unknown key id)."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    channel: str
    stores: tuple[str, ...]  # empty: any store of the program
    scopes: tuple[str, ...]
    label: str
    created_at: datetime
    revoked_at: datetime | None

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        # Only keys that exist are cached (bounded by the table); a miss is looked up again.
        self._cache: dict[str, tuple[float, ApiKey, str]] = {}

    def close(self) -> None:
        self._db.close()

    def create(self, channel: str, scopes: list[str], stores: list[str], label: str) -> tuple[str, ApiKey]:
        """Returns the plaintext key (shown once) and its record."""
        unknown = [s for s in scopes if s not in SCOPES]
        if unknown or not scopes:
            raise KeyRequestError(f"unknown scopes {unknown}; choose from {list(SCOPES)}")
        # The ledger's name rule: a key whose channel or stores break it signs nothing the ledger takes.
        if not is_valid_name(channel):
            raise KeyRequestError(f"channel {channel!r} is not a valid name ({_NAME_RULE})")
        bad = [store for store in stores if not is_valid_name(store)]
        if bad:
            raise KeyRequestError(f"store ids {bad} are not valid names ({_NAME_RULE})")
        key_id = secrets.token_hex(6)
        plaintext = f"pmk_{key_id}_{secrets.token_urlsafe(24)}"
        record = ApiKey(key_id, channel, tuple(stores), tuple(scopes), label, datetime.now(UTC), None)
        with self._lock:
            self._db.execute(
                "INSERT INTO api_keys VALUES (?,?,?,?,?,?,?,NULL)",
                (key_id, _hash(plaintext), channel, json.dumps(stores), json.dumps(scopes), label,
                 record.created_at.isoformat()),
            )  # fmt: skip
        return plaintext, record

    def revoke(self, key_id: str) -> None:
        with self._lock:
            changed = self._db.execute(
                "UPDATE api_keys SET revoked_at=? WHERE key_id=? AND revoked_at IS NULL",
                (datetime.now(UTC).isoformat(), key_id),
            ).rowcount
        if not changed:
            raise KeyRequestError(f"no active key {key_id}")
        self._cache.pop(key_id, None)

    def list(self) -> list[ApiKey]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key_id, channel, stores, scopes, label, created_at, revoked_at FROM api_keys ORDER BY created_at"
            ).fetchall()
        return [_record(r) for r in rows]

    def verify(self, presented: str) -> ApiKey | None:
        """The active key matching `presented`, or None; constant-time on the secret."""
        parts = presented.split("_")
        if len(parts) < 3 or parts[0] != "pmk":
            return None
        key_id = parts[1]
        if not _KEY_ID_RE.match(key_id):
            return None
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is None or now - cached[0] > CACHE_SECONDS:
            with self._lock:
                row = self._db.execute(
                    "SELECT key_id, channel, stores, scopes, label, created_at, revoked_at, key_hash FROM api_keys "
                    "WHERE key_id=?",
                    (key_id,),
                ).fetchone()
            if row is None:
                self._cache.pop(key_id, None)
                return None
            cached = (now, _record(row[:7]), row[7])
            self._cache[key_id] = cached
        _, record, key_hash = cached
        if record.revoked_at is not None:
            return None
        return record if hmac.compare_digest(key_hash, _hash(presented)) else None


def _record(row: tuple[str, str, str, str, str, str, str | None]) -> ApiKey:
    return ApiKey(
        row[0], row[1], tuple(json.loads(row[2])), tuple(json.loads(row[3])), row[4], datetime.fromisoformat(row[5]),
        datetime.fromisoformat(row[6]) if row[6] else None,
    )  # fmt: skip
