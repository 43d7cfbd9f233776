"""Sliding-window velocity state on event time, behind one protocol with two stores.

`MemoryVelocity` serves training and replays (fast, in-process); `RedisVelocity` serves
online scoring (shared by every fraud_svc replica). Both implement the same arithmetic on
integers, so the same event sequence yields the same numbers; tests/fraud pin that.

An observation names *tracks* (a timestamped stream under a key, e.g. a member's purchases)
and *links* (a first/last-seen set under a key, e.g. a member's devices). Windows are
half-open on event time, (t - w, t], and include the event being observed, so a limit such
as "at most 20 purchases per 10 minutes" reads the count directly. Recording is idempotent
per event: an entry is identified by its event id and event time, so observing the same event
twice (a retry, a replay) records it once and answers from state that includes it once. No
separate "seen" set is kept, so nothing outlives the windows.

Retention trims entries older than `t - retention` when an event is recorded; a key's TTL in
Redis is its retention plus a day, so memory stays bounded by traffic in the retention span.
"""

from __future__ import annotations

from bisect import bisect_left as _left
from bisect import bisect_right as _right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from redis.asyncio import Redis


@dataclass(frozen=True, slots=True)
class TrackSpec:
    """What one stream answers: counts, integer sums and distinct tags per window (ms)."""

    count_windows_ms: tuple[int, ...] = ()
    sum_windows_ms: tuple[int, ...] = ()
    distinct_windows_ms: tuple[int, ...] = ()
    want_prev: bool = False
    retention_ms: int = 86_400_000
    # Derived once: the answer of an empty stream, and the narrowest window (for a fast path).
    empty_answer: tuple[int, ...] = field(init=False, repr=False, compare=False)
    narrowest_ms: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        windows = (*self.count_windows_ms, *self.sum_windows_ms, *self.distinct_windows_ms)
        if any(w <= 0 or w > self.retention_ms for w in windows):
            raise ValueError("every window must be positive and within the retention")
        zeros = (0,) * (len(windows))
        object.__setattr__(self, "empty_answer", (*zeros, -1) if self.want_prev else zeros)
        object.__setattr__(self, "narrowest_ms", min(windows, default=self.retention_ms))

    @property
    def width(self) -> int:
        """How many integers this track adds to an observation's answer."""
        return len(self.empty_answer)


class Track(NamedTuple):
    """One track of one event: record `value`/`tag` under `key` (if `record`) and read it."""

    spec: TrackSpec
    key: str
    value: int
    tag: str
    record: bool


class Link(NamedTuple):
    """First/last-seen set under `key`; answers (age of `item` or -1, items first seen in the
    window, items last seen in the window)."""

    key: str
    item: str
    window_ms: int
    retention_ms: int
    record: bool


# One event's observation: (event_id, at_ms, tracks, links).
Observation = tuple[str, int, Sequence["Track"], Sequence["Link"]]


class Velocity(Protocol):
    async def observe(
        self, event_id: str, at_ms: int, tracks: Sequence[Track], links: Sequence[Link]
    ) -> tuple[int, ...]:
        """Records the event (once per event) and returns, in request order, each track's
        counts, sums, distincts and previous timestamp (-1 if none), then each link's three
        numbers."""
        ...

    async def observe_many(self, events: Sequence[Observation]) -> list[tuple[int, ...]]:
        """`observe` for many events in order, each seeing the ones before it."""
        ...


def clean(text: str) -> str:
    """Track entries are stored as "value|tag|event id", so a '|' inside a tag is replaced."""
    return text.replace("|", "/") if "|" in text else text


