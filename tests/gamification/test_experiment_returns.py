"""A purchase taken back leaves its experiment arm's figures: an arm whose offer drew purchases
that came back must not look better than it did. Through the real ledger and rules_svc (the
return reaches the report over Redis Streams), and on the store for a program that counts
purchases only for an experiment (no achievement, streak or challenge to find the purchase by)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pointmesh.v1 import ledger_pb2, rules_pb2
from rules_svc.experiments import assign
from rules_svc.game_engine import PurchaseFact
from rules_svc.game_store import GameStore
from rules_svc.program import Experiment
from tests.gamification.conftest import EXPERIMENTS, Game
from tests.ledger.helpers import create_member, key
from tests.mesh.helpers import purchase_request
from tests.rules import load_doc, program_doc
from tests.waiting import until

EXPERIMENT = Experiment.model_validate(EXPERIMENTS[0])
_BARE = {**EXPERIMENTS[0], "arms": [{"id": "base", "allocation": 50}, {"id": "double", "allocation": 50}]}


async def _report(game: Game) -> dict[str, rules_pb2.ArmResult]:
    found = await game.rules.stub.GetExperimentReport(
        rules_pb2.GetExperimentReportRequest(program="meshmart", experiment_id="double-vs-base")
    )
    return {a.arm: a for a in found.arms}


async def test_a_full_return_leaves_the_arm_and_a_partial_one_does_not(game: Game) -> None:
    member = (await create_member(game.ledger.stub)).member_id
    arm = assign(EXPERIMENT, member)
    bought = []
    for _ in range(3):
        game.clock.advance(timedelta(hours=2))
        response = await game.ledger.stub.RecordPurchase(
            purchase_request(member, [("misc", 1000, 1), ("misc", 500, 1)], at=game.clock.now())
        )
        bought.append(response.purchase)

    async def counted(purchases: int) -> bool:
        mine = (await _report(game)).get(arm)
        return mine is not None and mine.members == 1 and round(mine.purchases_per_member) == purchases

    await until(lambda: counted(3), 20)
    earned = sum(u.points for p in bought for u in p.earned if u.unit == "points")
    assert (await _report(game))[arm].points_per_member == earned

    async def give_back(purchase: ledger_pb2.Purchase, lines: list[int]) -> None:
        await game.ledger.stub.RecordReturn(ledger_pb2.RecordReturnRequest(
            idempotency_key=key(), purchase_id=purchase.purchase_id, channel="pos", store_id="HEL-01",
            lines=[ledger_pb2.ReturnLine(line_index=i, quantity=1) for i in lines],
        ))  # fmt: skip

    await give_back(bought[0], [1])  # partial: still a purchase, still counted
    await give_back(bought[1], [0, 1])  # full: out of the figures, with the points it earned
    await until(lambda: counted(2), 20)
    mine = (await _report(game))[arm]
    kept = sum(u.points for p in (bought[0], bought[2]) for u in p.earned if u.unit == "points")
    assert (mine.members, mine.points_per_member, mine.repeat_rate) == (1, kept, 1.0)


def _fact(event: str, member: str, purchase: str, arm: str, points: int) -> PurchaseFact:
    return PurchaseFact(event, member, purchase, "pos", "HEL-01", 1000, "EUR", EXPERIMENT.starts + timedelta(days=1),
                        earned=(("points", points),), experiment_arms=((EXPERIMENT.id, arm),))  # fmt: skip


def test_a_purchase_counted_only_for_an_experiment_is_taken_out_once(tmp_path: Path) -> None:
    program = load_doc(program_doc(experiments=[_BARE]))
    store = GameStore(tmp_path / "game.sqlite")
    store.apply_event(program, _fact("e1", "m1", "p1", "double", 20))
    store.apply_event(program, _fact("e2", "m1", "p2", "double", 30))
    store.apply_event(program, _fact("e3", "m2", "p3", "base", 10))
    assert store.counted_receipt("test", "m1", "p1") == EXPERIMENT.starts + timedelta(days=1)

    assert store.withdraw_event(program, "w1", "m1", "p1") == []
    assert store.withdraw_event(program, "w1", "m1", "p1") is None  # redelivered: nothing more
    assert store.withdraw_event(program, "w2", "m1", "p1") == []  # a rejection after the return: nothing more
    assert store.experiment_members("test", EXPERIMENT.id, EXPERIMENT.salt) == {"double": [(1, 30)], "base": [(1, 10)]}
    assert store.counted_receipt("test", "m1", "p1") is None

    store.withdraw_event(program, "w3", "m2", "p3")  # the member stays exposed, with nothing kept
    assert store.experiment_members("test", EXPERIMENT.id, EXPERIMENT.salt) == {"double": [(1, 30)], "base": [(0, 0)]}
    store.close()
