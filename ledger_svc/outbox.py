"""Relays each shard's outbox to the event bus, in order, at least once.

A row is marked relayed only after the bus accepted it, so Redis being down loses nothing:
the rows wait and go out when it returns. Before publishing, the relay tombstones the
cached balance of every event, which is what makes the cache safe after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from datetime import datetime

from redis.asyncio import Redis

from ledger_svc import metrics
from ledger_svc.cache import RedisBalanceCache
from ledger_svc.convert import event_pb
from ledger_svc.store.base import LedgerStore, OutboxRow, ShardTx
from pointmesh.clock import Clock
from pointmesh.events import LEDGER_EVENTS, MAX_EVENT_BYTES, OPS_ALERTS, EventBus, OutgoingEvent, event_bytes
from pointmesh.v1 import common_pb2, ledger_pb2

log = logging.getLogger(__name__)
BATCH = 500
BATCH_WINDOW_SECONDS = 0.01
LEASE_SECONDS = 10.0

# KEYS[1] = a shard's lease; ARGV = holder, ms. Taken when free, renewed by its holder; 1 when
# this holder has it now.
_LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# KEYS = leases; ARGV[1] = holder. Deletes those it holds.
_RELEASE = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 1
"""


class RelayLeases:
    """Which replica relays which shard, when several serve one store (Cassandra).

    Two relays reading the same rows before either marks them would publish a member's events
    twice and out of order (the live feed showed an older balance after a newer one). Each
    shard is relayed by the replica holding its lease in Redis, renewed every pass; a replica
    that dies leaves it to run out, and another takes the shard within LEASE_SECONDS. A relay
    stalled past its lease while holding rows may still publish them after the next holder did:
    duplicates, which consumers drop by event id. Redis unreachable: no shard is relayed (the
    rows wait), rather than every replica relaying all of them.
    """

    def __init__(self, redis: Redis, ledger: str, *, seconds: float = LEASE_SECONDS) -> None:
        self.key = f"pm:ledger:relay-lease:{{{ledger}}}"  # one ledger's leases, in one cluster slot
        self.holder = uuid.uuid4().hex
        self.ms = max(1, int(seconds * 1000))
        self._lease = redis.register_script(_LEASE)
        self._release = redis.register_script(_RELEASE)

    async def hold(self, shard: int) -> bool:
        """Whether this replica relays the shard now (its lease taken or renewed for LEASE_SECONDS):
        asked right before each page, so a pass slowed past a lease never relays a shard that
        another replica took meanwhile."""
        return bool(await self._lease(keys=[f"{self.key}:{shard}"], args=[self.holder, self.ms]))

    async def release_all(self, shards: int) -> None:
        """On a clean stop: the leases this replica holds, given up."""
        await self._release(keys=[f"{self.key}:{shard}" for shard in range(shards)], args=[self.holder])


class OutboxRelay:
    def __init__(
        self,
        store: LedgerStore,
        bus: EventBus,
        clock: Clock,
        wakeup: asyncio.Event,
        *,
        cache: RedisBalanceCache | None = None,
        poll_seconds: float = 0.05,
        stream: str = LEDGER_EVENTS,
        leases: RelayLeases | None = None,
    ) -> None:
        self.store = store
        self.bus = bus
        self.clock = clock
        self.wakeup = wakeup
        self.cache = cache
        self.poll_seconds = poll_seconds
        self.stream = stream
        self.leases = leases
        self._stopping = False

    async def relay_once(self) -> int:
        """One pass over every shard; returns how many events went out."""
        sent = 0
        for shard in range(self.store.shard_count):
            while True:
                if self.leases is not None and not await self.leases.hold(shard):
                    break  # another replica relays it
                rows: list[OutboxRow] = await self.store.read(shard, lambda tx: tx.unrelayed_outbox(BATCH))
                if not rows:
                    break
                events = await self._publish(rows)
                await self.store.write(shard, functools.partial(_mark, [r.seq for r in rows], self.clock.now()))
                for event in events:
                    metrics.count(event)
                sent += len(rows)
                if len(rows) < BATCH:
                    break
        return sent

    async def _publish(self, rows: list[OutboxRow]) -> list[ledger_pb2.LedgerEvent]:
        events = [event_pb(r.payload_json) for r in rows]
        # An event no bus takes would stop the shard's relay (and every shard after it) for ever:
        # it is logged and counted, and the rest go out. The ledger bounds what a posting carries,
        # so this is a backstop, not a path.
        fitting: list[tuple[ledger_pb2.LedgerEvent, OutgoingEvent]] = []
        for e in events:
            kind = e.WhichOneof("payload") or ""
            out = OutgoingEvent(e.member_id, e.event_id, kind, e.SerializeToString())
            if event_bytes(out) <= MAX_EVENT_BYTES:
                fitting.append((e, out))
                continue
            metrics.EVENTS_TOO_LARGE.labels(kind).inc()
            log.error("ledger event %s (%s, member %s) is %d bytes, over the %d the bus takes: not published",
                      e.event_id, kind, e.member_id, e.ByteSize(), MAX_EVENT_BYTES)  # fmt: skip
        if self.cache is not None:  # every event's balance, published or not
            versions: dict[tuple[str, str], int] = {}
            for e in events:
                key = (e.member_id, e.unit)
                versions[key] = max(versions.get(key, 0), e.balance_after.version)
            await self.cache.tombstone(versions)
        await self.bus.publish(self.stream, [out for _, out in fitting])
        events = [e for e, _ in fitting]
        alerts = [alert_of(e) for e in events if e.WhichOneof("payload") == "review_opened"]
        if alerts:
            await self.bus.publish(
                OPS_ALERTS, [OutgoingEvent(a.member_id, a.alert_id, "ops_alert", a.SerializeToString()) for a in alerts]
            )
        return events

    def stop(self) -> None:
        """Ends `run` at its next turn, even if a cancellation raced with a wake-up."""
        self._stopping = True
        self.wakeup.set()

    async def run(self) -> None:
        delay = self.poll_seconds
        while not self._stopping:
            try:
                await self.relay_once()
                if self.cache is not None:
                    self.cache.enable()
                delay = self.poll_seconds
            except Exception as exc:  # any bus or cache failure: the rows wait, the relay never dies
                log.warning("event bus unreachable; outbox rows wait (%s: %s)", type(exc).__name__, exc)
                delay = min(max(delay * 2, 0.1), 2.0)
            self.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.wakeup.wait()
            # A short gather window turns a burst of postings into one publish and one commit.
            await asyncio.sleep(BATCH_WINDOW_SECONDS)


def alert_of(event: ledger_pb2.LedgerEvent) -> common_pb2.OpsAlert:
    """The fraud team's live view of a review opening; its id is the event's, so a relay that
    publishes twice after a crash publishes the same alert."""
    review = event.review_opened
    held = {ledger_pb2.REVIEW_KIND_REDEMPTION: "redemption_held", ledger_pb2.REVIEW_KIND_TRANSFER: "transfer_held"}.get(
        review.kind, "purchase_held"
    )
    return common_pb2.OpsAlert(
        alert_id=event.event_id, occurred_at=event.occurred_at, kind=held,
        severity="high" if review.scored else "medium", member_id=event.member_id, subject_id=review.review_id,
        reasons=[*review.reasons, f"{review.points} {event.unit} held"],
    )  # fmt: skip


def _mark(seqs: list[int], at: datetime, tx: ShardTx) -> None:
    tx.mark_relayed(seqs, at)