class _Stream:
    __slots__ = ("eids", "tags", "ts", "values")

    def __init__(self) -> None:
        self.ts: list[int] = []
        self.values: list[int] = []
        self.tags: list[str] = []
        self.eids: list[str] = []

    def add(self, t: int, value: int, tag: str, eid: str, retention_ms: int) -> None:
        ts = self.ts
        same = _left(ts, t)
        if eid in self.eids[same : _right(ts, t, same)]:
            return
        if not ts or ts[-1] <= t:
            ts.append(t)
            self.values.append(value)
            self.tags.append(tag)
            self.eids.append(eid)
        else:
            at = _right(ts, t)
            ts.insert(at, t)
            self.values.insert(at, value)
            self.tags.insert(at, tag)
            self.eids.insert(at, eid)
        cut = _right(ts, t - retention_ms)
        if cut:
            del ts[:cut], self.values[:cut], self.tags[:cut], self.eids[:cut]

    def answer(self, spec: TrackSpec, t: int, eid: str, out: list[int]) -> None:
        ts = self.ts
        if not ts:
            out.extend(spec.empty_answer)
            return
        hi = _right(ts, t)
        if hi == len(ts) and ts[0] > t - spec.narrowest_ms:
            self._answer_all(spec, eid, out)
            return
        for w in spec.count_windows_ms:
            out.append(hi - _right(ts, t - w))
        for w in spec.sum_windows_ms:
            out.append(sum(self.values[_right(ts, t - w) : hi]))
        for w in spec.distinct_windows_ms:
            tags = set(self.tags[_right(ts, t - w) : hi])
            tags.discard("")
            out.append(len(tags))
        if spec.want_prev:
            prev = -1
            for i in range(hi - 1, max(hi - 3, -1), -1):
                if self.eids[i] != eid:
                    prev = ts[i]
                    break
            out.append(prev)

    def _answer_all(self, spec: TrackSpec, eid: str, out: list[int]) -> None:
        """Every entry lies in every window (common for sparse keys): one pass for all."""
        n = len(self.ts)
        out.extend([n] * len(spec.count_windows_ms))
        if spec.sum_windows_ms:
            out.extend([sum(self.values)] * len(spec.sum_windows_ms))
        if spec.distinct_windows_ms:
            tags = set(self.tags)
            tags.discard("")
            out.extend([len(tags)] * len(spec.distinct_windows_ms))
        if spec.want_prev:
            prev = -1
            for i in range(n - 1, max(n - 3, -1), -1):
                if self.eids[i] != eid:
                    prev = self.ts[i]
                    break
            out.append(prev)


class _LinkSet:
    __slots__ = ("first", "last", "oldest")

    def __init__(self) -> None:
        self.first: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.oldest = 0  # a lower bound of every last-seen time, so most adds skip the prune scan

    def add(self, item: str, t: int, retention_ms: int) -> None:
        """Forgets items unseen for the retention first, so one that comes back is new again."""
        cutoff = t - retention_ms
        if self.last and self.oldest <= cutoff:
            stale = [name for name, seen in self.last.items() if seen <= cutoff]
            for name in stale:
                del self.first[name], self.last[name]
            self.oldest = min(self.last.values(), default=t)
        first = self.first.get(item)
        if first is None or t < first:
            self.first[item] = t
        last = self.last.get(item)
        if last is None:
            self.last[item] = t
            if len(self.last) == 1 or t < self.oldest:
                self.oldest = t
        elif t > last:
            self.last[item] = t

    def answer(self, item: str, window_ms: int, t: int, out: list[int]) -> None:
        first = self.first.get(item)
        out.append(t - first if first is not None and first <= t else -1)
        lo = t - window_ms
        out.append(sum(lo < seen <= t for seen in self.first.values()))
        out.append(sum(lo < seen <= t for seen in self.last.values()))


_EMPTY_STREAM = _Stream()
_EMPTY_LINKS = _LinkSet()


