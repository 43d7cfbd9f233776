"""Gamification through real services: ledger_svc and rules_svc on loopback, a private
redis-server carrying the ledger's events (so no other test's events reach this consumer
group), the mesh program with a gamification block, one test clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from pointmesh.clock import ManualClock
from pointmesh.events import BusMessage
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import ledger_pb2, rules_pb2
from rules_svc.game_store import GameStore
from rules_svc.game_worker import GameWorker
from rules_svc.program import Program
from tests.conftest import LedgerUnderTest, RulesUnderTest, start_ledger, start_rules, stop_ledger, stop_rules

MESH_PROGRAM = Path(__file__).resolve().parents[1] / "mesh" / "program.yaml"
# A Monday in winter (the mesh clock): Helsinki is UTC+2.
START = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
GAMIFICATION = """
gamification:
  achievements:
    - {id: first-app, name: First app purchase, match: {channels: [app]}, reward: {points: 50}}
    - {id: explorer, name: Five categories, distinct: category, count: 5, reward: {points: 75}}
  streaks:
    - {id: weekly-3, name: Three weeks in a row, weeks: 3, reward: {points: 300}}
  challenges:
    - id: january-trio
      name: Three purchases in January
      starts: "2026-01-01T00:00:00+00:00"
      ends: "2026-02-01T00:00:00+00:00"
      purchases: 3
      reward: {points: 200}
    - id: december-pair
      name: Two purchases in December
      starts: "2025-12-01T00:00:00+00:00"
      ends: "2026-01-01T00:00:00+00:00"
      purchases: 2
      reward: {points: 999}
    - id: winter-ten
      name: Ten purchases this winter
      starts: "2026-01-01T00:00:00+00:00"
      ends: "2026-04-01T00:00:00+00:00"
      purchases: 10
      reward: {points: 500}
    - id: vip-sprint
      name: Two purchases, members who joined
      starts: "2026-01-01T00:00:00+00:00"
      ends: "2026-03-01T00:00:00+00:00"
      purchases: 2
      opt_in: true
      reward: {points: 120}
"""


EXPERIMENT_RULE = {"id": "exp-double", "priority": 50, "when": {"channels": ["pos"]}, "effect": {"multiplier": "2"}}
EXPERIMENTS = [{
    "id": "double-vs-base", "name": "Double points at the till", "salt": "winter-2026", "control": "base",
    "starts": "2026-01-01T00:00:00+00:00", "ends": "2026-04-01T00:00:00+00:00",
    "arms": [{"id": "base", "allocation": 50}, {"id": "double", "allocation": 50, "rules": ["exp-double"]}],
}]  # fmt: skip


def write_program(directory: Path) -> Path:
    """The mesh program plus the gamification block and one experiment (its rule included)."""
    document = yaml.safe_load(MESH_PROGRAM.read_text())
    document.update(yaml.safe_load(GAMIFICATION))
    document["rules"].append(EXPERIMENT_RULE)
    document["experiments"] = EXPERIMENTS
    path = directory / "game-program.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@dataclass
class Game:
    ledger: LedgerUnderTest
    rules: RulesUnderTest
    clock: ManualClock
    redis: RedisServer

    async def progress(self, member_id: str) -> rules_pb2.GetMemberProgressResponse:
        return await self.rules.stub.GetMemberProgress(
            rules_pb2.GetMemberProgressRequest(program="meshmart", member_id=member_id)
        )


@pytest.fixture
async def game(tmp_path: Path) -> AsyncIterator[Game]:
    redis = RedisServer(free_port(), tmp_path / "redis")
    redis.start()
    clock = ManualClock(START)
    rules_port, ledger_port = free_port(), free_port()
    rules = await start_rules(
        tmp_path / "rules", clock, rules_addr=f"127.0.0.1:{rules_port}", rules_seed_file=str(write_program(tmp_path)),
        gamification_consumer=True, redis_url=redis.url, ledger_addr=f"127.0.0.1:{ledger_port}", program="meshmart",
    )  # fmt: skip
    ledger = await start_ledger(
        tmp_path / "ledger", redis.url, clock, ledger_addr=f"127.0.0.1:{ledger_port}",
        rules_addr=f"127.0.0.1:{rules_port}", program="meshmart", rules_deadline_seconds=2.0,
    )  # fmt: skip
    yield Game(ledger, rules, clock, redis)
    await stop_ledger(ledger)
    await stop_rules(rules)
    redis.stop()


def handler(store: GameStore, program: Program, ledger: LedgerUnderTest | None = None,
            retention: timedelta | None = None) -> GameWorker:  # fmt: skip
    """The consumer's handler and payer (over a real ledger, when given), with `program` in
    effect always; fed events by hand."""
    return GameWorker(store, lambda _p, _t: program, program.program, bus=None,  # type: ignore[arg-type]
                      ledger=ledger.stub if ledger else None, consumer="test",  # type: ignore[arg-type]
                      retention=retention)  # fmt: skip


def rejected_review(event_id: str, member_id: str, purchase_id: str, at: datetime | None = None) -> BusMessage:
    """The ledger's review_decided event rejecting the purchase's held earn (at `at`, if given)."""
    event = ledger_pb2.LedgerEvent(event_id=event_id, member_id=member_id, review_decided=ledger_pb2.ReviewEvent(
        review_id="rv-1", kind=ledger_pb2.REVIEW_KIND_EARN, status=ledger_pb2.REVIEW_STATUS_REJECTED,
        purchase_id=purchase_id,
    ))  # fmt: skip
    if at is not None:
        event.occurred_at.FromDatetime(at)
    return BusMessage("1-0", member_id, event_id, "review_decided", event.SerializeToString())
