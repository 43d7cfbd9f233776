"""GetMemberProgress's reward figures are points: a reward paid in another unit (tier credits)
is no point the member can spend, so it stays out of rewards paid and pending.

In process, as rules_svc wires them: the version store and rules service, the game store and
service (real SQLite); rewards are settled in the store as the worker would once the ledger
answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from pointmesh.clock import ManualClock
from rules_svc.game_engine import PurchaseFact
from rules_svc.game_service import GameService
from rules_svc.game_store import GameStore
from rules_svc.service import RulesService
from rules_svc.versions import VersionStore
from tests.rules import program_doc

PUBLISHED = datetime(2026, 1, 1, tzinfo=UTC)
BOUGHT = datetime(2026, 1, 7, 12, tzinfo=UTC)


@pytest.fixture
async def game(tmp_path: Path) -> AsyncIterator[GameService]:
    clock = ManualClock(BOUGHT)
    rules = RulesService(VersionStore(tmp_path / "programs.db"), clock)
    service = GameService(rules, GameStore(tmp_path / "gamification.db"), clock)
    yield service
    service.store.close()
    rules.versions.close()


async def test_rewards_paid_and_pending_count_points_not_tier_credits(game: GameService) -> None:
    """One purchase completes four achievements: 50 points and 5000 tier credits paid, 20 points
    and 700 tier credits still pending. Progress says 50 paid and 20 pending, not 5050 and 720."""
    doc = program_doc(
        units=["points", "tier_credits"],
        gamification={"achievements": [
            {"id": "paid-points", "name": "First", "reward": {"points": 50}},
            {"id": "paid-credits", "name": "First, credits", "reward": {"points": 5000, "unit": "tier_credits"}},
            {"id": "pending-points", "name": "First again", "reward": {"points": 20}},
            {"id": "pending-credits", "name": "First, more credits", "reward": {"points": 700, "unit": "tier_credits"}},
        ]},
    )  # fmt: skip
    await game.rules.publish("test", "v1", yaml.safe_dump(doc, sort_keys=False), "yaml", PUBLISHED, "test",
                             backdated=True)  # fmt: skip
    program = game.program_at("test", BOUGHT)
    fact = PurchaseFact("e-1", "m-1", "p-1", "pos", "HEL-01", 1000, "EUR", BOUGHT)
    awards = game.store.apply_event(program, fact)
    assert awards is not None and len(awards) == 4
    for reward in game.store.pending("m-1"):
        if reward.item_id.startswith("paid-"):
            assert game.store.settle(reward.key, "PAID", f"tx-{reward.item_id}")

    progress = await game.progress("test", "m-1")

    assert (progress.paid_points, progress.pending_points) == (50, 20)