class MemoryVelocity:
    """In-process velocity state for training and replays; not shared, not persisted."""

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._links: dict[str, _LinkSet] = {}

    async def observe(
        self, event_id: str, at_ms: int, tracks: Sequence[Track], links: Sequence[Link]
    ) -> tuple[int, ...]:
        return self.observe_now(event_id, at_ms, tracks, links)

    async def observe_many(self, events: Sequence[Observation]) -> list[tuple[int, ...]]:
        return [self.observe_now(*event) for event in events]

    def observe_now(self, event_id: str, at_ms: int, tracks: Sequence[Track], links: Sequence[Link]) -> tuple[int, ...]:
        """The synchronous core; offline loops may call it directly."""
        out: list[int] = []
        streams = self._streams
        for spec, key, value, tag, record in tracks:
            stream = streams.get(key)
            if record:
                if stream is None:
                    stream = streams[key] = _Stream()
                stream.add(at_ms, value, clean(tag) if "|" in tag else tag, event_id, spec.retention_ms)
            (stream or _EMPTY_STREAM).answer(spec, at_ms, event_id, out)
        for key, item, window_ms, retention_ms, record in links:
            link_set = self._links.get(key)
            if record:
                if link_set is None:
                    link_set = self._links[key] = _LinkSet()
                link_set.add(item, at_ms, retention_ms)
            (link_set or _EMPTY_LINKS).answer(item, window_ms, at_ms, out)
        return tuple(out)


# KEYS: one key per track, then two per link (first-seen, last-seen).
# ARGV: t, event id, n tracks, n links, then per track:
#   record, value, tag, retention, nc, counts.., ns, sums.., nd, distincts.., prev
# then per link: record, item, window, retention.
_OBSERVE = """
local t = tonumber(ARGV[1])
local eid = ARGV[2]
local ntracks = tonumber(ARGV[3])
local nlinks = tonumber(ARGV[4])
local grace = 86400000  -- TTL = retention + a day, so an idle key disappears on its own
local out = {}
local a = 5
local k = 1
local function parse(entry)
  local s1 = string.find(entry, '|', 1, true)
  local s2 = string.find(entry, '|', s1 + 1, true)
  return tonumber(string.sub(entry, 1, s1 - 1)), string.sub(entry, s1 + 1, s2 - 1), string.sub(entry, s2 + 1)
end
for _ = 1, ntracks do
  local key = KEYS[k]
  k = k + 1
  local record = ARGV[a] == '1'
  local value, tag, retention = ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  a = a + 4
  if record then
    local dup = false
    local same = redis.call('ZRANGEBYSCORE', key, t, t)
    for j = 1, #same do
      local _, _, other = parse(same[j])
      if other == eid then dup = true; break end
    end
    if not dup then redis.call('ZADD', key, t, value .. '|' .. tag .. '|' .. eid) end
    redis.call('ZREMRANGEBYSCORE', key, '-inf', t - retention)
    redis.call('PEXPIRE', key, retention + grace)
  end
  local nc = tonumber(ARGV[a])
  a = a + 1
  for i = 1, nc do
    out[#out + 1] = redis.call('ZCOUNT', key, string.format('(%.0f', t - tonumber(ARGV[a])), t)
    a = a + 1
  end
  local ns = tonumber(ARGV[a])
  local sum_w = {}
  for i = 1, ns do sum_w[i] = tonumber(ARGV[a + i]) end
  a = a + ns + 1
  local nd = tonumber(ARGV[a])
  local dist_w = {}
  for i = 1, nd do dist_w[i] = tonumber(ARGV[a + i]) end
  a = a + nd + 1
  if ns + nd > 0 then
    local widest = 0
    for i = 1, ns do if sum_w[i] > widest then widest = sum_w[i] end end
    for i = 1, nd do if dist_w[i] > widest then widest = dist_w[i] end end
    local rows = redis.call('ZRANGEBYSCORE', key, string.format('(%.0f', t - widest), t, 'WITHSCORES')
    local sums = {}
    local sets = {}
    local counts = {}
    for i = 1, ns do sums[i] = 0 end
    for i = 1, nd do sets[i] = {}; counts[i] = 0 end
    for j = 1, #rows, 2 do
      local v, g = parse(rows[j])
      local ts = tonumber(rows[j + 1])
      for i = 1, ns do if ts > t - sum_w[i] then sums[i] = sums[i] + v end end
      if g ~= '' then
        for i = 1, nd do
          if ts > t - dist_w[i] and not sets[i][g] then sets[i][g] = true; counts[i] = counts[i] + 1 end
        end
      end
    end
    for i = 1, ns do out[#out + 1] = sums[i] end
    for i = 1, nd do out[#out + 1] = counts[i] end
  end
  if ARGV[a] == '1' then
    local rows = redis.call('ZREVRANGEBYSCORE', key, t, '-inf', 'WITHSCORES', 'LIMIT', 0, 2)
    local prev = -1
    for j = 1, #rows, 2 do
      local _, _, other = parse(rows[j])
      if other ~= eid then prev = tonumber(rows[j + 1]); break end
    end
    out[#out + 1] = prev
  end
  a = a + 1
end
for _ = 1, nlinks do
  local first, last = KEYS[k], KEYS[k + 1]
  k = k + 2
  local record = ARGV[a] == '1'
  local item, window, retention = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  a = a + 4
  if record then
    local stale = redis.call('ZRANGEBYSCORE', last, '-inf', t - retention)
    for j = 1, #stale do
      redis.call('ZREM', first, stale[j])
      redis.call('ZREM', last, stale[j])
    end
    redis.call('ZADD', first, 'LT', t, item)
    redis.call('ZADD', last, 'GT', t, item)
    redis.call('PEXPIRE', first, retention + grace)
    redis.call('PEXPIRE', last, retention + grace)
  end
  local seen = redis.call('ZSCORE', first, item)
  if seen and tonumber(seen) <= t then out[#out + 1] = t - tonumber(seen) else out[#out + 1] = -1 end
  out[#out + 1] = redis.call('ZCOUNT', first, string.format('(%.0f', t - window), t)
  out[#out + 1] = redis.call('ZCOUNT', last, string.format('(%.0f', t - window), t)
end
return out
"""


