"""Velocity state in Redis (velocity.py has the protocol, the specs and the in-process store):
online scoring shared by every fraud_svc replica, with the same arithmetic as MemoryVelocity
(tests/fraud/test_velocity.py pins the parity)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Sequence

from redis.asyncio import Redis

from fraud_svc.velocity import Link, Observation, Track, TrackSpec, clean

# One call observes a chunk of events in order. ARGV[1] is JSON:
#   [prefix, fetch rows, specs, events]
#   spec:  [kept, ttl, [count windows], [sum windows], [distinct windows], want prev,
#           widest window, fetch rows or not, widest sum/distinct window, retention,
#           counts distinct tags from the tag set or not (a distinct window wider than every
#           sum window: else the sums read that window anyway)]
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

-- Doubles hold every integer below 2^53, so a window of values none of them negative that sums
-- below it was summed exactly. One that sums from 2^53 on, or holds a negative value (its
-- partial sums may pass 2^53 on the way to a small total), is summed again exactly: each
-- value's sign, high and low seven digits apart (values are whole and at most 10^15 in size:
-- fraud_svc refuses others), the total written out as sign and digits.
local function exact_sum(rows, scores, lo)
  local high, low = 0, 0
  for j = 1, #scores do
    if scores[j] <= lo then break end
    local sign, digits = match(rows[2 * j - 1], '^(-?)(%d+)|')
    local n = #digits
    local h, l = 0, tonumber(digits)
    if n > 7 then h, l = tonumber(sub(digits, 1, n - 7)), tonumber(sub(digits, n - 6)) end
    if sign == '-' then high, low = high - h, low - l else high, low = high + h, low + l end
  end
  high = high + math.floor(low / 1e7)
  low = low % 1e7  -- now 0 <= low < 1e7 and the total is high * 1e7 + low
  local sign = ''
  if high < 0 then
    sign = '-'
    if low > 0 then high, low = -high - 1, 1e7 - low else high = -high end
  end
  if high == 0 then return format('%s%.0f', sign, low) end
  return format('%s%.0f%07.0f', sign, high, low)
end

-- Sums and distinct tags over rows (member, score; newest first) newer than t - widest.
local function sums_and_distincts(out, rows, scores, sum_w, dist_w, widest)
  local ns, nd = #sum_w, #dist_w
  local sums, sets, counts = {}, {}, {}
  for i = 1, ns do sums[i] = 0 end
  for i = 1, nd do sets[i] = {}; counts[i] = 0 end
  local lo = t - widest
  local signed = false
  for j = 1, #scores do
    local at = scores[j]
    if at <= lo then break end
    local v, g = parse(rows[2 * j - 1])
    if v < 0 then signed = true end
    for i = 1, ns do if at > t - sum_w[i] then sums[i] = sums[i] + v end end
    if g ~= '' then
      for i = 1, nd do
        if at > t - dist_w[i] and not sets[i][g] then sets[i][g] = true; counts[i] = counts[i] + 1 end
      end
    end
  end
  for i = 1, ns do
    if signed or sums[i] >= 9007199254740992 then
      out[#out + 1] = exact_sum(rows, scores, t - sum_w[i])
    else
      out[#out + 1] = exact(sums[i])
    end
  end
  for i = 1, nd do out[#out + 1] = counts[i] end
end

-- A busy track with distinct windows (its widest window holds more than one read: a carrier's
-- IP, a shop's device) keeps beside it each tag's newest time (the member '' at +inf marking
-- it built), so an event at or after every entry counts distinct tags with ZCOUNT instead of
-- reading the whole window in Lua. Built from the entries the first time the key is found
-- busy, kept up by every recorded event while it exists (PEXPIRE answers whether it does: the
-- one extra call a quiet key pays), dropped when an entry moves (an event id seen again at
-- another time: a tag's newest time may then be an entry's old one), and expired with the
-- track. Its key lies under '#g:', where no track key can reach (a track key ends in text a
-- caller chose: a device named 'kiosk:g' must not be the device 'kiosk's tag set).
local function tags_key(key)
  return prefix .. '#g:' .. sub(key, #prefix + 1)
end

local function tags_of(key, ttl)
  local tags = tags_key(key)
  if not call('ZSCORE', tags, '') then
    local all = call('ZRANGE', key, 0, -1, 'WITHSCORES')
    for j = 1, #all, 2 do
      local _, g = parse(all[j])
      if g ~= '' then call('ZADD', tags, 'GT', all[j + 1], g) end
    end
    call('ZADD', tags, '+inf', '')
    local left = call('PTTL', key)
    if left > 0 then call('PEXPIRE', tags, left) else call('PEXPIRE', tags, ttl) end
  end
  return tags
end

-- Whether this event is at ts in the track already (then it is not recorded again), and, when
-- the instant holds a pile, the pile set's member prefix. A pile is PILE or more events
-- at one instant on one key (a store's receipts in a file stamped by the day, a benchmark's):
-- their duplicate check reads the set beside the track ('#e:', members 'time|event id' scored
-- by time, the member 'time|' marking an instant's pile complete) instead of every entry at
-- that instant, which made a pile of n events cost n * n / 2 entry reads, all inside Redis's
-- one thread. The set loses what the track loses: trimmed when the track is, dropped when an
-- entry moves, and dropped when the track is found gone (expired before it: two specs with
-- different TTLs may share a key). A key without piles pays two calls more, when it is new.
local PILE = 16

local function piles_of(key)
  return prefix .. '#e:' .. sub(key, #prefix + 1)
end

local function seen_at(key, piles, ttl)
  local same = call('ZRANGEBYSCORE', key, ts, ts, 'LIMIT', 0, PILE)
  if #same < PILE then
    for j = 1, #same do
      if eid_of(same[j]) == eid then return true end
    end
    return false
  end
  local mark = format('%.0f|', t)
  if not call('ZSCORE', piles, mark) then
    local all = call('ZRANGEBYSCORE', key, ts, ts)
    for j = 1, #all do call('ZADD', piles, ts, mark .. eid_of(all[j])) end
    call('ZADD', piles, ts, mark)
  end
  call('PEXPIRE', piles, ttl)
  return call('ZSCORE', piles, mark .. eid) ~= false, mark
end

local function track(out, key, spec, value, tag, record)
  local count_w, sum_w, dist_w = spec[3], spec[4], spec[5]
  if record then
    -- A track that is not there (new, or expired) has no sets beside it: one left behind (a spec
    -- with a shorter TTL refreshed the track last) describes entries that are gone.
    local piles = piles_of(key)
    local fresh = call('PEXPIRE', key, spec[2]) == 0
    if fresh then call('DEL', piles, tags_key(key)) end
    local dup, mark = seen_at(key, piles, spec[2])
    local moved = false
    if not dup then
      moved = call('ZADD', key, ts, value .. '|' .. tag .. '|' .. eid) == 0
      if moved then
        call('DEL', piles)  -- an entry left another instant's pile: rebuilt when next needed
      elseif mark then
        call('ZADD', piles, ts, mark .. eid)
      end
    end
    if call('ZREMRANGEBYSCORE', key, '-inf', through(spec[1])) > 0 then
      call('ZREMRANGEBYSCORE', piles, '-inf', through(spec[1]))
    end
    if fresh then call('PEXPIRE', key, spec[2]) end
    -- Kept by every spec with distinct windows that records here, whether or not it counts from
    -- the set itself (two specs may share a key).
    local tags = tags_key(key)
    if #dist_w > 0 and moved then
      call('DEL', tags)  -- rebuilt from the entries when next needed
    elseif #dist_w > 0 and call('PEXPIRE', tags, spec[2]) == 1 then
      if not dup and tag ~= '' then call('ZADD', tags, 'GT', ts, tag) end
      call('ZREMRANGEBYSCORE', tags, '-inf', through(spec[1]))
    end
  end
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
  local widest, tags = spec[9], nil
  if spec[11] and t - widest < floor and call('ZCOUNT', key, '(' .. ts, '+inf') == 0 then
    -- Busy, and nothing after this event: a tag was seen in (t - w, t] when its newest time
    -- lies there.
    tags, dist_w, widest = tags_of(key, spec[2]), {}, 0
    for i = 1, #sum_w do if sum_w[i] > widest then widest = sum_w[i] end end
  end
  if widest > 0 then
    if t - widest >= floor then
      sums_and_distincts(out, rows, scores, sum_w, dist_w, widest)
    else
      local all = call('ZREVRANGEBYSCORE', key, ts, after(widest), 'WITHSCORES')
      sums_and_distincts(out, all, scores_of(all), sum_w, dist_w, widest)
    end
  end
  if tags then
    for i = 1, #spec[5] do out[#out + 1] = call('ZCOUNT', tags, after(spec[5][i]), ts) end
  end
  if spec[6] then
    local top = rows  -- the newest two entries at or before t, however old
    if n < 2 then top = call('ZREVRANGEBYSCORE', key, ts, '-inf', 'WITHSCORES', 'LIMIT', 0, 2) end
    local prev = -1
    for j = 1, math.min(#top, 3), 2 do
      if eid_of(top[j]) ~= eid then prev = tonumber(top[j + 1]); break end
    end
    if prev >= 0 and prev <= t - spec[10] then  -- kept only for late events? (as MemoryVelocity)
      local newest = call('ZREVRANGE', key, 0, 0, 'WITHSCORES')
      if tonumber(newest[2]) - prev >= spec[10] then prev = -1 end
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

# A key's TTL is how long it keeps entries plus a day, so an idle key disappears on its own.
_GRACE_MS = 86_400_000


class RedisVelocity:
    """Velocity state in Redis. Events go in chunks of `chunk_events`, one Lua call a chunk.
    Redis runs a script whole, so every event is observed atomically, and one connection's
    calls in the order sent, so every event sees the ones before it exactly as with one call per
    event; no call holds Redis for long. Keys live under `prefix`; the script touches keys of
    many entities, so it needs a single Redis (not a cluster)."""

    def __init__(self, redis: Redis, *, prefix: str = "pm:fv:", chunk_events: int = 25, fetch_rows: int = 32) -> None:
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
    tag_set = max(spec.distinct_windows_ms, default=0) > max(spec.sum_windows_ms, default=0)
    return (spec.kept_ms, str(spec.kept_ms + _GRACE_MS), spec.count_windows_ms, spec.sum_windows_ms,
            spec.distinct_windows_ms, spec.want_prev, max((*spec.count_windows_ms, *sum_or_distinct), default=0),
            bool(sum_or_distinct or spec.want_prev), max(sum_or_distinct, default=0), spec.retention_ms,
            tag_set)  # fmt: skip


def _answers(reply: bytes | str) -> list[tuple[int, ...]]:
    text = reply.decode() if isinstance(reply, bytes) else reply
    return [tuple(map(int, part.split(","))) if part else () for part in text.split(";")]
