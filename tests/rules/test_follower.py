"""rules_svc replicas: one leader holding versions and gamification state, followers that
copy the versions and forward the rest, all real gRPC servers on loopback.

Before followers existed every replica kept its own version file: two pods each published
their own "version 1", and a campaign reached only the pods it was published on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from pointmesh.clock import ManualClock
from pointmesh.errors import status_details
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import rules_pb2
from rules_svc.follower import DivergedFromLeader
from tests.conftest import RulesUnderTest, start_ledger, start_rules, stop_ledger, stop_rules
from tests.gamification.conftest import START, write_program
from tests.ledger.helpers import create_member
from tests.mesh.helpers import purchase_request
from tests.rules.test_rules_grpc import BLACK_FRIDAY, MONDAY, WEEKEND, basket, doc, key, publish, totals
from tests.waiting import until


@dataclass
class Replicas:
    leader: RulesUnderTest
    a: RulesUnderTest
    b: RulesUnderTest


async def _follower(data_dir: Path, leader: RulesUnderTest, **overrides: object) -> RulesUnderTest:
    return await start_rules(
        data_dir, leader.clock, rules_leader_addr=leader.address, rules_reload_seconds=0.2, **overrides
    )


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[Replicas]:
    leader = await start_rules(tmp_path / "leader")
    a = await _follower(tmp_path / "a", leader)
    b = await _follower(tmp_path / "b", leader)
    running = Replicas(leader, a, b)
    yield running
    for each in (running.b, running.a, running.leader):  # as the test left them (it may restart some)
        await stop_rules(each)


async def _versions(rules: RulesUnderTest) -> list[tuple[str, int, str]]:
    found = await rules.stub.ListVersions(rules_pb2.ListVersionsRequest(program="shop"))
    return [(v.program, v.version, v.sha256) for v in found.versions]


async def _points(rules: RulesUnderTest) -> dict[str, int]:
    found = await rules.stub.Evaluate(rules_pb2.EvaluateRequest(program="shop", basket=basket(MONDAY, 1000)))
    return totals(found.evaluation)


async def test_versions_published_through_any_replica_are_numbered_once_and_reach_every_replica(
    replicas: Replicas,
) -> None:
    now = replicas.leader.clock.now()
    first = await publish(replicas.a, "v1", doc(), now)
    assert first.version == 1
    assert await _points(replicas.a) == {"points": 10}  # the publishing pod has it at once
    second = await publish(replicas.b, "v2", doc(BLACK_FRIDAY), now + timedelta(seconds=1))
    assert second.version == 2  # not a second "version 1" on another pod's disk

    async def everywhere() -> bool:
        listed = [await _versions(r) for r in (replicas.leader, replicas.a, replicas.b)]
        return listed[0] == listed[1] == listed[2] and len(listed[0]) == 2

    await until(everywhere, 10)
    replicas.leader.clock.advance(timedelta(seconds=2))
    for r in (replicas.leader, replicas.a, replicas.b):
        assert await _points(r) == {"points": 30}, "every replica evaluates the newest version"
    again = await publish(replicas.b, "v1", doc(), now)  # a retry lands on another pod
    assert (again.version, again.sha256) == (1, first.sha256)
    with pytest.raises(grpc.aio.AioRpcError) as late:  # the same key with another document: a conflict
        await publish(replicas.a, "v1", doc(WEEKEND), now)
    assert late.value.code() == grpc.StatusCode.ALREADY_EXISTS
    every = await replicas.a.stub.ListVersions(rules_pb2.ListVersionsRequest())  # no program: all of them
    assert [(v.program, v.version) for v in every.versions] == [("shop", 1), ("shop", 2)]


async def test_the_leaders_errors_reach_the_caller_unchanged(replicas: Replicas) -> None:
    await publish(replicas.a, "k", doc(), replicas.leader.clock.now())
    with pytest.raises(grpc.aio.AioRpcError) as conflict:
        await publish(replicas.b, "k", doc(WEEKEND), replicas.leader.clock.now())
    assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "idempotency key test/k" in (conflict.value.details() or "")
    assert _fields(conflict.value) == ["idempotency_key"]
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await replicas.a.stub.PublishProgram(
            rules_pb2.PublishProgramRequest(idempotency_key=key("bad"), document="program: shop\nbase_rates: 7\n")
        )
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert any("base_rates" in field for field in _fields(invalid.value))
    assert len(await _versions(replicas.leader)) == 1  # nothing written by either refusal


def _fields(error: grpc.aio.AioRpcError) -> list[str]:
    """The fields named in the call's BadRequest details (as the leader sent them)."""
    found = [d for d in status_details(error) if isinstance(d, error_details_pb2.BadRequest)]
    return [v.field for d in found for v in d.field_violations]