class RedisVelocity:
    """Velocity state in Redis: one Lua call per event, so an observation is atomic and costs
    one round trip. Keys live under `prefix`; the script touches keys of many entities, so it
    needs a single Redis (not a cluster)."""

    def __init__(self, redis: Redis, *, prefix: str = "pm:fv:") -> None:
        self.redis = redis
        self.prefix = prefix
        self._script = redis.register_script(_OBSERVE)

    async def observe(
        self, event_id: str, at_ms: int, tracks: Sequence[Track], links: Sequence[Link]
    ) -> tuple[int, ...]:
        keys, args = self._call(event_id, at_ms, tracks, links)
        reply = await self._script(keys=keys, args=args)
        return tuple(int(x) for x in reply)

    async def observe_many(self, events: Sequence[Observation]) -> list[tuple[int, ...]]:
        """One pipelined round trip; Redis runs the scripts one after another in this order,
        so each event sees the ones before it exactly as with one call per event."""
        if not events:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for event in events:
                keys, args = self._call(*event)
                await self._script(keys=keys, args=args, client=pipe)
            replies = await pipe.execute()
        return [tuple(int(x) for x in reply) for reply in replies]

    def _call(
        self, event_id: str, at_ms: int, tracks: Sequence[Track], links: Sequence[Link]
    ) -> tuple[list[str], list[str | int]]:
        p = self.prefix
        keys: list[str] = []
        args: list[str | int] = [at_ms, event_id, len(tracks), len(links)]
        for spec, key, value, tag, record in tracks:
            keys.append(p + key)
            args += [1 if record else 0, value, clean(tag), spec.retention_ms]
            args.append(len(spec.count_windows_ms))
            args += spec.count_windows_ms
            args.append(len(spec.sum_windows_ms))
            args += spec.sum_windows_ms
            args.append(len(spec.distinct_windows_ms))
            args += spec.distinct_windows_ms
            args.append(1 if spec.want_prev else 0)
        for key, item, window_ms, retention_ms, record in links:
            keys += [f"{p}{key}:first", f"{p}{key}:last"]
            args += [1 if record else 0, item, window_ms, retention_ms]
        return keys, args
