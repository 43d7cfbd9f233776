"""Per-channel API keys: stored hashed, bound to a channel, its stores and scopes.

A key looks like `pmk_<id>_<secret>`; only SHA-256 of the whole key is stored, so a leaked
database does not leak keys. The id part finds the row without scanning. Gateways cache a
verified key for a few seconds, so a revocation takes effect within that time on every process.

The records live in SQLite under the data dir (one machine: `pointmesh up`), or in Redis
(POINTMESH_GATEWAY_KEY_STORE=redis), which every gateway replica shares: on Kubernetes a key
created in one pod must be known to all of them.

While the records cannot be read (Redis down or too slow), a key read from them within the last
STALE_GRACE_SECONDS is still accepted from the cache, so a Redis blip does not take the REST API
down for every till. The price: a revocation made during the outage takes effect when Redis
answers again, at most STALE_GRACE_SECONDS after the key was last read. A key not read that
recently is neither valid nor invalid (KeyStoreUnavailable: the caller answers 503), and a key
the cache holds as revoked stays refused. After a failed read the records are not asked again
for RETRY_AFTER_FAILURE_SECONDS: a Redis that does not answer would otherwise hold every request
for the whole socket timeout.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from redis import Redis as SyncRedis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError

from ledger_svc.domain import is_valid_name
from pointmesh.redis_client import open_redis

log = logging.getLogger(__name__)

SCOPES = (
    "members:read", "members:write", "purchases:write", "redemptions:write", "transfers:write",
    "program:read", "ops:read", "ops:write", "legacy:write", "admin",
)  # fmt: skip
CACHE_SECONDS = 5.0
# How long a key read from the records is still accepted from the cache while they cannot be
# read: how long a Redis outage may last before keys fail, and how late a revocation made during
# one may take effect.
STALE_GRACE_SECONDS = 300.0
# After a failed read the records are asked again only this much later, by one request: a Redis
# that does not answer then holds one request per interval for its socket timeout, not every one.
RETRY_AFTER_FAILURE_SECONDS = 1.0
# While keys are served from the stale cache, one warning per this long, not one per request.
STALE_WARNING_SECONDS = 30.0
# Every key id is secrets.token_hex(6); anything else names no key and is refused unread.
_KEY_ID_RE = re.compile(r"^[0-9a-f]{12}$")
_NAME_RULE = "1..64 letters, digits and _.:-, starting with a letter or digit"
KEY_ID_BYTES = 6  # a key id is 12 hex digits
MAX_CHANNEL = 64 - 1 - 2 * KEY_ID_BYTES  # "<channel>:<key id>" is a name of at most 64
RESERVED_CHANNEL = "purchase"  # the prefix of the ledger's receipt-key namespace (gateway/problems.py)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
  key_id TEXT PRIMARY KEY, key_hash TEXT NOT NULL, channel TEXT NOT NULL, stores TEXT NOT NULL,
  scopes TEXT NOT NULL, label TEXT NOT NULL, created_at TEXT NOT NULL, revoked_at TEXT);
"""


class KeyRequestError(ValueError):
    """A key request that cannot be honoured (unknown scope, unknown key id)."""


class KeyStoreUnavailable(Exception):
    """The key records cannot be read now (Redis down or too slow): a key is neither valid nor
    invalid, so the caller is told to retry rather than refused."""


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


# A record: key_id, channel, stores (JSON), scopes (JSON), label, created_at, revoked_at, key_hash.
Row = tuple[str, str, str, str, str, str, str | None, str]


class KeyRecords(Protocol):
    """Where the hashed key records are kept."""

    def insert(self, row: Row) -> None: ...
    def revoke(self, key_id: str, at: str) -> bool:
        """Marks an active key revoked; False when there is no active key of that id."""
        ...

    def rows(self) -> list[Row]: ...
    def get(self, key_id: str) -> Row | None: ...
    async def lookup(self, key_id: str) -> Row | None:
        """get() on the request path: without blocking the event loop; KeyStoreUnavailable
        when the records cannot be read."""
        ...

    def close(self) -> None: ...
    async def aclose(self) -> None:
        """close(), and what lookup() opened on the event loop."""
        ...


