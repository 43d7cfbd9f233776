"""Gamification through the REST gateway: a member's progress and rewards, running challenges,
opting in, the leaderboard; a member token reads only its own progress."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from gateway.app import key_store
from pointmesh.v1 import rules_pb2
from tests.gamification.conftest import Game
from tests.gateway.conftest import GatewayUnderTest, start_gateway
from tests.gateway.test_api import enrol, idem, problem, purchase_body
from tests.gateway.test_auth_and_live import member_token, next_message
from tests.mesh.conftest import Mesh
from tests.waiting import until


@pytest.fixture
async def game_gw(game: Game, tmp_path: Path) -> AsyncIterator[GatewayUnderTest]:
    services = Mesh(game.rules, game.ledger, game.clock, game.rules.app.port, tmp_path)
    running = await start_gateway(tmp_path / "gateway", services, game.redis.url)
    yield running
    running.uvicorn.should_exit = True
    await running.task


async def test_progress_challenges_join_and_leaderboard_over_rest(game_gw: GatewayUnderTest, game: Game) -> None:
    gw = game_gw
    async with gw.client("pos") as pos:
        member, other = await enrol(pos), await enrol(pos)
        running = (await pos.get("/v1/challenges")).json()["challenges"]
        assert {c["challenge_id"] for c in running} == {"january-trio", "winter-ten", "vip-sprint"}  # not december
        joined = await pos.post("/v1/challenges/vip-sprint/join", json={"member_id": member})
        assert joined.status_code == 200 and joined.json() == {"joined": True}
        for i in range(3):
            bought = await pos.post("/v1/purchases", json=purchase_body(gw, member, f"G-{i}", 1000), headers=idem())
            assert bought.status_code == 201, bought.text
            game.clock.advance(timedelta(hours=2))
        await pos.post("/v1/purchases", json=purchase_body(gw, other, "G-o", 1000), headers=idem())

        async def rewarded() -> bool:
            found = (await pos.get(f"/v1/members/{member}/progress")).json()
            return bool(found["rewards_paid_points"] == 200 + 120 and found["rewards_pending_points"] == 0)

        await until(rewarded, 20)
        items = {i["item_id"]: i for i in (await pos.get(f"/v1/members/{member}/progress")).json()["items"]}
        assert (items["january-trio"]["progress"], items["january-trio"]["completions"]) == (3, 1)
        assert items["vip-sprint"]["joined"] and items["january-trio"]["kind"] == "CHALLENGE"
        assert items["january-trio"]["last_completed_at"] is not None

        board = (await pos.get("/v1/challenges/january-trio/leaderboard", params={"limit": 5})).json()
        assert [(e["rank"], e["member_id"], e["progress"]) for e in board["entries"]] == [(1, member, 3), (2, other, 1)]
        problem(await pos.get("/v1/challenges/nope/leaderboard"), 404)
    async with gw.client("ops") as ops:
        report = (await ops.get("/v1/ops/experiments/double-vs-base")).json()
        assert report["alpha"] == 0.05 and {a["arm"] for a in report["arms"]} == {"base", "double"}
        assert sum(a["members"] for a in report["arms"]) == 2  # both members purchased while assigned
        assert [a["control"] for a in report["arms"]] == [True, False]
        problem(await ops.get("/v1/ops/experiments/nope"), 404)

    token = await member_token(gw, member)
    async with gw.client(token=token) as app:
        assert (await app.get(f"/v1/members/{member}/progress")).status_code == 200
        problem(await app.get(f"/v1/members/{other}/progress"), 403)


async def test_an_achievement_appears_on_the_members_websocket(game_gw: GatewayUnderTest, game: Game) -> None:
    gw = game_gw
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        token = await member_token(gw, member)
        async with connect(f"{gw.ws_url}/v1/members/{member}/live?token={token}") as ws:
            assert json.loads(await ws.recv())["type"] == "subscribed"
            for i in range(3):  # the third completes the January challenge
                bought = await pos.post("/v1/purchases", json=purchase_body(gw, member, f"A-{i}", 1000), headers=idem())
                assert bought.status_code == 201, bought.text
                game.clock.advance(timedelta(minutes=10))  # within the member token's hour
            unlocked = await next_message(ws, "achievement_unlocked")
    assert unlocked["details"]["item_id"] == "january-trio"
    assert unlocked["details"]["name"] == "Three purchases in January"
    assert unlocked["details"]["points"] == "200" and unlocked["details"]["funding_source"] == "gamification"


async def test_joining_needs_members_write_on_a_key_and_the_member_itself_on_a_token(game_gw: GatewayUnderTest) -> None:
    gw = game_gw
    writer = key_store(gw.settings).create("web", ["members:write"], [], "signup backend")[0]
    async with gw.client("pos") as pos, gw.client(token=writer) as backend, gw.client("reader") as reader:
        member, other = await enrol(pos), await enrol(pos)
        joined = await backend.post("/v1/challenges/vip-sprint/join", json={"member_id": member})
        assert joined.status_code == 200 and joined.json() == {"joined": True}, joined.text
        problem(await reader.post("/v1/challenges/vip-sprint/join", json={"member_id": member}), 403)
        token = (await pos.post(f"/v1/members/{member}/tokens")).json()["token"]
    async with gw.client(token=token) as own:
        assert (await own.post("/v1/challenges/vip-sprint/join", json={"member_id": member})).status_code == 200
        problem(await own.post("/v1/challenges/vip-sprint/join", json={"member_id": other}), 403)


async def test_joining_a_challenge_for_a_member_that_does_not_exist_is_404(game_gw: GatewayUnderTest) -> None:
    """rules_svc keeps a row for any id it is asked about: the gateway asks the ledger first, as
    the progress route does, so a mistyped id is not answered joined (nor stored)."""
    async with game_gw.client("pos") as pos:
        ghost = "m_" + "f" * 28  # the shape of a member id; no such member
        missing = problem(await pos.post("/v1/challenges/vip-sprint/join", json={"member_id": ghost}), 404)
        assert "member_id" in str(missing)
        found = await game_gw.mesh.rules.stub.GetMemberProgress(
            rules_pb2.GetMemberProgressRequest(program=game_gw.settings.program, member_id=ghost)
        )
        assert not [i for i in found.items if i.joined]