async def test_a_follower_keeps_evaluating_without_its_leader_and_says_why_it_cannot_publish(
    tmp_path: Path, replicas: Replicas
) -> None:
    await publish(replicas.a, "v1", doc(), replicas.leader.clock.now())
    await until(lambda: _has_versions(replicas.b, 1), 10)
    await stop_rules(replicas.leader)
    assert await _points(replicas.b) == {"points": 10}
    with pytest.raises(grpc.aio.AioRpcError) as down:
        await publish(replicas.b, "v2", doc(WEEKEND), replicas.b.clock.now())
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (down.value.details() or "").startswith("rules leader:")
    # A follower restarted while the leader is away starts on the copy it made before.
    await stop_rules(replicas.b)
    replicas.b = await _follower(tmp_path / "b", replicas.leader)
    assert await _points(replicas.b) == {"points": 10}
    replicas.leader = await start_rules(tmp_path / "leader")  # for the fixture to stop


async def _has_versions(rules: RulesUnderTest, count: int) -> bool:
    try:
        return len(await _versions(rules)) == count
    except grpc.aio.AioRpcError:
        return False


async def test_a_copy_that_disagrees_with_the_leader_is_not_mixed_in(tmp_path: Path) -> None:
    """A pod whose disk once held a leader of its own keeps its copy and reports the clash."""
    leader = await start_rules(tmp_path / "leader")
    try:
        other = await start_rules(tmp_path / "other")
        await publish(leader, "v1", doc(), leader.clock.now())
        await publish(other, "v1", doc(WEEKEND), other.clock.now())
        await stop_rules(other)
        with pytest.raises(ValueError, match=r"shop v1 here has sha256 .* empty it"):
            await _follower(tmp_path / "other", leader)
        await publish(leader, "v2", doc(BLACK_FRIDAY), leader.clock.now())  # the leader is unaffected
        assert [v[1] for v in await _versions(leader)] == [1, 2]
    finally:
        await stop_rules(leader)


async def test_a_copy_with_versions_the_leader_never_published_is_not_served(tmp_path: Path) -> None:
    """A pod that was a leader of its own holds v1 and v2; the leader it now follows has only v1
    (the same). It started and priced a Monday basket under its own v2 (30 points, the leader's
    10): which replica a ledger reached decided what the receipt earned."""
    own = await start_rules(tmp_path / "pod")
    await publish(own, "v1", doc(), own.clock.now())
    await publish(own, "v2", doc(BLACK_FRIDAY), own.clock.now())
    await stop_rules(own)
    leader = await start_rules(tmp_path / "leader")
    try:
        await publish(leader, "v1", doc(), leader.clock.now())
        try:
            follower = await _follower(tmp_path / "pod", leader)
        except DivergedFromLeader as refused:
            assert "shop v2 here is a version the leader does not have" in str(refused)
        else:
            await stop_rules(follower)
            pytest.fail("a follower holding a version its leader never published started")
    finally:
        await stop_rules(leader)


async def test_a_follower_that_finds_its_copy_contradicts_the_leader_stops_serving(tmp_path: Path) -> None:
    """The clash appears at a reload (the leader lost its directory and was published to
    again): the follower stops, answering nothing more, rather than keep pricing under versions
    the leader does not have and never copying the leader's again."""
    leader = await start_rules(tmp_path / "leader")
    follower = await _follower(tmp_path / "follower", leader)
    try:
        await publish(leader, "v1", doc(), leader.clock.now())
        await publish(leader, "v2", doc(BLACK_FRIDAY), leader.clock.now())
        await until(lambda: _has_versions(follower, 2), 10)
        await stop_rules(leader)
        leader = await start_rules(tmp_path / "leader-again", rules_addr=leader.address)
        await publish(leader, "v1", doc(), leader.clock.now())
        await publish(leader, "v2", doc(WEEKEND), leader.clock.now())  # another v2
        await asyncio.wait_for(follower.app.server.wait_stopped(), 10)
        assert "shop v2 here" in follower.app.diverged and "empty it" in follower.app.diverged
        with pytest.raises(grpc.aio.AioRpcError):
            await _points(follower)
    finally:
        await stop_rules(follower)
        await stop_rules(leader)


