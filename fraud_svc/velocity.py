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

import json
from bisect import bisect_left as _left
from bisect import bisect_right as _right
from collections.abc import AsyncGenerator, Sequence
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

    def observe_stream(self, events: Sequence[Observation]) -> AsyncGenerator[list[tuple[int, ...]], None]:
        """`observe_many` answered a chunk at a time, in order, as the store gets through them,
        so a caller can work on one chunk while the store computes the next."""
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

    async def observe_stream(self, events: Sequence[Observation]) -> AsyncGenerator[list[tuple[int, ...]], None]:
        if events:
            yield [self.observe_now(*event) for event in events]

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


# One call observes a chunk of events in order. ARGV[1] is JSON:
#   [prefix, fetch rows, specs, events]
#   spec:  [retention, ttl, [count windows], [sum windows], [distinct windows], want prev,
#           widest window, fetch rows or not, widest sum/distinct window]
#   event: [event id, t, [spec number, key, value, tag, record, ...],
#           [key, item, window, retention, ttl, record, ...]]
# Times and TTLs come as text and each window's bound is formatted once per event: turning
# numbers into command arguments (printf) and back (strtod) was a quarter of the script's time.
# The reply is one string, each event's numbers joined by ',' and events by ';': it parses
# far faster on the client than thousands of integer replies.
#
# A track entry is the sorted-set member "value|tag|event id" scored by its time, as always.
# After recording, one ZREVRANGEBYSCORE reads the newest `fetch rows` entries of the widest
# window; a window whose lower bound is not below the oldest of them lies wholly inside that
# read and is answered from it (most keys are that sparse); a wider one asks Redis with ZCOUNT
# or a second range read. A track of counts alone only uses ZCOUNT. The numbers are the same
# either way.
_OBSERVE = """
local batch = cjson.decode(ARGV[1])
local prefix, limit, specs, events = batch[1], batch[2], batch[3], batch[4]
local call = redis.call
local find, sub, match, format = string.find, string.sub, string.match, string.format

-- The event being observed: its id, its time as text and as a number, and the bounds
-- '(t - w' and 't - r' formatted so far.
local eid, ts, t, above, upto

local function after(w)
  local bound = above[w]
  if not bound then bound = format('(%.0f', t - w); above[w] = bound end
  return bound
end

local function through(r)
  local bound = upto[r]
  if not bound then bound = format('%.0f', t - r); upto[r] = bound end
  return bound
end

local function eid_of(entry)
  local s1 = find(entry, '|', 1, true)
  return sub(entry, find(entry, '|', s1 + 1, true) + 1)
end

local function parse(entry)  -- value and tag: neither holds a '|'
  local v, g = match(entry, '^([^|]*)|([^|]*)|')
  return tonumber(v), g
end

-- table.concat prints numbers with 14 significant digits: wider integers go as text.
local function exact(x)
  if x >= 1e14 or x <= -1e14 then return format('%.0f', x) end
  return x
end

local function scores_of(rows)
  local scores = {}
  for j = 2, #rows, 2 do scores[j / 2] = tonumber(rows[j]) end
  return scores
end

-- Sums and distinct tags over rows (member, score; newest first) newer than t - widest.
local function sums_and_distincts(out, rows, scores, sum_w, dist_w, widest)
  local ns, nd = #sum_w, #dist_w
  local sums, sets, counts = {}, {}, {}
  for i = 1, ns do sums[i] = 0 end
  for i = 1, nd do sets[i] = {}; counts[i] = 0 end
  local lo = t - widest
  for j = 1, #scores do
    local at = scores[j]
    if at <= lo then break end
    local v, g = parse(rows[2 * j - 1])
    for i = 1, ns do if at > t - sum_w[i] then sums[i] = sums[i] + v end end
    if g ~= '' then
      for i = 1, nd do
        if at > t - dist_w[i] and not sets[i][g] then sets[i][g] = true; counts[i] = counts[i] + 1 end
      end
    end
  end
  for i = 1, ns do out[#out + 1] = exact(sums[i]) end
  for i = 1, nd do out[#out + 1] = counts[i] end
end

local function track(out, key, spec, value, tag, record)
  if record then
    local dup = false
    local same = call('ZRANGEBYSCORE', key, ts, ts)
    for j = 1, #same do
      if eid_of(same[j]) == eid then dup = true; break end
    end
    if not dup then call('ZADD', key, ts, value .. '|' .. tag .. '|' .. eid) end
    call('ZREMRANGEBYSCORE', key, '-inf', through(spec[1]))
    call('PEXPIRE', key, spec[2])
  end
  local count_w, sum_w, dist_w = spec[3], spec[4], spec[5]
  if not spec[8] then  -- counts alone: ZCOUNT is O(log n) however busy the key
    for i = 1, #count_w do out[#out + 1] = call('ZCOUNT', key, after(count_w[i]), ts) end
    return
  end
  local rows = call('ZREVRANGEBYSCORE', key, ts, after(spec[7]), 'WITHSCORES', 'LIMIT', 0, limit)
  local scores = scores_of(rows)
  local n = #scores
  local floor = -1 / 0  -- every entry of the widest window scored above `floor` is in rows
  if n == limit then floor = scores[n] end
  for i = 1, #count_w do
    local lo = t - count_w[i]
    if lo >= floor then
      local c = 0
      for j = 1, n do
        if scores[j] > lo then c = c + 1 else break end
      end
      out[#out + 1] = c
    else
      out[#out + 1] = call('ZCOUNT', key, after(count_w[i]), ts)
    end
  end
  local widest = spec[9]
  if widest > 0 then
    if t - widest >= floor then
      sums_and_distincts(out, rows, scores, sum_w, dist_w, widest)
    else
      local all = call('ZREVRANGEBYSCORE', key, ts, after(widest), 'WITHSCORES')
      sums_and_distincts(out, all, scores_of(all), sum_w, dist_w, widest)
    end
  end
  if spec[6] then
    local top = rows  -- the newest two entries at or before t, however old
    if n < 2 then top = call('ZREVRANGEBYSCORE', key, ts, '-inf', 'WITHSCORES', 'LIMIT', 0, 2) end
    local prev = -1
    for j = 1, math.min(#top, 3), 2 do
      if eid_of(top[j]) ~= eid then prev = tonumber(top[j + 1]); break end
    end
    out[#out + 1] = exact(prev)
  end
end

local function link(out, key, item, window, retention, ttl, record)
  local first, last = key .. ':first', key .. ':last'
  if record then
    local stale = call('ZRANGEBYSCORE', last, '-inf', through(retention))
    for j = 1, #stale do
      call('ZREM', first, stale[j])
      call('ZREM', last, stale[j])
    end
    call('ZADD', first, 'LT', ts, item)
    call('ZADD', last, 'GT', ts, item)
    call('PEXPIRE', first, ttl)
    call('PEXPIRE', last, ttl)
  end
  local seen = call('ZSCORE', first, item)
  if seen and tonumber(seen) <= t then out[#out + 1] = exact(t - tonumber(seen)) else out[#out + 1] = -1 end
  out[#out + 1] = call('ZCOUNT', first, after(window), ts)
  out[#out + 1] = call('ZCOUNT', last, after(window), ts)
end

local answers = {}
for e = 1, #events do
  local event = events[e]
  eid, ts = event[1], event[2]
  t, above, upto = tonumber(ts), {}, {}
  local tracks, links, out = event[3], event[4], {}
  for a = 1, #tracks, 5 do
    track(out, prefix .. tracks[a + 1], specs[tracks[a]], tracks[a + 2], tracks[a + 3], tracks[a + 4])
  end
  for a = 1, #links, 6 do
    link(out, prefix .. links[a], links[a + 1], links[a + 2], links[a + 3], links[a + 4], links[a + 5])
  end
  answers[e] = table.concat(out, ',')
end
return table.concat(answers, ';')
"""

