"""Tier changes no purchase makes reach the member as tier_changed events: a tier whose hold
ends (tests/mesh/program.yaml: silver from 300 tier credits in Helsinki's calendar year, held
through the next year and 30 days' grace), one a return takes away, one a merge brings. The
maintenance pass (RunExpiry) announces each once; a purchase meeting a lapse it did not
announce yet tells it itself."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from redis.asyncio import Redis

from ledger_svc import tier_watch
from ledger_svc.accrual import Accrual
from ledger_svc.store.sqlite import SqliteLedgerStore
from pointmesh.events import LEDGER_EVENTS
from pointmesh.redis_server import RedisServer
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import common_pb2, ledger_pb2, rules_pb2
from tests.conftest import restart_ledger, start_ledger, stop_ledger
from tests.ledger.helpers import key
from tests.mesh.conftest import PROGRAM, Mesh
from tests.mesh.helpers import buy, new_member, purchase_request, return_lines, welcomed_member
from tests.mesh.test_batch_accrual import ingest

# Silver earned in 2026 holds until midnight in Helsinki 30 days into 2028.
SILVER_2026_ENDS = datetime(2028, 1, 30, 22, 0, tzinfo=UTC)


class TierFeed:
    """The ledger's tier_changed events from where the stream stood when a test began. The
    session's redis-server holds every test's events; each call reads only what was added since
    the previous one."""

    def __init__(self, redis: Redis, start: str) -> None:
        self.redis, self.start = redis, start
        self.seen: list[tuple[str, ledger_pb2.TierChanged]] = []

    async def of(self, member_id: str, expected: int) -> list[tuple[str, str, str]]:
        """(before, after, purchase id) of the member's tier_changed events once `expected` are
        relayed (or after 5 s, whatever arrived)."""
        found: list[tuple[str, str, str]] = []
        for _ in range(250):
            for position, fields in await self.redis.xrange(LEDGER_EVENTS, min=self.start):
                self.start = f"({position.decode()}"
                event = ledger_pb2.LedgerEvent.FromString(fields[b"payload"])
                if event.WhichOneof("payload") == "tier_changed":
                    self.seen.append((event.member_id, event.tier_changed))
            found = [(t.tier_before, t.tier_after, t.purchase_id) for member, t in self.seen if member == member_id]
            if len(found) >= expected:
                break
            await asyncio.sleep(0.02)
        return found


@pytest.fixture
async def feed(redis_server: RedisServer) -> AsyncIterator[TierFeed]:
    redis = Redis.from_url(redis_server.url)
    last = await redis.xrevrange(LEDGER_EVENTS, count=1)
    yield TierFeed(redis, f"({last[0][0].decode()}" if last else "-")
    await redis.aclose()


async def maintenance(mesh: Mesh) -> int:
    return (await mesh.ledger.stub.RunExpiry(ledger_pb2.RunExpiryRequest())).tiers_changed


async def tier(mesh: Mesh, member_id: str) -> str:
    reply = await mesh.ledger.stub.GetMemberTier(ledger_pb2.GetMemberTierRequest(member_id=member_id))
    return reply.status.tier


async def test_a_tier_whose_hold_ends_is_announced_once_when_it_lapses(mesh: Mesh, feed: TierFeed) -> None:
    member = await new_member(mesh)
    up = await buy(mesh, member, [("misc", 35_000, 1)])
    assert await feed.of(member, 1) == [("blue", "silver", up.purchase.purchase_id)]

    mesh.clock.set(SILVER_2026_ENDS - timedelta(seconds=1))
    assert await maintenance(mesh) == 0  # still held, the last second of its grace
    mesh.clock.set(SILVER_2026_ENDS + timedelta(seconds=1))
    assert await maintenance(mesh) == 1
    assert await maintenance(mesh) == 0  # told once
    events = await feed.of(member, 2)
    assert events == [("blue", "silver", up.purchase.purchase_id), ("silver", "blue", "")]
    assert await tier(mesh, member) == "blue"


async def test_a_purchase_meeting_a_lapse_not_yet_announced_tells_it(mesh: Mesh, feed: TierFeed) -> None:
    member = await welcomed_member(mesh)
    await buy(mesh, member, [("misc", 35_000, 1)])
    mesh.clock.set(SILVER_2026_ENDS + timedelta(days=2))
    later = await buy(mesh, member, [("misc", 1_000, 1)])
    assert (later.purchase.tier_before, later.purchase.tier_after) == ("blue", "blue")
    events = await feed.of(member, 2)
    assert [e[:2] for e in events] == [("blue", "silver"), ("silver", "blue")]
    assert events[1][2] == later.purchase.purchase_id
    assert await maintenance(mesh) == 0  # nothing left to tell
    assert len(await feed.of(member, 3)) == 2


async def test_a_return_taking_the_tier_away_is_announced_on_the_next_pass(mesh: Mesh, feed: TierFeed) -> None:
    member = await welcomed_member(mesh)
    bought = await buy(mesh, member, [("misc", 35_000, 1)])
    await return_lines(mesh, bought.purchase.purchase_id, [(0, 1)])
    assert await tier(mesh, member) == "blue"
    assert await maintenance(mesh) == 1
    assert [e[:2] for e in await feed.of(member, 2)] == [("blue", "silver"), ("silver", "blue")]
    assert await maintenance(mesh) == 0


async def test_a_merge_lifting_the_target_to_a_tier_is_announced(mesh: Mesh, feed: TierFeed) -> None:
    source, target = await welcomed_member(mesh), await welcomed_member(mesh)
    await buy(mesh, source, [("misc", 20_000, 1)])
    await buy(mesh, target, [("misc", 20_000, 1)])  # 200 credits each: blue, together silver
    await mesh.ledger.stub.MergeMembers(
        ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=source, target_member_id=target)
    )
    assert await maintenance(mesh) == 1
    assert await feed.of(target, 1) == [("blue", "silver", "")]
    assert await feed.of(source, 0) == []
    assert await tier(mesh, target) == "silver"
    assert await maintenance(mesh) == 0


async def publish(mesh: Mesh, document: str, name: str, effective_from: datetime | None = None) -> None:
    """A new version, in effect at once or from `effective_from`."""
    assert document != PROGRAM.read_text()
    await mesh.rules.stub.PublishProgram(rules_pb2.PublishProgramRequest(
        idempotency_key=common_pb2.IdempotencyKey(key=name), document=document,
        effective_from=to_timestamp(effective_from) if effective_from else None,
    ))  # fmt: skip


SILVER_1000 = PROGRAM.read_text().replace("{code: silver, threshold: 300}", "{code: silver, threshold: 1000}")
GOLD = PROGRAM.read_text().replace("silver", "gold")
NO_TIERS = (
    PROGRAM.read_text()
    .replace('  - id: silver\n    priority: 10\n    when: {tiers: [silver]}\n    effect: {multiplier: "2"}\n', "")
    .split("tiers:\n  metric_unit")[0]
    + "policy:"
    + PROGRAM.read_text().split("\npolicy:")[1]
)


async def test_a_late_receipt_priced_under_an_older_version_leaves_the_telling_to_the_pass(
    mesh: Mesh, feed: TierFeed
) -> None:
    """v2, in effect now, wants 1000 credits for silver; a late receipt of v1's time brings the
    member to 350, silver under v1. The member is blue under the version in effect, so nothing is
    told: the purchase leaves it to the pass, which asks rules_svc now. And a version renaming
    silver gold is not undone by a late receipt priced under the old names."""
    member = await welcomed_member(mesh)
    await buy(mesh, member, [("misc", 25_000, 1)])  # 250 credits: blue under both versions
    paid_at = mesh.clock.now() + timedelta(hours=1)
    mesh.clock.advance(timedelta(days=3))
    await publish(mesh, SILVER_1000, "silver-1000")
    late = await buy(mesh, member, [("misc", 10_000, 1)], at=paid_at)  # v1's time: 350 credits
    assert late.purchase.program_version == 1 and late.purchase.tier_after == "silver"
    assert await tier(mesh, member) == "blue"
    assert await maintenance(mesh) == 0
    await buy(mesh, member, [("misc", 100, 1)])
    assert await feed.of(member, 1) == []

    renamed_member = await welcomed_member(mesh)
    mesh.clock.advance(timedelta(days=1))
    up = await buy(mesh, renamed_member, [("misc", 100_000, 1)])  # 1000 credits: silver under v2
    paid_at = mesh.clock.now()
    mesh.clock.advance(timedelta(days=1))
    await publish(mesh, GOLD.replace("threshold: 300", "threshold: 1000"), "gold-1000")
    assert await maintenance(mesh) == 1  # the rename, told by the pass (the tiers section moved)
    assert await maintenance(mesh) == 0
    renamed = await buy(mesh, renamed_member, [("misc", 100, 1)])
    await buy(mesh, renamed_member, [("misc", 100, 1)], at=paid_at + timedelta(minutes=1))  # priced as silver
    again = await buy(mesh, renamed_member, [("misc", 100, 1)])
    assert await tier(mesh, renamed_member) == "gold"
    events = await feed.of(renamed_member, 3)
    assert events == [("blue", "silver", up.purchase.purchase_id), ("silver", "gold", "")]
    assert renamed.purchase.tier_before == again.purchase.tier_before == "gold"


async def test_a_season_without_tiers_keeps_the_tier_told_and_its_lapse_is_announced(
    mesh: Mesh, feed: TierFeed
) -> None:
    member = await welcomed_member(mesh)
    await buy(mesh, member, [("misc", 35_000, 1)])  # told silver, due 2028-01-30
    mesh.clock.advance(timedelta(days=3))
    await publish(mesh, NO_TIERS, "no-tiers")
    await buy(mesh, member, [("misc", 100, 1)])
    mesh.clock.advance(timedelta(days=3))
    await publish(mesh, PROGRAM.read_text().replace("expiry_days: 365", "expiry_days: 366"), "tiers-back")
    assert await tier(mesh, member) == "silver"
    mesh.clock.set(SILVER_2026_ENDS + timedelta(days=1))
    assert await maintenance(mesh) == 1
    assert [e[:2] for e in await feed.of(member, 2)] == [("blue", "silver"), ("silver", "blue")]


async def test_tiers_told_before_tiers_were_watched_are_looked_at_after_the_upgrade(
    mesh: Mesh, redis_server: RedisServer, feed: TierFeed, tmp_path: Path
) -> None:
    """A SQLite ledger written before the tier_due table existed: opening it makes every tier it
    told due, so a lapse meanwhile is announced. (Cassandra: `pointmesh ledger backfill`,
    tests/cassandra/test_purchase_listing.py.)"""
    if not isinstance(mesh.ledger.app.store, SqliteLedgerStore):
        pytest.skip("the SQLite upgrade; Cassandra's is the backfill command")
    member, blue = await welcomed_member(mesh), await welcomed_member(mesh)
    await buy(mesh, member, [("misc", 35_000, 1)])
    settings = mesh.ledger.app.settings
    await stop_ledger(mesh.ledger)
    shards = sorted((tmp_path / "ledger").rglob("ledger-shard-*.sqlite"))
    assert shards
    for shard in shards:
        with contextlib.closing(sqlite3.connect(shard)) as conn, conn:
            conn.execute("DROP TABLE tier_due")
            conn.execute(
                "UPDATE member_state SET state = json_remove(state, '$.tier_due')"
            )  # as an earlier release wrote it
    mesh.ledger = await start_ledger(
        tmp_path / "ledger", redis_server.url, mesh.clock, rules_addr=settings.rules_addr, program="meshmart",
        rules_deadline_seconds=2.0,
    )  # fmt: skip
    assert {member, blue} <= set(await due_members(mesh))  # every tier told, due at once
    assert await maintenance(mesh) == 0
    assert await due_members(mesh) == [member]  # looked at once: blue has nothing to lose
    mesh.clock.set(SILVER_2026_ENDS + timedelta(days=1))
    assert await maintenance(mesh) == 1
    assert [e[:2] for e in await feed.of(member, 2)] == [("blue", "silver"), ("silver", "blue")]
    assert await due_members(mesh) == []


async def due_members(mesh: Mesh) -> list[str]:
    """Every member whose tier the pass will look at, whenever that is."""
    store, until = mesh.ledger.app.store, mesh.clock.now() + timedelta(days=3650)
    return [m for s in range(store.shard_count) for m in await store.read(s, lambda tx: tx.tiers_due_by(until, 100))]


async def test_a_new_members_upgrade_by_a_late_receipt_is_announced_by_the_pass(mesh: Mesh, feed: TierFeed) -> None:
    """A member whose first receipts arrive late (a legacy file, a batch): the purchase tells
    nothing, the pass tells the upgrade from the tier the purchase was priced at."""
    member = await new_member(mesh)
    await buy(mesh, member, [("misc", 35_000, 1)], at=mesh.clock.now() - timedelta(hours=1))
    assert await maintenance(mesh) == 1
    assert await tier(mesh, member) == "silver"
    assert await feed.of(member, 1) == [("blue", "silver", "")]


SILVER_200 = PROGRAM.read_text().replace("{code: silver, threshold: 300}", "{code: silver, threshold: 200}")


async def test_a_version_lowering_a_threshold_tells_the_members_it_lifts_without_a_purchase(
    mesh: Mesh, feed: TierFeed
) -> None:
    """Marketing lowers silver from 300 to 200 credits: a member at 250 is told silver by the
    pass once the version takes effect, with no purchase of theirs; one at 100 stays blue, one
    who never bought is told nothing (their first purchase tells it)."""
    lifted, stays, never = await welcomed_member(mesh), await welcomed_member(mesh), await new_member(mesh)
    await buy(mesh, lifted, [("misc", 25_000, 1)])
    await buy(mesh, stays, [("misc", 10_000, 1)])
    assert await maintenance(mesh) == 0  # the tier policy in effect, noted
    in_effect = mesh.clock.now() + timedelta(days=2)
    await mesh.rules.stub.PublishProgram(rules_pb2.PublishProgramRequest(
        idempotency_key=common_pb2.IdempotencyKey(key="silver-200"), document=SILVER_200,
        effective_from=to_timestamp(in_effect),
    ))  # fmt: skip
    assert await maintenance(mesh) == 0  # published, not in effect yet

    mesh.clock.set(in_effect + timedelta(seconds=1))
    assert await maintenance(mesh) == 1
    assert await maintenance(mesh) == 0  # told once
    assert await feed.of(lifted, 1) == [("blue", "silver", "")]
    assert await tier(mesh, lifted) == "silver"
    assert await tier(mesh, stays) == "blue"
    assert await feed.of(stays, 1) == [] and await feed.of(never, 1) == []
    later = await buy(mesh, lifted, [("misc", 100, 1)])
    assert later.purchase.tier_before == "silver"


async def walks(mesh: Mesh) -> list[str | None]:
    """Where each shard's walk stands (its `tier_walk` meta)."""
    store = mesh.ledger.app.store
    return [await store.read(s, lambda tx: tx.get_meta(tier_watch.WALK)) for s in range(store.shard_count)]


