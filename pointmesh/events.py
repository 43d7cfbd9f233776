"""The event bus every producer and consumer goes through, and the names of its topics.

One interface, two implementations: Redis Streams (the embedded default, `make up`) and
Apache Kafka (production; `kafka_bus.py`), chosen by POINTMESH_EVENT_BUS. Both give:
* `publish`: events in order per partition key (the member id), durable when it returns;
* `subscribe`: a broadcast tail, every subscriber sees every event (gateway websockets);
  `latest_position` pins "now" to a position, so a tail that reconnects resumes there;
* `group`: a consumer group, each event to one member of the group, committed after
  processing, redelivered if never committed (at-least-once; handlers dedupe on event_id);
* `rewind`: moves a group back to the first event at or after a time (replay).

Every event carries a schema header `<message type>/<major>`; consumers refuse a major
version they do not know (consumers.py sends it to the dead-letter topic).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from pointmesh.redis_client import BUS_CONNECTIONS, open_redis

log = logging.getLogger(__name__)

LEDGER_EVENTS = "pointmesh.ledger.events"
# Fraud and risk alerts for the ops team (OpsAlert messages), keyed by member id.
OPS_ALERTS = "pointmesh.ops.alerts"
# Funding source of the rewards rules_svc posts for achievements, streaks and challenges; the
# gateway shows such an earn to the member as an achievement ("<item id>: <name>" reference).
GAMIFICATION_FUNDING = "gamification"
# Purchases handed over in bulk (RecordPurchaseRequest messages), keyed by member id.
INGEST_PURCHASES = "pointmesh.ingest.purchases"
TOPICS = (LEDGER_EVENTS, OPS_ALERTS, INGEST_PURCHASES)
SCHEMA_MAJOR = 1
MAX_BLOCK_MS = 1000  # the longest a read waits on Redis Streams for something new
# A bus call that hears nothing for this long is on a dead connection (bus_redis). Well above
# MAX_BLOCK_MS, and above what a publish of a full relay batch takes on a loaded box.
BUS_SOCKET_TIMEOUT_S = 5.0


def dead_letter_topic(topic: str) -> str:
    return f"{topic}.dlq"


# The largest event either bus takes (key, id, type, schema and payload; headers below). Kafka's
# producer refuses a record over its max request size (1 MiB) only when that record's turn
# comes, after the batch's earlier records were queued, and they went out: a publish must be
# all or nothing, so every event is measured first. A little under 1 MiB leaves room for Kafka's
# record framing; Redis takes the same limit so a topic's events do not depend on the bus.
MAX_EVENT_BYTES = 1_000_000  # key, id, type, schema and payload
# Headers are counted apart, against their own room, so the headers a dead-letter copy or a
# redriven one adds (the reason, where it came from) never take an event that was published
# over the limit: the copy could not be published, and its group would read the poison again
# for ever. MAX_EVENT_BYTES + HEADER_ROOM stays under Kafka's 1 MiB request with its framing.
HEADER_ROOM = 16_384


class EventTooLarge(ValueError):
    """An event over MAX_EVENT_BYTES: no bus takes it, so nothing of its batch is sent."""


@dataclass(frozen=True, slots=True)
class OutgoingEvent:
    key: str  # partition key: the member id, so one member's events stay in order
    event_id: str
    event_type: str
    payload: bytes  # a serialised protobuf message
    schema: str = f"pointmesh.v1/{SCHEMA_MAJOR}"
    # Extra headers (the dead-letter topic records why a message landed there).
    headers: tuple[tuple[str, str], ...] = ()


def _encoded(texts: Iterable[str]) -> int:
    return sum(len(t.encode(errors="replace")) for t in texts)


def header_bytes(headers: Iterable[tuple[str, str]]) -> int:
    """Headers' size as HEADER_ROOM counts it: names and values, as sent."""
    return _encoded(t for h in headers for t in h)


