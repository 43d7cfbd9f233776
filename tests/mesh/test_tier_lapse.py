"""Tier changes no purchase makes reach the member as tier_changed events: a tier whose hold
ends (tests/mesh/program.yaml: silver from 300 tier credits in Helsinki's calendar year, held
through the next year and 30 days' grace), one a return takes away, one a merge brings. The
maintenance pass (RunExpiry) announces each once; a purchase meeting a lapse it did not
announce yet tells it itself."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis

from pointmesh.events import LEDGER_EVENTS
from pointmesh.redis_server import RedisServer
from pointmesh.v1 import ledger_pb2
from tests.ledger.helpers import key
from tests.mesh.conftest import Mesh
from tests.mesh.helpers import buy, new_member, return_lines, welcomed_member

# Silver earned in 2026 holds until midnight in Helsinki 30 days into 2028.
SILVER_2026_ENDS = datetime(2028, 1, 30, 22, 0, tzinfo=UTC)


async def tier_events(redis: Redis, member_id: str, expected: int) -> list[tuple[str, str, str]]:
    """(before, after, purchase id) of the member's tier_changed events once `expected` are
    relayed (or after 5 s, whatever arrived)."""
    found: list[tuple[str, str, str]] = []
    for _ in range(250):
        found = []
        for _pos, fields in await redis.xrange(LEDGER_EVENTS):
            if fields.get(b"key", b"").decode() != member_id:
                continue
            event = ledger_pb2.LedgerEvent.FromString(fields[b"payload"])
            if event.WhichOneof("payload") == "tier_changed":
                t = event.tier_changed
                found.append((t.tier_before, t.tier_after, t.purchase_id))
        if len(found) >= expected:
            break
        await asyncio.sleep(0.02)
    return found


async def maintenance(mesh: Mesh) -> int:
    return (await mesh.ledger.stub.RunExpiry(ledger_pb2.RunExpiryRequest())).tiers_changed


async def tier(mesh: Mesh, member_id: str) -> str:
    reply = await mesh.ledger.stub.GetMemberTier(ledger_pb2.GetMemberTierRequest(member_id=member_id))
    return reply.status.tier


async def test_a_tier_whose_hold_ends_is_announced_once_when_it_lapses(mesh: Mesh, redis_server: RedisServer) -> None:
    redis = Redis.from_url(redis_server.url)
    try:
        member = await new_member(mesh)
        up = await buy(mesh, member, [("misc", 35_000, 1)])
        assert await tier_events(redis, member, 1) == [("blue", "silver", up.purchase.purchase_id)]

        mesh.clock.set(SILVER_2026_ENDS - timedelta(seconds=1))
        assert await maintenance(mesh) == 0  # still held, the last second of its grace
        mesh.clock.set(SILVER_2026_ENDS + timedelta(seconds=1))
        assert await maintenance(mesh) == 1
        assert await maintenance(mesh) == 0  # told once
        events = await tier_events(redis, member, 2)
        assert events == [("blue", "silver", up.purchase.purchase_id), ("silver", "blue", "")]
        assert await tier(mesh, member) == "blue"
    finally:
        await redis.aclose()


async def test_a_purchase_meeting_a_lapse_not_yet_announced_tells_it(mesh: Mesh, redis_server: RedisServer) -> None:
    redis = Redis.from_url(redis_server.url)
    try:
        member = await welcomed_member(mesh)
        await buy(mesh, member, [("misc", 35_000, 1)])
        mesh.clock.set(SILVER_2026_ENDS + timedelta(days=2))
        later = await buy(mesh, member, [("misc", 1_000, 1)])
        assert (later.purchase.tier_before, later.purchase.tier_after) == ("blue", "blue")
        events = await tier_events(redis, member, 2)
        assert [e[:2] for e in events] == [("blue", "silver"), ("silver", "blue")]
        assert events[1][2] == later.purchase.purchase_id
        assert await maintenance(mesh) == 0  # nothing left to tell
        assert len(await tier_events(redis, member, 3)) == 2
    finally:
        await redis.aclose()


async def test_a_return_taking_the_tier_away_is_announced_on_the_next_pass(
    mesh: Mesh, redis_server: RedisServer
) -> None:
    redis = Redis.from_url(redis_server.url)
    try:
        member = await welcomed_member(mesh)
        bought = await buy(mesh, member, [("misc", 35_000, 1)])
        await return_lines(mesh, bought.purchase.purchase_id, [(0, 1)])
        assert await tier(mesh, member) == "blue"
        assert await maintenance(mesh) == 1
        assert [e[:2] for e in await tier_events(redis, member, 2)] == [("blue", "silver"), ("silver", "blue")]
        assert await maintenance(mesh) == 0
    finally:
        await redis.aclose()


async def test_a_merge_lifting_the_target_to_a_tier_is_announced(mesh: Mesh, redis_server: RedisServer) -> None:
    redis = Redis.from_url(redis_server.url)
    try:
        source, target = await welcomed_member(mesh), await welcomed_member(mesh)
        await buy(mesh, source, [("misc", 20_000, 1)])
        await buy(mesh, target, [("misc", 20_000, 1)])  # 200 credits each: blue, together silver
        await mesh.ledger.stub.MergeMembers(
            ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=source, target_member_id=target)
        )
        assert await maintenance(mesh) == 1
        assert await tier_events(redis, target, 1) == [("blue", "silver", "")]
        assert await tier_events(redis, source, 0) == []
        assert await tier(mesh, target) == "silver"
        assert await maintenance(mesh) == 0
    finally:
        await redis.aclose()
