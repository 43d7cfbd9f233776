"""A/B experiments: stable assignment, evaluation tagged and priced by arm through the real
services, and statistics that find a true lift and do not find one in an A/A test.

The statistical tests are seeded (numpy default_rng) and use the documented alpha (0.05): with
3,000 members per arm, a repeat-purchase lift from 30% to 36% has power above 0.99, and the
A/A population below is drawn from one distribution for both arms.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from pointmesh.v1 import rules_pb2
from rules_svc.experiment_stats import ALPHA, report
from rules_svc.experiments import assign, bucket
from rules_svc.game_engine import PurchaseFact
from rules_svc.game_store import GameStore
from rules_svc.program import Experiment
from tests.conftest import pointmesh_cli
from tests.gamification.conftest import EXPERIMENTS, Game
from tests.ledger.helpers import create_member
from tests.mesh.helpers import purchase_request
from tests.rules import load_doc, program_doc
from tests.waiting import until

EXPERIMENT = Experiment.model_validate(EXPERIMENTS[0])


def test_assignment_is_stable_follows_the_allocation_and_depends_on_the_salt() -> None:
    members = [f"m_{i:06d}" for i in range(20_000)]
    arms = [assign(EXPERIMENT, m) for m in members]
    assert arms == [assign(EXPERIMENT, m) for m in members]
    assert abs(arms.count("double") / len(arms) - 0.5) < 0.02
    other = EXPERIMENT.model_copy(update={"salt": "spring-2026"})
    agree = sum(a == assign(other, m) for a, m in zip(arms, members, strict=True)) / len(members)
    assert abs(agree - 0.5) < 0.02  # a new salt reshuffles: no carry-over between experiments
    assert all(0 <= bucket("s", m) < 10_000 for m in members[:100])


def _population(store: GameStore, arm: str, members: int, repeat: float, rng: np.random.Generator) -> None:
    """Each member buys once; with probability `repeat` they come back (1 + Poisson(0.6) more)."""
    back = rng.random(members) < repeat
    extra = rng.poisson(0.6, members)
    for i in range(members):
        purchases = 1 + (1 + int(extra[i]) if back[i] else 0)
        store.record_exposure("meshmart", "exp", f"{arm}-{i}", arm, purchases, 10 * purchases)


def test_a_true_lift_is_significant_and_an_a_a_test_is_not(tmp_path: Path) -> None:
    rng = np.random.default_rng(20261124)
    store = GameStore(tmp_path / "ab.db")
    _population(store, "base", 3000, 0.30, rng)
    _population(store, "double", 3000, 0.36, rng)
    base, double = report(store.experiment_members("meshmart", "exp", ""), "base")
    assert (base.arm, base.members, double.members) == ("base", 3000, 3000)
    assert double.significant and double.p_repeat < ALPHA
    assert double.lift_ci[0] < 0.06 < double.lift_ci[1] and double.lift_ci[0] > 0
    assert double.repeat_ci[0] < double.repeat_rate < double.repeat_ci[1]
    assert double.points_per_incremental_purchase == pytest.approx(10.0)
    store.close()

    aa = GameStore(tmp_path / "aa.db")
    _population(aa, "base", 3000, 0.30, rng)
    _population(aa, "double", 3000, 0.30, rng)
    _base, same = report(aa.experiment_members("meshmart", "exp", ""), "base")
    assert not same.significant and same.p_repeat >= ALPHA
    assert same.lift_ci[0] < 0 < same.lift_ci[1]
    aa.close()


async def test_accruals_are_tagged_and_priced_by_arm_and_the_report_counts_them(game: Game) -> None:
    members = [(await create_member(game.ledger.stub)).member_id for _ in range(12)]
    arms = {m: assign(EXPERIMENT, m) for m in members}
    assert set(arms.values()) == {"base", "double"}
    for round_ in range(2):
        for m in members[: 6 + 6 * round_]:  # six members buy twice, six once
            bought = await game.ledger.stub.RecordPurchase(
                purchase_request(m, [("misc", 1000, 1)], at=game.clock.now(), channel="pos")
            )
            p = bought.purchase
            assert dict(p.experiment_arms) == {"double-vs-base": arms[m]}
            doubled = [part.part.points for part in p.parts if part.part.rule_id == "exp-double"]
            # The experiment's rule pays only its arm: 10 more points on a 10 EUR till purchase.
            assert doubled == ([10] if arms[m] == "double" else [])
        game.clock.advance(timedelta(hours=1))

    async def counted() -> bool:
        found = await game.rules.stub.GetExperimentReport(
            rules_pb2.GetExperimentReportRequest(program="meshmart", experiment_id="double-vs-base")
        )
        return sum(a.members for a in found.arms) == 12 and sum(
            a.purchases_per_member * a.members for a in found.arms
        ) == pytest.approx(18)

    await until(counted, 20)
    found = await game.rules.stub.GetExperimentReport(
        rules_pb2.GetExperimentReportRequest(program="meshmart", experiment_id="double-vs-base")
    )
    by_arm = {a.arm: a for a in found.arms}
    assert by_arm["base"].control and not by_arm["double"].control
    for arm in ("base", "double"):
        mine = [m for m in members if arms[m] == arm]
        repeaters = [m for m in mine if members.index(m) < 6]
        assert by_arm[arm].members == len(mine)
        assert by_arm[arm].repeat_rate == pytest.approx(len(repeaters) / len(mine))

    done = await asyncio.to_thread(
        pointmesh_cli, "experiments", "report", "double-vs-base", "--program", "meshmart",
        env={"POINTMESH_RULES_ADDR": game.rules.address},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "experiment double-vs-base (Double points at the till), alpha 0.05" in done.stdout
    assert any(line.startswith("double") for line in done.stdout.splitlines())


_events = itertools.count()
# The experiment without its arm's rule, so a bare program can carry it.
_BARE = {**EXPERIMENTS[0], "arms": [{"id": "base", "allocation": 50}, {"id": "double", "allocation": 50}]}


def _purchase(store: GameStore, salt: str, member_id: str, arm: str, points: int) -> None:
    program = load_doc(program_doc(experiments=[{**_BARE, "salt": salt}]))
    n = next(_events)
    store.apply_event(program, PurchaseFact(f"ex{n}", member_id, f"px{n}", "pos", "HEL-01", 1000, "EUR",
                                            EXPERIMENT.starts + timedelta(days=1), earned=(("points", points),),
                                            experiment_arms=((EXPERIMENT.id, arm),)))  # fmt: skip


def test_exposures_are_kept_per_arm_and_salt_so_a_member_who_changed_arm_is_not_counted_in_either(
    tmp_path: Path,
) -> None:
    """An allocation ramp moves some members to another arm mid-experiment; a new salt is a new
    assignment. Neither may put one arm's purchases in the other's figures."""
    store = GameStore(tmp_path / "game.sqlite")
    _purchase(store, "winter-2026", "stays-base", "base", 10)
    _purchase(store, "winter-2026", "stays-base", "base", 10)
    _purchase(store, "winter-2026", "moved", "base", 10)
    _purchase(store, "winter-2026", "moved", "double", 20)  # the ramp moved them
    _purchase(store, "winter-2026", "stays-double", "double", 20)
    _purchase(store, "spring-2026", "stays-double", "base", 10)  # re-assigned under the new salt

    assert store.experiment_members("test", EXPERIMENT.id, "winter-2026") == {"base": [(2, 20)], "double": [(1, 20)]}
    assert store.experiment_members("test", EXPERIMENT.id, "spring-2026") == {"base": [(1, 10)]}
    store.close()


def test_a_store_from_before_exposures_were_kept_per_arm_moves_its_rows_over(tmp_path: Path) -> None:
    path = tmp_path / "game.sqlite"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE experiment_members (program TEXT NOT NULL, experiment_id TEXT NOT NULL,"
                " member_id TEXT NOT NULL, arm TEXT NOT NULL, purchases INTEGER NOT NULL, points INTEGER NOT NULL,"
                " PRIMARY KEY (program, experiment_id, member_id)) WITHOUT ROWID")  # fmt: skip
    old.execute("INSERT INTO experiment_members VALUES ('test', 'exp', 'm-1', 'base', 3, 30)")
    old.commit()
    old.close()

    store = GameStore(path)
    assert store.experiment_members("test", "exp", "any-salt") == {"base": [(3, 30)]}
    store.close()
    again = GameStore(path)  # moved once, read the same
    assert again.experiment_members("test", "exp", "any-salt") == {"base": [(3, 30)]}
    again.close()