def event_bytes(event: OutgoingEvent) -> int:
    """The event's size as MAX_EVENT_BYTES counts it: its fields and payload, as sent."""
    return len(event.payload) + _encoded((event.key, event.event_id, event.event_type, event.schema))


def refuse_oversize(topic: str, events: Sequence[OutgoingEvent]) -> None:
    """Raises EventTooLarge, naming the first event over MAX_EVENT_BYTES (or with headers over
    HEADER_ROOM), before anything is sent."""
    for event in events:
        size, headers = event_bytes(event), header_bytes(event.headers)
        if size > MAX_EVENT_BYTES or headers > HEADER_ROOM:
            what = f"is {size} bytes" if size > MAX_EVENT_BYTES else f"has {headers} bytes of headers"
            limit = MAX_EVENT_BYTES if size > MAX_EVENT_BYTES else HEADER_ROOM
            raise EventTooLarge(
                f"event {event.event_id or '(no id)'} ({event.event_type or 'no type'}, key {event.key[:40]!r}) "
                f"{what}, over the {limit} an event on {topic} may have; none of its batch "
                f"of {len(events)} was sent"
            )


# A major version of more digits (leading zeros aside) is no version any consumer knows, and
# int() of thousands of digits raises.
_MAX_MAJOR_DIGITS = 9


@dataclass(frozen=True, slots=True)
class BusMessage:
    position: str  # Redis: the stream id; Kafka: "partition:offset"
    key: str
    event_id: str
    event_type: str
    payload: bytes
    schema: str = ""
    timestamp_ms: int = 0
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def schema_major(self) -> int | None:
        """The major version in the schema header, or None when it is missing or unreadable.
        ASCII digits only: str.isdigit() also says yes to "²" (which int() refuses) and to other
        scripts' digits (which int() reads), and no producer writes either."""
        _, _, major = self.schema.rpartition("/")
        if not (major.isascii() and major.isdigit()):
            return None
        significant = major.lstrip("0") or "0"
        return int(significant) if len(significant) <= _MAX_MAJOR_DIGITS else None


class GroupConsumer(Protocol):
    async def poll(self, *, max_messages: int = 100, block_ms: int = 1000) -> list[BusMessage]: ...
    async def commit(self, messages: Sequence[BusMessage]) -> None: ...
    async def close(self) -> None: ...


class EventBus(Protocol):
    async def publish(self, topic: str, events: Sequence[OutgoingEvent]) -> None: ...
    def subscribe(self, topic: str, after: str = "$", *, block_ms: int = 1000) -> AsyncIterator[BusMessage]: ...
    async def latest_position(self, topic: str) -> str:
        """A position for `subscribe` that means "after what the topic holds now" and, unlike
        "$", stays put as events arrive; "$" itself where the bus cannot name one."""
        ...

    def position_at(self, when: datetime) -> str:
        """A position for `subscribe` that means "after what was added before `when`", named
        without asking the bus (which may be away); "$" where the bus cannot name one."""
        ...

    def group(self, topic: str, group: str, consumer: str) -> GroupConsumer: ...
    async def rewind(self, topic: str, group: str, when: datetime) -> None: ...
    async def ensure_topics(self, topics: Sequence[str]) -> None: ...
    async def ping(self) -> None:
        """Raises when the bus cannot be reached (readiness checks)."""
        ...

    async def close(self) -> None: ...


# Redis Streams ------------------------------------------------------------------------------

_STANDARD = {b"key", b"event_id", b"type", b"payload", b"schema"}


