"""Live updates for websockets: each gateway process tails the ledger's event stream and the
ops alert stream itself (a broadcast read, not a share of a consumer group), so a member
connected to any gateway receives every one of their events.

Each connection has a bounded queue; a consumer that falls that far behind is dropped (the
client reconnects and reads its balance), so a slow phone cannot grow the gateway's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf.json_format import MessageToDict

from pointmesh.consumers import check_schema
from pointmesh.events import GAMIFICATION_FUNDING, LEDGER_EVENTS, OPS_ALERTS, BusMessage, EventBus
from pointmesh.redrive import header
from pointmesh.v1 import common_pb2, ledger_pb2

# Redis stamps stream ids with its own clock: a start pinned by this process's clock reaches
# back this far, so a clock a little ahead of Redis's skips nothing.
CLOCK_MARGIN = timedelta(seconds=2)

log = logging.getLogger(__name__)


class Subscription:
    def __init__(self, limit: int) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=limit)
        self.overflowed = asyncio.Event()

    def offer(self, message: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.overflowed.set()


# What a member's stream shows of a fraud review: that one is open or decided, on what. The
# reasons, the verdict, who decided and the desk's note are the fraud team's (REST keeps them
# behind ops:read), and a member token or a call-centre key reads this stream too.
_REVIEW_SHOWN = frozenset({"review_id", "kind", "status", "points", "subject_ids", "purchase_id"})


def member_message(event: ledger_pb2.LedgerEvent) -> dict[str, Any]:
    """What a member's app needs: the kind of change, the balance after it, and its details."""
    kind: str = event.WhichOneof("payload") or "unknown"
    body = MessageToDict(getattr(event, kind), preserving_proto_field_name=True) if kind != "unknown" else {}
    if kind in ("review_opened", "review_decided"):
        body = {k: v for k, v in body.items() if k in _REVIEW_SHOWN}
    balance = event.balance_after
    if kind == "points_earned" and event.points_earned.funding_source == GAMIFICATION_FUNDING:
        item_id, _, name = event.points_earned.reference.partition(": ")
        kind, body = "achievement_unlocked", {**body, "item_id": item_id, "name": name}
    return {
        "type": kind, "event_id": event.event_id, "member_id": event.member_id, "unit": event.unit,
        "occurred_at": event.occurred_at.ToJsonString(),
        "balance": {"balance_points": balance.balance_points, "available_points": balance.available_points,
                    "reserved_points": balance.reserved_points, "pending_points": balance.pending_points,
                    "version": balance.version},
        "details": body,
    }  # fmt: skip


def _member_update(payload: bytes) -> dict[str, Any]:
    return member_message(ledger_pb2.LedgerEvent.FromString(payload))


def _ops_alert(payload: bytes) -> dict[str, Any]:
    alert = common_pb2.OpsAlert.FromString(payload)
    return {"type": "ops_alert", **MessageToDict(alert, preserving_proto_field_name=True)}


def _rendered(message: BusMessage, render: Callable[[bytes], dict[str, Any]]) -> dict[str, Any] | None:
    """What to send for an event, or None (logged) for one this gateway cannot show: a schema
    major it does not know, bytes that do not parse, values that do not render. One such event
    is skipped; it must never end live updates for every member. A broadcast tail has no
    dead-letter topic; the group consumers dead-letter the same event."""
    try:
        check_schema(message)
        return render(message.payload)
    except Exception as exc:  # anything about this one event; the tail goes on
        log.warning("live updates skip %s event %s at %s: %s", message.event_type, message.event_id,
                    message.position, exc)  # fmt: skip
        return None


class LiveHub:
    def __init__(self, bus: EventBus, limit: int) -> None:
        self.bus = bus
        self.limit = limit
        self.members: dict[str, set[Subscription]] = {}
        # Per subscribed member and unit: the balance version last shown, with the events shown
        # at it (one posting may announce several), so a copy (the relay publishes at least
        # once) or an older event (a dead letter sent back) never shows a balance going back.
        self.shown: dict[str, dict[str, tuple[int, set[str]]]] = {}
        self.ops: set[Subscription] = set()
        self.delivered = 0
        self.dropped = 0
        self.started = datetime.now(UTC)

    @contextlib.contextmanager
    def member(self, member_id: str) -> Iterator[Subscription]:
        sub = Subscription(self.limit)
        self.members.setdefault(member_id, set()).add(sub)
        try:
            yield sub
        finally:
            subs = self.members.get(member_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self.members[member_id]
                    self.shown.pop(member_id, None)

    @contextlib.contextmanager
    def alerts(self) -> Iterator[Subscription]:
        sub = Subscription(self.limit)
        self.ops.add(sub)
        try:
            yield sub
        finally:
            self.ops.discard(sub)

    def _deliver(self, subs: set[Subscription], message: dict[str, Any]) -> None:
        for sub in list(subs):
            sub.offer(message)
            self.delivered += 1
            if sub.overflowed.is_set():
                self.dropped += 1

    async def run(self) -> None:
        await asyncio.gather(self._follow_ledger(), self._follow_alerts())

    async def _follow_ledger(self) -> None:
        async for message in self._tail(LEDGER_EVENTS):
            subs = self.members.get(message.key)
            if not subs or header(message, "redriven_from"):
                continue  # a redriven dead letter is its group's; members were shown it when it was new
            update = _rendered(message, _member_update)
            if update is not None and self._new(message.key, update):
                self._deliver(subs, update)

    def _new(self, member_id: str, update: dict[str, Any]) -> bool:
        """Not shown before, and not older than what was: the balance never goes back."""
        version, event_id = update["balance"]["version"], update["event_id"]
        shown = self.shown.setdefault(member_id, {})
        last, ids = shown.get(update["unit"], (0, set()))
        if version < last or (version == last and event_id in ids):
            return False
        shown[update["unit"]] = (version, {*ids, event_id} if version == last else {event_id})
        return True

    async def _follow_alerts(self) -> None:
        async for message in self._tail(OPS_ALERTS):
            if not self.ops:
                continue
            alert = _rendered(message, _ops_alert)
            if alert is not None:
                self._deliver(self.ops, alert)

    async def _tail(self, stream: str) -> Any:
        """Follows a stream from now on, reconnecting after bus errors without skipping ahead.
        "Now" is pinned to a position before the first read, not left as "$": a retry with "$"
        would start after whatever is newest by then and skip what was published during the
        outage on a stream quiet until then (ops alerts are rare). The Kafka bus has no single
        position to pin and resumes at the end (docs/events.md, known limits)."""
        position = "$"
        while True:
            try:
                if position == "$":
                    position = await self.bus.latest_position(stream)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Away when the hub started: what the relay publishes once it is back (its
                # backlog first) must not fall before the position the retry would find.
                position = self.bus.position_at(self.started - CLOCK_MARGIN)
                log.warning("following %s: no position yet (%s); from %s on", stream, exc, position)
            try:
                async for message in self.bus.subscribe(stream, position, block_ms=500):
                    position = message.position
                    yield message
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarts must not end live updates for good
                log.warning("following %s failed (%s); retrying", stream, exc)
                await asyncio.sleep(0.5)
