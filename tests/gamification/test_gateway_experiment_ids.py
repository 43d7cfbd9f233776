"""The ops report of an experiment over REST serves every experiment id a program may name:
publishing accepts 1..64 of letters, digits and `_.:-` in any position (rules_svc.program.NAME_RE),
and GetExperimentReport / `pointmesh experiments report` serve such an experiment. Before, the
gateway's path pattern asked for a letter or digit first and refused `_double-vs-base` with 400."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from pointmesh.v1 import common_pb2, rules_pb2
from tests.gamification.conftest import EXPERIMENTS, Game, write_program
from tests.gateway.conftest import GatewayUnderTest, start_gateway
from tests.gateway.test_api import problem
from tests.mesh.conftest import Mesh

EXPERIMENT_ID = "_double-vs-base"


@pytest.fixture
async def game_gw(game: Game, tmp_path: Path) -> AsyncIterator[GatewayUnderTest]:
    """The gamification mesh behind a gateway, its experiment renamed `_double-vs-base` by a
    version published now (a valid program name)."""
    document = yaml.safe_load(write_program(tmp_path).read_text())
    document["experiments"] = [{**EXPERIMENTS[0], "id": EXPERIMENT_ID}]
    await game.rules.stub.PublishProgram(rules_pb2.PublishProgramRequest(
        idempotency_key=common_pb2.IdempotencyKey(key="underscore-1"), document=yaml.safe_dump(document),
        published_by="ops",
    ))  # fmt: skip
    services = Mesh(game.rules, game.ledger, game.clock, game.rules.app.port, tmp_path)
    running = await start_gateway(tmp_path / "gateway", services, game.redis.url)
    yield running
    running.uvicorn.should_exit = True
    await running.task


async def test_an_experiment_id_starting_with_an_underscore_is_reported_over_rest(
    game_gw: GatewayUnderTest, game: Game
) -> None:
    found = await game.rules.stub.GetExperimentReport(  # rules_svc published it and reports it
        rules_pb2.GetExperimentReportRequest(program="meshmart", experiment_id=EXPERIMENT_ID)
    )
    assert found.experiment_id == EXPERIMENT_ID
    async with game_gw.client("ops") as ops:
        got = await ops.get(f"/v1/ops/experiments/{EXPERIMENT_ID}")
        assert got.status_code == 200, got.text
        assert got.json()["experiment_id"] == EXPERIMENT_ID
        # The bounds of a name still hold: 64 characters reach rules_svc (no such experiment), 65 do not.
        problem(await ops.get(f"/v1/ops/experiments/{'-' * 64}"), 404)
        problem(await ops.get(f"/v1/ops/experiments/{'-' * 65}"), 400)
        problem(await ops.get("/v1/ops/experiments/not%20an%20id"), 400)