class SqliteKeyRecords:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def insert(self, row: Row) -> None:
        with self._lock:
            self._db.execute("INSERT INTO api_keys VALUES (?,?,?,?,?,?,?,?)", _sqlite_order(row))

    def revoke(self, key_id: str, at: str) -> bool:
        with self._lock:
            return bool(
                self._db.execute(
                    "UPDATE api_keys SET revoked_at=? WHERE key_id=? AND revoked_at IS NULL", (at, key_id)
                ).rowcount
            )

    def rows(self) -> list[Row]:
        with self._lock:
            found = self._db.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at").fetchall()
        return [tuple(r) for r in found]  # type: ignore[misc]

    def get(self, key_id: str) -> Row | None:
        with self._lock:
            found = self._db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id=?", (key_id,)).fetchone()
        return None if found is None else tuple(found)  # type: ignore[return-value]

    async def lookup(self, key_id: str) -> Row | None:
        # A primary-key read of a local WAL file that only `pointmesh keys` writes (from another
        # process): it waits on no network and no writer, so it runs inline.
        return self.get(key_id)

    def close(self) -> None:
        self._db.close()

    async def aclose(self) -> None:
        self.close()


_COLUMNS = "key_id, channel, stores, scopes, label, created_at, revoked_at, key_hash"


def _sqlite_order(row: Row) -> tuple[object, ...]:
    """The table's column order: key_id, key_hash, channel, stores, scopes, label, created_at, revoked_at."""
    return (row[0], row[7], row[1], row[2], row[3], row[4], row[5], row[6])


# Revokes atomically: only an active key, so two revocations cannot both succeed.
_REVOKE = """
local found = redis.call('HGET', KEYS[1], ARGV[1])
if not found then return 0 end
local row = cjson.decode(found)
if row[7] ~= cjson.null then return 0 end
row[7] = ARGV[2]
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(row))
return 1
"""


class RedisKeyRecords:
    """One Redis hash, field key id -> the record as a JSON array, shared by every gateway."""

    def __init__(self, url: str, *, key: str = "pm:gateway:api-keys", timeout_seconds: float = 2.0) -> None:
        self._url, self._timeout_seconds = url, timeout_seconds
        self._redis = SyncRedis.from_url(url, socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds)
        # The request path's client, opened by the first lookup on the loop that serves (the CLI
        # and `pointmesh keys` use the synchronous one and never open it).
        self._async: AsyncRedis | None = None
        self._key = key

    def insert(self, row: Row) -> None:
        if not self._redis.hsetnx(self._key, row[0], json.dumps(list(row))):
            raise KeyRequestError(f"key id {row[0]} exists already; create the key again")

    def revoke(self, key_id: str, at: str) -> bool:
        return bool(self._redis.eval(_REVOKE, 1, self._key, key_id, at))

    def rows(self) -> list[Row]:
        found = [_row(raw) for raw in self._redis.hvals(self._key)]  # type: ignore[union-attr]
        return sorted(found, key=lambda r: r[5])

    def get(self, key_id: str) -> Row | None:
        raw = self._redis.hget(self._key, key_id)
        return None if raw is None else _row(raw)  # type: ignore[arg-type]

    async def lookup(self, key_id: str) -> Row | None:
        if self._async is None:
            timeout = self._timeout_seconds
            self._async = open_redis(self._url, timeout=timeout, connect_timeout=timeout, wait=timeout)
        try:
            raw = await self._async.hget(self._key, key_id)  # type: ignore[misc]
        except (RedisError, OSError) as exc:  # refused, reset, or no answer within the timeout
            raise KeyStoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return None if raw is None else _row(raw)

    def close(self) -> None:
        self._redis.close()

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()
        self.close()


