"""Sliding-window velocity state on event time, behind one protocol with two stores.

`MemoryVelocity` serves training and replays (fast, in-process); `RedisVelocity`
(velocity_redis.py) serves online scoring (shared by every fraud_svc replica). Both implement
the same arithmetic on integers, so the same event sequence yields the same numbers;
tests/fraud pin that.

An observation names *tracks* (a timestamped stream under a key, e.g. a member's purchases)
and *links* (a first/last-seen set under a key, e.g. a member's devices). Windows are
half-open on event time, (t - w, t], and include the event being observed, so a limit such
as "at most 20 purchases per 10 minutes" reads the count directly. Recording is idempotent
per event: an entry is identified by its event id and event time, so observing the same event
twice (a retry, a replay) records it once and answers from state that includes it once. No
separate "seen" set is kept, so nothing outlives the windows.

A track's retention is at least its widest window. Entries are kept for the retention plus
`late_ms` behind the newest event recorded under the key (trimmed when an event is recorded),
so an event arriving up to `late_ms` after newer ones still finds every window whole; a key's
TTL in Redis is that plus a day, so memory stays bounded by traffic in that span.
"""

from __future__ import annotations

from bisect import bisect_left as _left
from bisect import bisect_right as _right
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol


@dataclass(frozen=True, slots=True)
class TrackSpec:
    """What one stream answers: counts, integer sums and distinct tags per window (ms)."""

    count_windows_ms: tuple[int, ...] = ()
    sum_windows_ms: tuple[int, ...] = ()
    distinct_windows_ms: tuple[int, ...] = ()
    want_prev: bool = False
    retention_ms: int = 86_400_000  # no window reaches further back
    late_ms: int = 0  # how late an event may arrive and still find its windows whole
    # Derived once: the answer of an empty stream, and the narrowest window (for a fast path).
    empty_answer: tuple[int, ...] = field(init=False, repr=False, compare=False)
    narrowest_ms: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        windows = (*self.count_windows_ms, *self.sum_windows_ms, *self.distinct_windows_ms)
        if any(w <= 0 or w > self.retention_ms for w in windows):
            raise ValueError("every window must be positive and within the retention")
        if self.late_ms < 0:
            raise ValueError("late_ms must not be negative")
        zeros = (0,) * (len(windows))
        object.__setattr__(self, "empty_answer", (*zeros, -1) if self.want_prev else zeros)
        object.__setattr__(self, "narrowest_ms", min(windows, default=self.retention_ms))

    @property
    def kept_ms(self) -> int:
        """How long entries are kept behind the newest event recorded under the key."""
        return self.retention_ms + self.late_ms

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
        numbers. The previous entry is answered if it lies within the retention of this event
        or of the newest entry under the key: what the key keeps past its retention, for late
        events, changes no answer of events observed in order."""
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

    def add(self, t: int, value: int, tag: str, eid: str, kept_ms: int) -> None:
        ts = self.ts
        same = _left(ts, t)
        if eid in self.eids[same : _right(ts, t, same)]:
            pass  # recorded already; still trimmed below, as the Redis script trims on a duplicate
        elif not ts or ts[-1] <= t:
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
        cut = _right(ts, t - kept_ms)
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
            if 0 <= prev <= t - spec.retention_ms and ts[-1] - prev >= spec.retention_ms:
                prev = -1  # kept only for late events: in order it would have been trimmed
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
                stream.add(at_ms, value, clean(tag) if "|" in tag else tag, event_id, spec.kept_ms)
            (stream or _EMPTY_STREAM).answer(spec, at_ms, event_id, out)
        for key, item, window_ms, retention_ms, record in links:
            link_set = self._links.get(key)
            if record:
                if link_set is None:
                    link_set = self._links[key] = _LinkSet()
                link_set.add(item, at_ms, retention_ms)
            (link_set or _EMPTY_LINKS).answer(item, window_ms, at_ms, out)
        return tuple(out)
