"""The event bus every producer and consumer goes through, and the names of its streams.

Redis Streams is the embedded default: publish with a partition key, tail from a position
(fan-out to every watcher), or consume in a group and acknowledge after processing
(at-least-once; consumers dedupe on event_id).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

LEDGER_EVENTS = "pointmesh.ledger.events"
# Fraud and risk alerts for the ops team (OpsAlert messages), keyed by member id.
OPS_ALERTS = "pointmesh.ops.alerts"


@dataclass(frozen=True, slots=True)
class OutgoingEvent:
    key: str  # partition key: the member id, so one member's events stay in order
    event_id: str
    event_type: str
    payload: bytes  # a serialised protobuf message


@dataclass(frozen=True, slots=True)
class BusMessage:
    position: str
    key: str
    event_id: str
    event_type: str
    payload: bytes


def _message(position: bytes | str, fields: dict[bytes, bytes]) -> BusMessage:
    pos = position.decode() if isinstance(position, bytes) else position
    return BusMessage(
        position=pos,
        key=fields.get(b"key", b"").decode(),
        event_id=fields.get(b"event_id", b"").decode(),
        event_type=fields.get(b"type", b"").decode(),
        payload=fields.get(b"payload", b""),
    )


class RedisStreamBus:
    def __init__(self, redis: Redis, *, maxlen: int = 1_000_000) -> None:
        self.redis = redis
        self.maxlen = maxlen

    async def publish(self, stream: str, events: Sequence[OutgoingEvent]) -> list[str]:
        """Appends events in order in one round trip; returns their positions."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for ev in events:
                pipe.xadd(
                    stream,
                    {"key": ev.key, "event_id": ev.event_id, "type": ev.event_type, "payload": ev.payload},
                    maxlen=self.maxlen,
                    approximate=True,
                )
            positions = await pipe.execute()
        return [p.decode() if isinstance(p, bytes) else str(p) for p in positions]

    async def tail(
        self, stream: str, after: str = "$", *, block_ms: int = 1000, count: int = 100
    ) -> AsyncIterator[BusMessage]:
        """Yields every message after `after` ("$" = only new ones), forever."""
        position = after or "$"
        if position == "$":
            last: Any = await self.redis.xrevrange(stream, count=1)
            position = last[0][0].decode() if last else "0-0"
        while True:
            batch: Any = await self.redis.xread({stream: position}, block=block_ms, count=count)
            for _name, messages in batch or []:
                for pos, fields in messages:
                    msg = _message(pos, fields)
                    position = msg.position
                    yield msg

    async def ensure_group(self, stream: str, group: str, start: str = "0") -> None:
        try:
            await self.redis.xgroup_create(stream, group, id=start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def consume(
        self, stream: str, group: str, consumer: str, *, count: int = 100, block_ms: int = 1000
    ) -> list[BusMessage]:
        """Next messages for this consumer: its own unacknowledged ones first, then new ones."""
        pending: Any = await self.redis.xreadgroup(group, consumer, {stream: "0"}, count=count)
        batch: Any = pending if pending and pending[0][1] else None
        if batch is None:
            batch = await self.redis.xreadgroup(group, consumer, {stream: ">"}, count=count, block=block_ms)
        return [_message(pos, fields) for _name, messages in batch or [] for pos, fields in messages if fields]

    async def ack(self, stream: str, group: str, positions: Sequence[str]) -> None:
        if positions:
            await self.redis.xack(stream, group, *positions)