def _row(raw: bytes | str) -> Row:
    return tuple(json.loads(raw))  # type: ignore[return-value]


# When a record was read, the key it holds, and the key's hash.
_Cached = tuple[float, ApiKey, str]


class KeyStore:
    def __init__(self, records: Path | KeyRecords, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._records = SqliteKeyRecords(records) if isinstance(records, Path) else records
        # Only keys that exist are cached (bounded by the records); a miss is looked up again.
        self._cache: dict[str, _Cached] = {}
        self._clock = clock
        self._outage = _Outage()

    def close(self) -> None:
        self._records.close()

    async def aclose(self) -> None:
        await self._records.aclose()

    def create(self, channel: str, scopes: list[str], stores: list[str], label: str) -> tuple[str, ApiKey]:
        """Returns the plaintext key (shown once) and its record."""
        unknown = [s for s in scopes if s not in SCOPES]
        if unknown or not scopes:
            raise KeyRequestError(f"unknown scopes {unknown}; choose from {list(SCOPES)}")
        # The ledger's name rule: a key whose channel or stores break it signs nothing the ledger takes.
        if not is_valid_name(channel):
            raise KeyRequestError(f"channel {channel!r} is not a valid name ({_NAME_RULE})")
        if channel == RESERVED_CHANNEL:
            # Its keys' namespace, 'purchase:<key id>', would read as the ledger's receipt keys
            # ('purchase:<program>'): a reused Idempotency-Key would be answered as a receipt.
            raise KeyRequestError(f"channel {channel!r} is reserved; name the channel another way")
        if len(channel) > MAX_CHANNEL:
            raise KeyRequestError(
                f"channel {channel!r} is {len(channel)} characters; at most {MAX_CHANNEL}, so that"
                " '<channel>:<key id>', the namespace of the key's idempotency keys, is a valid name too"
            )
        bad = [store for store in stores if not is_valid_name(store)]
        if bad:
            raise KeyRequestError(f"store ids {bad} are not valid names ({_NAME_RULE})")
        key_id = secrets.token_hex(KEY_ID_BYTES)
        plaintext = f"pmk_{key_id}_{secrets.token_urlsafe(24)}"
        record = ApiKey(key_id, channel, tuple(stores), tuple(scopes), label, datetime.now(UTC), None)
        self._records.insert((key_id, channel, json.dumps(stores), json.dumps(scopes), label,
                              record.created_at.isoformat(), None, _hash(plaintext)))  # fmt: skip
        return plaintext, record

    def revoke(self, key_id: str) -> None:
        if not self._records.revoke(key_id, datetime.now(UTC).isoformat()):
            raise KeyRequestError(f"no active key {key_id}")
        self._cache.pop(key_id, None)

    def list(self) -> list[ApiKey]:
        return [_record(r) for r in self._records.rows()]

    def verify(self, presented: str) -> ApiKey | None:
        """The active key matching `presented`, or None; constant-time on the secret. For the
        CLI and tests: the gateway's requests use verify_async."""
        key_id = _key_id(presented)
        if key_id is None:
            return None
        cached = self._fresh(key_id)
        if cached is None:
            cached = self._remember(key_id, self._records.get(key_id))
        return _match(cached, presented)

    async def verify_async(self, presented: str) -> ApiKey | None:
        """verify() without blocking the event loop; KeyStoreUnavailable when the records
        cannot be read and the cache holds no copy of the key read within STALE_GRACE_SECONDS
        (such a key is neither accepted nor refused then)."""
        key_id = _key_id(presented)
        if key_id is None:
            return None
        cached = self._fresh(key_id)
        if cached is None:
            cached = await self._lookup(key_id)
        return _match(cached, presented)

    async def _lookup(self, key_id: str) -> _Cached | None:
        """The key's record read again or, while the records cannot be read, as the cache last
        read it within STALE_GRACE_SECONDS; KeyStoreUnavailable when it has no such copy."""
        try:
            row = await self._outage.read(self._records, key_id, self._clock)
        except KeyStoreUnavailable:
            cached = self._cache.get(key_id)
            if cached is None or self._clock() - cached[0] > STALE_GRACE_SECONDS:
                raise
            self._outage.served_stale(self._clock())
            return cached
        return self._remember(key_id, row)

    def _fresh(self, key_id: str) -> _Cached | None:
        cached = self._cache.get(key_id)
        return cached if cached is not None and self._clock() - cached[0] <= CACHE_SECONDS else None

    def _remember(self, key_id: str, row: Row | None) -> _Cached | None:
        if row is None:
            self._cache.pop(key_id, None)
            return None
        cached = (self._clock(), _record(row[:7]), row[7])
        self._cache[key_id] = cached
        return cached


class _Outage:
    """Whether the records could be read lately: after a failure they are asked again only
    RETRY_AFTER_FAILURE_SECONDS later (by one request at a time), and serving from the stale
    cache meanwhile is logged at most once per STALE_WARNING_SECONDS."""

    def __init__(self) -> None:
        self.failure = ""  # the last read's error while the records cannot be read; "" when they can
        self.since = 0.0
        self.retry_at = 0.0
        self.stale_served = 0
        self.warned_at: float | None = None

    async def read(self, records: KeyRecords, key_id: str, clock: Callable[[], float]) -> Row | None:
        now = clock()
        if self.failure:
            if now < self.retry_at:
                raise KeyStoreUnavailable(f"not asked within {RETRY_AFTER_FAILURE_SECONDS:g} s of: {self.failure}")
            # This request probes; the others do not wait on the same slow Redis meanwhile.
            self.retry_at = now + RETRY_AFTER_FAILURE_SECONDS
        try:
            row = await records.lookup(key_id)
        except KeyStoreUnavailable as exc:
            self._failed(str(exc), clock())
            raise
        if self.failure:
            # A warning when keys were served stale (so the outage's warnings have an end), else info.
            level = logging.INFO if self.warned_at is None else logging.WARNING
            log.log(level, "API key records can be read again after %.1f s", clock() - self.since)
            self.failure, self.warned_at, self.stale_served = "", None, 0
        return row

    def _failed(self, failure: str, now: float) -> None:
        if not self.failure:
            self.since = now
        self.failure, self.retry_at = failure, now + RETRY_AFTER_FAILURE_SECONDS

    def served_stale(self, now: float) -> None:
        self.stale_served += 1
        if self.warned_at is None or now - self.warned_at >= STALE_WARNING_SECONDS:
            log.warning(
                "API key records cannot be read for %.1f s (%s): %d request(s) answered from keys read "
                "within the last %g s; a revocation made meanwhile waits for the records",
                now - self.since, self.failure, self.stale_served, STALE_GRACE_SECONDS,
            )  # fmt: skip
            self.warned_at, self.stale_served = now, 0


def _key_id(presented: str) -> str | None:
    """The id part of `pmk_<id>_<secret>`, or None for anything that is not the shape of a key."""
    parts = presented.split("_")
    if len(parts) < 3 or parts[0] != "pmk" or not _KEY_ID_RE.match(parts[1]):
        return None
    return parts[1]


def _match(cached: _Cached | None, presented: str) -> ApiKey | None:
    if cached is None:
        return None
    _, record, key_hash = cached
    if record.revoked_at is not None:
        return None
    return record if hmac.compare_digest(key_hash, _hash(presented)) else None


def _record(row: Row | tuple[str, str, str, str, str, str, str | None]) -> ApiKey:
    return ApiKey(
        row[0], row[1], tuple(json.loads(row[2])), tuple(json.loads(row[3])), row[4], datetime.fromisoformat(row[5]),
        datetime.fromisoformat(row[6]) if row[6] else None,
    )  # fmt: skip