# KEYS[1] the stream, ARGV[1] maxlen. A group that has a consumer needs everything from its
# oldest pending entry, or else from its last delivered one, on; a group with no consumer
# (created by a rewind and never read, a typo) holds nothing back, or one mistyped name would
# keep every event for ever. Entries older than every need go, at most the excess over maxlen.
_TRIM = """
local key, maxlen, cap = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local len = redis.call('XLEN', key)
if len <= maxlen then return 0 end
-- IDs compared as text (digits: shorter is smaller): Lua numbers are doubles, and a millisecond
-- part past 2^53 would round.
local function num_before(a, b) return #a < #b or (#a == #b and a < b) end
local function before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if am ~= bm then return num_before(am, bm) end
  return num_before(as, bs)
end
local needed = nil
for _, group in ipairs(redis.call('XINFO', 'GROUPS', key)) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  if tonumber(info['consumers']) > 0 then
    local need = info['last-delivered-id']
    if tonumber(info['pending']) > 0 then
      local oldest = redis.call('XPENDING', key, info['name'])[2]
      if before(oldest, need) then need = oldest end
    end
    if needed == nil or before(need, needed) then needed = need end
  end
end
local upto = '+'
if needed ~= nil then
  if needed == '0-0' then return 0 end
  upto = '(' .. needed
end
local n = math.min(len - maxlen, cap)
local old = redis.call('XRANGE', key, '-', upto, 'COUNT', n + 1)
if #old == 0 then return 0 end
local keep_from = needed
if #old > n then keep_from = old[n + 1][1] end
if keep_from == nil then return redis.call('XTRIM', key, 'MAXLEN', len - #old) end
return redis.call('XTRIM', key, 'MINID', keep_from)
"""

# Entries one trim script drops at most (it reads them: ~30 ms for 2,000 of 2 KB), and scripts a
# publish runs at most, so a backlog a lagging group left catches up 40,000 at a time.
TRIM_SLICE, TRIM_ROUNDS = 2_000, 20

_STREAM_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")


def _is_stream_id(text: str) -> bool:
    return _STREAM_ID.fullmatch(text) is not None and all(int(part) < 2**64 for part in text.split("-"))


def _text(value: bytes) -> str:
    # A raw XADD can write any bytes: an entry must reach its handler (and the dead-letter topic
    # if need be), never fail the poll, which fails the whole batch for ever. As the Kafka bus
    # reads a header that is not UTF-8: with replacement characters.
    return value.decode(errors="replace")


def _message(position: bytes | str, fields: dict[bytes, bytes]) -> BusMessage:
    pos = position.decode() if isinstance(position, bytes) else position
    return BusMessage(
        position=pos,
        key=_text(fields.get(b"key", b"")),
        event_id=_text(fields.get(b"event_id", b"")),
        event_type=_text(fields.get(b"type", b"")),
        payload=fields.get(b"payload", b""),
        schema=_text(fields.get(b"schema", b"")),
        timestamp_ms=int(pos.split("-", 1)[0]),
        headers=tuple((_text(k), _text(v)) for k, v in fields.items() if k not in _STANDARD),
    )


