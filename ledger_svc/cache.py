"""Redis read-through cache of balances; never the source of truth.

Every entry carries its balance version. Writers replace the entry with a tombstone that
holds the new version, and a fill only lands if it is not older than what is there, so a
slow reader can never put back a balance a writer already superseded.

When Redis cannot be reached at write time the member/unit stays "dirty" in this process
and reads bypass Redis until a tombstone lands. After a restart the cache stays off until
the outbox relay has drained once, because the relay tombstones every event's balance.

On a store several replicas serve (`shared`), the dirty set of the writer is not enough: the
other replicas read Redis. There the writer tombstones before it answers (`settle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ledger_svc import codec
from ledger_svc.domain import Balance

log = logging.getLogger(__name__)

# KEYS[1] = entry; ARGV = version, value, ttl. Value format: "<version>|<json>"; tombstone: "<version>|".
_FILL = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local sep = string.find(cur, '|', 1, true)
  local v = tonumber(string.sub(cur, 1, sep - 1))
  local incoming = tonumber(ARGV[1])
  if v > incoming or (v == incoming and sep < string.len(cur)) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""

_TOMBSTONE = """
for i, key in ipairs(KEYS) do
  local incoming = tonumber(ARGV[i])
  local cur = redis.call('GET', key)
  local keep = false
  if cur then
    local sep = string.find(cur, '|', 1, true)
    if tonumber(string.sub(cur, 1, sep - 1)) > incoming then keep = true end
  end
  if not keep then redis.call('SET', key, ARGV[i] .. '|', 'EX', ARGV[#KEYS + 1]) end
end
return 1
"""

_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
SETTLE_SECONDS = 0.25  # past this a write answers anyway; its relay tombstones a moment later


def cache_key(member_id: str, unit: str) -> str:
    return f"pm:bal:{{{member_id}}}:{unit}"


class RedisBalanceCache:
    def __init__(self, redis: Redis, *, ttl_seconds: int = 300, shared: bool = False) -> None:
        self.redis = redis
        self.ttl_seconds = ttl_seconds
        self.shared = shared
        self._fill = redis.register_script(_FILL)
        self._tomb = redis.register_script(_TOMBSTONE)
        self._dirty: dict[tuple[str, str], int] = {}
        self._unsent: dict[tuple[str, str], int] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._enabled = False

    def enable(self) -> None:
        """Called by the outbox relay once everything written before start-up is tombstoned."""
        self._enabled = True

    def usable_for(self, member_id: str, unit: str) -> bool:
        return self._enabled and (member_id, unit) not in self._dirty

    async def get(self, member_id: str, unit: str) -> Balance | None:
        try:
            raw = await self.redis.get(cache_key(member_id, unit))
        except _ERRORS:
            return None
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        _version, _, body = text.partition("|")
        return codec.from_plain(Balance, json.loads(body)) if body else None

    async def fill(self, balance: Balance) -> None:
        value = f"{balance.version}|{codec.dumps(balance)}"
        with contextlib.suppress(*_ERRORS):
            await self._fill(
                keys=[cache_key(balance.member_id, balance.unit)], args=[balance.version, value, self.ttl_seconds]
            )

    def invalidate(self, member_id: str, unit: str, version: int) -> None:
        """Marks the entry dirty: reads bypass Redis until the outbox relay tombstones it.

        The relay publishes this write's event moments later and tombstones its balance first,
        so no separate Redis round trip is needed here, and none is lost while Redis is down.
        """
        key = (member_id, unit)
        self._dirty[key] = max(version, self._dirty.get(key, version))
        if self.shared:
            self._unsent[key] = max(version, self._unsent.get(key, version))

    async def settle(self) -> None:
        """On a shared store, the tombstones of every write invalidated so far are in Redis when
        this returns (or SETTLE_SECONDS passed, or Redis failed: those stay dirty here and the
        relay tombstones them). A replica that did not write reads Redis, so without this it
        would serve the balance from before a write that has already answered.

        Sends run side by side (the tombstone script keeps the highest version whatever the
        order), each bounded by SETTLE_SECONDS; a caller waits for every send in flight, since
        its keys may have gone out with another caller's, and never longer than SETTLE_SECONDS.
        """
        if self._unsent:
            versions, self._unsent = self._unsent, {}
            task = asyncio.ensure_future(self._send(versions))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=SETTLE_SECONDS)

    async def _send(self, versions: dict[tuple[str, str], int]) -> None:
        with contextlib.suppress(*_ERRORS):
            async with asyncio.timeout(SETTLE_SECONDS):
                await self.tombstone(versions)

    async def tombstone(self, versions: dict[tuple[str, str], int]) -> None:
        """Raises if Redis is unreachable, so the caller (the relay) retries."""
        if not versions:
            return
        keys = [cache_key(m, u) for m, u in versions]
        await self._tomb(keys=keys, args=[*versions.values(), self.ttl_seconds])
        for key, version in versions.items():
            if self._dirty.get(key, version + 1) <= version:
                del self._dirty[key]