async def test_the_walk_after_a_tier_change_goes_a_page_at_a_time_and_waits_out_rules_svc(
    mesh: Mesh, feed: TierFeed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One member a page, one page a shard a pass: the members are told over several passes,
    each once; with rules_svc away mid-walk the walk waits where it was, a restarted ledger goes
    on from there (it does not look at the first pages again), and each shard's digest is kept
    only once every member was looked at (a pass after that walks no more)."""
    monkeypatch.setattr(tier_watch, "PAGE", 1)
    monkeypatch.setattr(tier_watch, "PAGES_PER_PASS", 1)
    walked: list[str] = []  # members the walk looked at
    look = tier_watch._look

    async def counted(accrual: Accrual, shard: int, member_id: str, now: datetime, *, told_only: bool = False) -> int:
        if told_only:
            walked.append(member_id)
        return await look(accrual, shard, member_id, now, told_only=told_only)

    monkeypatch.setattr(tier_watch, "_look", counted)
    svc = mesh.ledger.app.service
    members: list[str] = []
    while len(members) < 3 or len({svc.shard_of(m) for m in members}) == len(members):
        members.append(await welcomed_member(mesh))  # until two share a shard: a walk of two pages there
    for member in members:
        await buy(mesh, member, [("misc", 25_000, 1)])
    assert await maintenance(mesh) == 0
    await publish(mesh, SILVER_200, "silver-200")

    told = await maintenance(mesh)  # one member a shard
    assert 0 < told < len(members)
    first_pages, started = set(walked), await walks(mesh)
    assert len(first_pages) == told and any(started)
    await mesh.stop_rules()
    assert await maintenance(mesh) == 0  # rules_svc away: the walk waits where it was
    assert await walks(mesh) == started
    await mesh.restart_rules()
    mesh.ledger = await restart_ledger(mesh.ledger)
    walked.clear()
    passes = 0
    while told < len(members) and passes < 20:
        told += await maintenance(mesh)
        passes += 1
    assert told == len(members)
    assert not first_pages & set(walked)  # the restarted ledger went on where the walk stood
    assert first_pages | set(walked) == set(members)
    assert await maintenance(mesh) == 0
    for member in members:
        assert await feed.of(member, 1) == [("blue", "silver", "")]
    store = mesh.ledger.app.store
    digests = {await store.read(s, lambda tx: tx.get_meta(tier_watch.POLICY)) for s in range(store.shard_count)}
    assert len(digests) == 1 and None not in digests


async def test_a_member_whose_month_passes_the_credit_bound_still_has_a_tier(mesh: Mesh) -> None:
    """Each purchase within the bounds (10^15 minor units), the ledger took every one; their
    month's sum passed what rules_svc read, and the member's tier became INVALID_ARGUMENT on a
    field the caller never sent (and the lapse watch gave the member up)."""
    if not isinstance(mesh.ledger.app.store, SqliteLedgerStore):
        pytest.skip("rules_svc's reading: the SQLite run covers it (101 purchases of one member are slow there)")
    member = await new_member(mesh)
    requests = [
        ledger_pb2.IngestBatchRequest(
            purchase=purchase_request(member, [("misc", 10**15, 1)], at=mesh.clock.now(), receipt=f"big-{i}")
        )
        for i in range(101)
    ]
    answer = await ingest(mesh, requests)
    assert (answer.posted, answer.failed) == (101, 0), list(answer.failures)[:3]

    status = (await mesh.ledger.stub.GetMemberTier(ledger_pb2.GetMemberTierRequest(member_id=member))).status

    assert status.tier == "silver"


async def test_a_receipt_stamped_ahead_into_next_month_keeps_its_tier_told(mesh: Mesh, feed: TierFeed) -> None:
    """A till four minutes fast stamps a purchase at 00:01 on 1 June in Helsinki while the
    ledger's clock still reads 23:57 on 31 May: it counts in June and makes the member silver.
    A purchase stamped on time a minute later counts in May; the member must not hear of a drop
    to blue (nor of silver a second time), and their tier reads silver all along."""
    mesh.clock.set(datetime(2026, 5, 31, 20, 57, tzinfo=UTC))
    member = await new_member(mesh)
    up = await buy(mesh, member, [("misc", 35_000, 1)], at=datetime(2026, 5, 31, 21, 1, tzinfo=UTC))
    assert (up.purchase.tier_before, up.purchase.tier_after) == ("blue", "silver")
    mesh.clock.advance(timedelta(minutes=1))
    await buy(mesh, member, [("misc", 1_000, 1)])
    assert await tier(mesh, member) == "silver"
    mesh.clock.set(datetime(2026, 5, 31, 21, 10, tzinfo=UTC))
    await maintenance(mesh)
    assert await tier(mesh, member) == "silver"
    assert await feed.of(member, 2) == [("blue", "silver", up.purchase.purchase_id)]


JUNE_START = datetime(2026, 5, 31, 21, 0, tzinfo=UTC)  # midnight in Helsinki, 1 June


async def on_time_then_june(mesh: Mesh, member: str, tier_told: str) -> None:
    """A purchase stamped on time a minute after the one stamped ahead (31 May 23:58, priced
    under version 1), then two passes once June has begun: the tier reads `tier_told` before
    and after."""
    mesh.clock.advance(timedelta(minutes=1))
    await buy(mesh, member, [("misc", 1_000, 1)])
    assert await tier(mesh, member) == tier_told
    mesh.clock.set(JUNE_START + timedelta(minutes=5))
    await maintenance(mesh)
    await maintenance(mesh)
    assert await tier(mesh, member) == tier_told


async def test_a_purchase_after_a_receipt_stamped_ahead_into_a_new_version_tells_no_drop(
    mesh: Mesh, feed: TierFeed
) -> None:
    """Silver from 200 credits from 1 June (a version published to take effect then). A till
    four minutes fast stamps 250 credits at 00:01 on 1 June: priced under the June version, the
    member is told silver. A purchase stamped on time a minute later (31 May, the May version)
    must not tell a drop to blue: the member is silver at the instant their tier is read (and
    GetMemberTier says so), and nothing tells them silver again after the month starts."""
    mesh.clock.set(JUNE_START - timedelta(hours=1))
    await publish(mesh, SILVER_200, "silver-200-from-june", JUNE_START)
    mesh.clock.set(JUNE_START - timedelta(minutes=3))
    member = await new_member(mesh)
    up = await buy(mesh, member, [("misc", 25_000, 1)], at=JUNE_START + timedelta(minutes=1))
    assert (up.purchase.program_version, up.purchase.tier_after) == (2, "silver")
    await on_time_then_june(mesh, member, "silver")
    assert await feed.of(member, 3) == [("blue", "silver", up.purchase.purchase_id)]


async def test_a_purchase_after_a_receipt_stamped_ahead_into_a_new_version_tells_no_rise(
    mesh: Mesh, feed: TierFeed
) -> None:
    """Silver from 1000 credits from 1 June. A member silver at 350 credits under May's version
    is told blue by a receipt stamped 00:01 on 1 June (priced under June's); a purchase stamped
    on time a minute later must not tell them silver again (they are blue by the June version
    their tier is read at), and nothing must then take it back once more."""
    mesh.clock.set(JUNE_START - timedelta(hours=1))
    member = await new_member(mesh)
    first = await buy(mesh, member, [("misc", 35_000, 1)])  # silver under version 1
    await publish(mesh, SILVER_1000, "silver-1000-from-june", JUNE_START)
    mesh.clock.set(JUNE_START - timedelta(minutes=3))
    await maintenance(mesh)
    down = await buy(mesh, member, [("misc", 1_000, 1)], at=JUNE_START + timedelta(minutes=1))
    assert (down.purchase.program_version, down.purchase.tier_after) == (2, "blue")
    await on_time_then_june(mesh, member, "blue")
    assert await feed.of(member, 4) == [
        ("blue", "silver", first.purchase.purchase_id),
        ("silver", "blue", down.purchase.purchase_id),
    ]