async def test_a_listing_that_lacks_a_version_once_does_not_stop_a_follower(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader re-reading its index can list a moment-old one right after a publish: a version
    missing from one listing only is no divergence, and the follower serves on."""
    leader, follower = replicas.leader, replicas.a
    await publish(leader, "v1", doc(), leader.clock.now())
    await publish(leader, "v2", doc(BLACK_FRIDAY), leader.clock.now())
    await until(lambda: _has_versions(follower, 2), 10)
    assert follower.app.mirror is not None
    listed = follower.app.mirror.leader.ListVersions
    lacking: list[bool] = []

    async def once_without_v2(request: rules_pb2.ListVersionsRequest, **kwargs: Any) -> Any:
        found = await listed(request, **kwargs)
        if not lacking:
            lacking.append(True)
            kept = [v for v in found.versions if v.version != 2]
            return rules_pb2.ListVersionsResponse(versions=kept)
        return found

    monkeypatch.setattr(follower.app.mirror.leader, "ListVersions", once_without_v2)
    await until(lambda: _pulled_after(lacking, follower), 10)
    assert follower.app.diverged == "" and len(await _versions(follower)) == 2


async def _pulled_after(lacking: list[bool], follower: RulesUnderTest) -> bool:
    """Two reload intervals went by since the short listing."""
    if not lacking:
        return False
    await asyncio.sleep(0.5)
    return True


async def test_gamification_runs_on_the_leader_and_answers_through_a_follower(tmp_path: Path) -> None:
    """The ledger evaluates through a follower; only the leader consumes the ledger's events
    (the follower asked for a consumer too and runs none), so every purchase counts once."""
    redis = RedisServer(free_port(), tmp_path / "redis")
    redis.start()
    clock = ManualClock(START)
    ledger_port = free_port()
    common: dict[str, object] = {"redis_url": redis.url, "ledger_addr": f"127.0.0.1:{ledger_port}",
                                 "program": "meshmart", "gamification_consumer": True}  # fmt: skip
    leader = await start_rules(tmp_path / "leader", clock, rules_seed_file=str(write_program(tmp_path)), **common)
    follower = await _follower(tmp_path / "follower", leader, **common)
    ledger = await start_ledger(
        tmp_path / "ledger", redis.url, clock, ledger_addr=f"127.0.0.1:{ledger_port}", rules_addr=follower.address,
        program="meshmart", rules_deadline_seconds=2.0,
    )  # fmt: skip
    try:
        assert follower.app.worker is None and leader.app.worker is not None
        member = (await create_member(ledger.stub)).member_id
        joined = await follower.stub.JoinChallenge(
            rules_pb2.JoinChallengeRequest(program="meshmart", challenge_id="vip-sprint", member_id=member)
        )
        assert joined.joined
        for _ in range(3):
            clock.advance(timedelta(hours=1))
            await ledger.stub.RecordPurchase(purchase_request(member, [("misc", 1000, 1)], at=clock.now()))
        request = rules_pb2.GetMemberProgressRequest(program="meshmart", member_id=member)

        async def paid() -> bool:
            found = await follower.stub.GetMemberProgress(request)
            return found.rewards_paid_points == 320 and found.rewards_pending_points == 0  # trio 200 + sprint 120

        await until(paid, 20)
        through_follower = await follower.stub.GetMemberProgress(request)
        assert through_follower == await leader.stub.GetMemberProgress(request)
        trio = next(i for i in through_follower.items if i.item_id == "january-trio")
        assert (trio.progress, trio.completions) == (3, 1)
    finally:
        await stop_ledger(ledger)
        await stop_rules(follower)
        await stop_rules(leader)
        redis.stop()