# A key's TTL is its retention plus a day, so an idle key disappears on its own.
_GRACE_MS = 86_400_000


class RedisVelocity:
    """Velocity state in Redis. Events go in chunks of `chunk_events`, one Lua call a chunk.
    Redis runs a script whole, so every event is observed atomically, and one connection's
    calls in the order sent, so every event sees the ones before it exactly as with one call per
    event; no call holds Redis for long. Keys live under `prefix`; the script touches keys of
    many entities, so it needs a single Redis (not a cluster)."""

    def __init__(
        self, redis: Redis, *, prefix: str = "pm:fv:", chunk_events: int = 25, fetch_rows: int = 32
    ) -> None:
        if chunk_events < 1 or fetch_rows < 1:
            raise ValueError("chunk_events and fetch_rows must be positive")
        self.redis = redis
        self.prefix = prefix
        self.chunk_events = chunk_events
        self.fetch_rows = fetch_rows
        self._script = redis.register_script(_OBSERVE)

    async def observe(
        self, event_id: str, at_ms: int, tracks: Sequence[Track], links: Sequence[Link]
    ) -> tuple[int, ...]:
        reply = await self._script(keys=[], args=[self._payload([(event_id, at_ms, tracks, links)])])
        return _answers(reply)[0]

    async def observe_many(self, events: Sequence[Observation]) -> list[tuple[int, ...]]:
        return [answer async for chunk in self.observe_stream(events) for answer in chunk]

    async def observe_stream(self, events: Sequence[Observation]) -> AsyncGenerator[list[tuple[int, ...]], None]:
        step = self.chunk_events
        if len(events) <= step:
            if events:
                yield _answers(await self._script(keys=[], args=[self._payload(events)]))
            return
        # Pipelined by hand on a connection of its own (so nothing else reads its replies): the
        # next chunk waits in Redis behind the one it computes, so Redis keeps working while this
        # process encodes a chunk or the caller scores the answers of the one before.
        connection = self.redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.connect()
            await connection.send_command("SCRIPT", "LOAD", _OBSERVE)
            sha = await connection.read_response()
            await connection.send_command("EVALSHA", sha, 0, self._payload(events[:step]))
            for start in range(step, len(events) + step, step):
                if start < len(events):
                    await connection.send_command("EVALSHA", sha, 0, self._payload(events[start : start + step]))
                yield _answers(await connection.read_response())
        finally:
            await connection.disconnect()

    def _payload(self, events: Sequence[Observation]) -> str:
        numbers: dict[int, int] = {}  # id(spec) -> its 1-based number in this payload
        specs: list[tuple[object, ...]] = []
        rows: list[tuple[str, str, list[object], list[object]]] = []
        for event_id, at_ms, tracks, links in events:
            flat_tracks: list[object] = []
            for spec, key, value, tag, record in tracks:
                number = numbers.get(id(spec))
                if number is None:
                    number = numbers[id(spec)] = len(specs) + 1
                    specs.append(_spec_args(spec))
                flat_tracks += (number, key, str(value), clean(tag), bool(record))
            flat_links: list[object] = []
            for link in links:
                flat_links += (link.key, link.item, link.window_ms, link.retention_ms, str(link.retention_ms + _GRACE_MS),
                               bool(link.record))  # fmt: skip
            rows.append((event_id, str(at_ms), flat_tracks, flat_links))
        return json.dumps((self.prefix, self.fetch_rows, specs, rows), ensure_ascii=False, separators=(",", ":"))


def _spec_args(spec: TrackSpec) -> tuple[object, ...]:
    """A spec as the script reads it (see the layout above _OBSERVE)."""
    sum_or_distinct = (*spec.sum_windows_ms, *spec.distinct_windows_ms)
    return (spec.retention_ms, str(spec.retention_ms + _GRACE_MS), spec.count_windows_ms, spec.sum_windows_ms,
            spec.distinct_windows_ms, spec.want_prev, max((*spec.count_windows_ms, *sum_or_distinct), default=0),
            bool(sum_or_distinct or spec.want_prev), max(sum_or_distinct, default=0))  # fmt: skip


def _answers(reply: bytes | str) -> list[tuple[int, ...]]:
    text = reply.decode() if isinstance(reply, bytes) else reply
    return [tuple(map(int, part.split(","))) if part else () for part in text.split(";")]
