"""A best-of group is decided at its first-ranked member's position whichever condition that
member fails: channel, store, region, day, time window, campaign dates or an experiment arm,
as well as line conditions (tests/rules/test_validation_and_grouping.py).

Group g: `a` (priority 10) and `b` x2 (priority 50); `c` x2 compound (priority 30, no group).
When a fails, b wins and stands at priority 10, before c: base 100, b +100, c doubles the
running 200: +200, total 400. Priced at its own priority 50 it would be 100 + 100 + 100 = 300.
One line of 100.00 EUR at a Helsinki till on Wednesday 2026-01-07, 14:00 local.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from rules_svc.domain import Basket, Evaluation, Line, MemberContext
from rules_svc.experiments import assign
from rules_svc.program import Experiment
from tests.rules import compile_doc, program_doc

WEDNESDAY_NOON = datetime(2026, 1, 7, 12, 0, tzinfo=UTC)
NOBODY = MemberContext(member_id="m-1")

FAILS_AT_A_HELSINKI_TILL = {
    "channels": {"channels": ["app"]},
    "stores": {"stores": ["LIS-01"]},
    "regions": {"regions": ["PT"]},
    "days_of_week": {"days_of_week": ["mon"]},
    "time_window": {"time_window": {"start": "18:00", "end": "20:00"}},
    "date_range": {"date_range": {"start": "2026-02-01T00:00:00"}},
    "skus": {"skus": ["no-such-sku"]},
}

EXPERIMENT = {
    "id": "web-double", "salt": "spring", "control": "control",
    "starts": "2026-01-01T00:00:00+00:00", "ends": "2026-04-01T00:00:00+00:00",
    "arms": [{"id": "control", "allocation": 50}, {"id": "treated", "allocation": 50, "rules": ["a"]}],
}  # fmt: skip


def basket(channel: str = "pos", store: str = "HEL-01") -> Basket:
    return Basket(channel, store, "r-1", "EUR", 10_000, (Line("sku-0", "misc", 1, 10_000),), WEDNESDAY_NOON)


def program(a_when: dict[str, Any], a_multiplier: str = "2", **top: Any) -> dict[str, Any]:
    return program_doc(
        {"id": "a", "priority": 10, "group": "g", "when": a_when, "effect": {"multiplier": a_multiplier}},
        {"id": "b", "priority": 50, "group": "g", "effect": {"multiplier": "2"}},
        {"id": "c", "priority": 30, "effect": {"multiplier": "2", "compound": True}},
        groups=[{"id": "g", "mode": "best_of"}],
        **top,
    )


def order(evaluation: Evaluation) -> list[tuple[str, int]]:
    return [(p.rule_id, p.points) for p in evaluation.components]


def member_in(arm: str) -> MemberContext:
    experiment = Experiment.model_validate(EXPERIMENT)
    member_id = next(m for m in (f"m-{i}" for i in range(1000)) if assign(experiment, m) == arm)
    return MemberContext(member_id=member_id)


@pytest.mark.parametrize("failing", sorted(FAILS_AT_A_HELSINKI_TILL))
def test_the_group_stands_at_its_openers_position_whichever_condition_the_opener_fails(failing: str) -> None:
    engine = compile_doc(program(FAILS_AT_A_HELSINKI_TILL[failing]))

    evaluation = engine.evaluate(basket(), NOBODY)

    assert order(evaluation) == [("base", 100), ("b", 100), ("c", 200)]
    assert sum(p.points for p in evaluation.components) == evaluation.totals()["points"] == 400
    assert evaluation.excluded == ()


def test_the_group_stands_at_its_openers_position_when_an_experiment_arm_gates_the_opener_out() -> None:
    engine = compile_doc(program({}, a_multiplier="3", experiments=[EXPERIMENT]))

    control = engine.evaluate(basket(), member_in("control"))
    treated = engine.evaluate(basket(), member_in("treated"))

    assert order(control) == [("base", 100), ("b", 100), ("c", 200)]
    assert control.excluded == ()
    # In the treated arm a applies and pays more (x3: +200); c doubles 300.
    assert order(treated) == [("base", 100), ("a", 200), ("c", 300)]
    assert [e.rule_id for e in treated.excluded] == ["b"]
    for evaluation in (control, treated):
        assert sum(p.points for p in evaluation.components) == evaluation.totals()["points"]


def test_the_same_minute_on_another_channel_lets_the_opener_compete() -> None:
    engine = compile_doc(program({"channels": ["app"]}, a_multiplier="3"))

    till = engine.evaluate(basket("pos"), NOBODY)
    app = engine.evaluate(basket("app", store=""), NOBODY)
    till_again = engine.evaluate(basket("pos"), NOBODY)

    assert order(till) == order(till_again) == [("base", 100), ("b", 100), ("c", 200)]
    assert order(app) == [("base", 100), ("a", 200), ("c", 300)]
    assert [e.rule_id for e in app.excluded] == ["b"]


def test_a_group_none_of_whose_members_holds_here_pays_nothing_and_moves_nothing() -> None:
    engine = compile_doc(
        program_doc(
            {"id": "a", "priority": 10, "group": "g", "when": {"channels": ["app"]}, "effect": {"multiplier": "3"}},
            {"id": "b", "priority": 50, "group": "g", "when": {"stores": ["LIS-01"]}, "effect": {"multiplier": "2"}},
            {"id": "c", "priority": 30, "effect": {"multiplier": "2", "compound": True}},
            groups=[{"id": "g", "mode": "best_of"}],
        )
    )

    evaluation = engine.evaluate(basket(), NOBODY)

    assert order(evaluation) == [("base", 100), ("c", 100)]
    assert evaluation.excluded == ()


def test_a_later_member_failing_its_place_does_not_contend() -> None:
    engine = compile_doc(
        program_doc(
            {"id": "a", "priority": 10, "group": "g", "effect": {"multiplier": "2"}},
            {"id": "b", "priority": 50, "group": "g", "when": {"channels": ["app"]}, "effect": {"multiplier": "5"}},
            groups=[{"id": "g", "mode": "best_of"}],
        )
    )

    evaluation = engine.evaluate(basket(), NOBODY)

    assert order(evaluation) == [("base", 100), ("a", 100)]
    assert evaluation.excluded == ()