class RedisStreamBus:
    """Streams named like the topics; groups are Redis consumer groups created on first use."""

    def __init__(
        self, redis: Redis, *, maxlen: int = 1_000_000, claim_idle_ms: int = 30_000, owns_client: bool = False,
        trim_every: int = 1000,
    ) -> None:  # fmt: skip
        self.redis = redis
        self.owns_client = owns_client
        # The newest `maxlen` events stay for replays; older ones go once every consumer group
        # has acknowledged them, never before (a lagging group keeps the stream longer).
        self.maxlen = maxlen
        self.trim_every = trim_every
        self._since_trim: dict[str, int] = {}
        self._trim = redis.register_script(_TRIM)
        # A message a consumer read and never acknowledged goes to another consumer of the
        # group after this long (the first one is presumed dead).
        self.claim_idle_ms = claim_idle_ms

    async def publish(self, topic: str, events: Sequence[OutgoingEvent]) -> None:
        """Appends events in order in one round trip; on a publisher's first batch to a topic
        and every `trim_every` events after, trims what nobody needs (a failed trim is logged:
        the events are published all the same). EventTooLarge, with nothing appended, for a
        batch with an event over MAX_EVENT_BYTES."""
        refuse_oversize(topic, events)
        async with self.redis.pipeline(transaction=False) as pipe:
            for ev in events:
                fields: dict[Any, Any] = {"key": ev.key, "event_id": ev.event_id, "type": ev.event_type,
                                          "payload": ev.payload, "schema": ev.schema, **dict(ev.headers)}  # fmt: skip
                pipe.xadd(topic, fields)
            await pipe.execute()
        since = self._since_trim.get(topic, self.trim_every) + len(events)
        self._since_trim[topic] = since
        if since >= self.trim_every:
            self._since_trim[topic] = 0
            try:
                await self.trim(topic)
            except RedisError:
                log.exception("trimming event stream %s failed; the next publish tries again", topic)

    async def trim(self, topic: str) -> int:
        """Drops events past the newest `maxlen` that every group reading the stream has
        acknowledged; returns how many went. XADD's own MAXLEN would drop them whether read or
        not: a backlog past the cap (a big ingest file, a consumer down for a day) vanished
        without a trace. One script, so concurrent publishers trimming at once see one length."""
        removed = 0
        for _ in range(TRIM_ROUNDS):  # a short script at a time: Redis serves others in between
            went = int(await self._trim(keys=[topic], args=[self.maxlen, TRIM_SLICE]))
            removed += went
            if went < TRIM_SLICE:
                break
        return removed

    async def subscribe(self, topic: str, after: str = "$", *, block_ms: int = 1000) -> AsyncIterator[BusMessage]:
        """Yields every message after `after` ("$" = only new ones, "0" = from the start, or a
        position this bus gave), forever. ValueError, before anything is read, for a position
        that is none of those."""
        position = after or "$"
        if position != "$" and not _is_stream_id(position):
            raise ValueError(f'{position!r} is not a stream position ("$", "0" or <ms>-<seq>)')
        if position == "$":
            position = await self.latest_position(topic)
        while True:
            batch: Any = await self.redis.xread({topic: position}, block=min(block_ms, MAX_BLOCK_MS), count=100)
            for _name, messages in batch or []:
                for pos, fields in messages:
                    msg = _message(pos, fields)
                    position = msg.position
                    yield msg

    async def latest_position(self, topic: str) -> str:
        """The id of the stream's newest entry ("0-0" for an empty or missing stream): reading
        after it yields exactly what is added from now on, however late the read comes."""
        last: Any = await self.redis.xrevrange(topic, count=1)
        return last[0][0].decode() if last else "0-0"

    def position_at(self, when: datetime) -> str:
        """Stream ids begin with Redis's clock in milliseconds: entries added from `when` on
        (by that clock) come after this one."""
        return f"{max(0, int(when.timestamp() * 1000) - 1)}-{2**64 - 1}"

    def group(self, topic: str, group: str, consumer: str) -> RedisGroupConsumer:
        return RedisGroupConsumer(self, topic, group, consumer)

    async def ensure_group(self, topic: str, group: str, start: str = "0") -> None:
        try:
            await self.redis.xgroup_create(topic, group, id=start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def rewind(self, topic: str, group: str, when: datetime) -> None:
        """The group's next message is the first one stamped at or after `when`."""
        await self.ensure_group(topic, group)
        ms = int(when.timestamp() * 1000)
        last = await self.redis.xinfo_stream(topic)
        last_id = last.get("last-generated-id", b"0-0")
        last_ms = int((last_id.decode() if isinstance(last_id, bytes) else str(last_id)).partition("-")[0])
        if ms > last_ms:  # a future time: from the next event on, as Kafka does (a later id would skip events)
            # The id read, not "$": an event added since has a larger id and is delivered.
            await self.redis.xgroup_setid(topic, group, last_id)
            return
        await self.redis.xgroup_setid(topic, group, f"{ms - 1}-18446744073709551615" if ms > 0 else "0")

    async def ensure_topics(self, topics: Sequence[str]) -> None:
        """Streams exist once written to; nothing to create ahead."""

    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        if self.owns_client:
            await self.redis.aclose()


class RedisGroupConsumer:
    """Reads its own unacknowledged messages when it starts, then new ones, and now and then
    takes over the ones a dead consumer of the group left.

    Like a Kafka consumer, a poll moves on past what the last poll returned, committed or not:
    a consumer whose handler failed is dropped and opened again (pointmesh.consumers.run_group),
    and the new one starts with what the old one read and never acknowledged. Looking for a
    dead consumer's messages costs a round trip; under load it is done once every half
    `claim_idle_ms` (they wait that long to be claimable in any case), and on every poll that
    follows one which found nothing new, so a quiet stream takes them over at once.
    """

    def __init__(self, bus: RedisStreamBus, topic: str, group: str, consumer: str) -> None:
        self.bus, self.topic, self.group_name, self.consumer = bus, topic, group, consumer
        self._ready = False
        self._own_pending = True  # until a read of them comes back empty
        self._claim_checked_at: float | None = None
        self._caught_up = False

    def _claim_due(self) -> bool:
        last = self._claim_checked_at
        return last is None or self._caught_up or time.monotonic() - last >= self.bus.claim_idle_ms / 2000

    async def poll(self, *, max_messages: int = 100, block_ms: int = 1000) -> list[BusMessage]:
        redis, topic, group = self.bus.redis, self.topic, self.group_name
        if not self._ready:
            await self.bus.ensure_group(topic, group)
            self._ready = True
        if self._own_pending:
            batch: Any = await redis.xreadgroup(group, self.consumer, {topic: "0"}, count=max_messages)
            messages = [(pos, f) for _n, ms in batch or [] for pos, f in ms if f]
            if messages:
                return [_message(pos, fields) for pos, fields in messages]
            self._own_pending = False
        if self._claim_due():
            claimed: Any = await redis.xautoclaim(topic, group, self.consumer, self.bus.claim_idle_ms, "0-0",
                                                  count=max_messages)  # fmt: skip
            messages = [(pos, f) for pos, f in claimed[1] if f]
            if messages:
                return [_message(pos, fields) for pos, fields in messages]  # and claims again next poll
            self._claim_checked_at = time.monotonic()
        batch = await redis.xreadgroup(group, self.consumer, {topic: ">"}, count=max_messages,
                                       block=min(block_ms, MAX_BLOCK_MS))  # fmt: skip
        messages = [(pos, f) for _n, ms in batch or [] for pos, f in ms if f]
        self._caught_up = not messages
        return [_message(pos, fields) for pos, fields in messages]

    async def commit(self, messages: Sequence[BusMessage]) -> None:
        if messages:
            await self.bus.redis.xack(self.topic, self.group_name, *[m.position for m in messages])

    async def close(self) -> None:
        """Unacknowledged messages stay pending; another consumer claims them when idle."""


def bus_redis(settings: Any) -> Redis:
    """The client a Redis Streams bus reads and writes with. A socket silent for BUS_SOCKET_TIMEOUT_S
    is a dead peer (a Redis pod replaced behind its address, a dropped NAT entry): the call
    fails, and every tail and consumer group reconnects and goes on from its position. Set here,
    not left to redis-py's default (None before 6.0): with none, a read waited on a dead socket
    for good and members' live updates stopped with no error (tests/events/test_dead_peer.py)."""
    return open_redis(settings.redis_url, timeout=BUS_SOCKET_TIMEOUT_S, connect_timeout=settings.redis_timeout_seconds,
                      keepalive=True, connections=BUS_CONNECTIONS)  # fmt: skip


def open_bus(settings: Any, redis: Redis | None = None) -> EventBus:
    """The bus POINTMESH_EVENT_BUS names; `redis` is the service's client when it has one (made
    by `bus_redis`, or one whose timeout allows MAX_BLOCK_MS)."""
    if settings.event_bus == "kafka":
        from pointmesh.kafka_bus import KafkaBus

        return KafkaBus(settings.kafka_bootstrap, partitions=settings.event_partitions,
                        replication=settings.event_replication)  # fmt: skip
    if redis is None:
        return RedisStreamBus(bus_redis(settings), maxlen=settings.event_stream_maxlen, owns_client=True)
    return RedisStreamBus(redis, maxlen=settings.event_stream_maxlen)
