"""Simulate of a draft must price a basket as Evaluate does once that draft is published."""

from __future__ import annotations

from datetime import UTC, datetime

from pointmesh.v1 import rules_pb2
from tests.conftest import RulesUnderTest
from tests.rules.test_rules_grpc import basket, doc, publish, totals


def promo(start: str, end: str) -> str:
    return (f"  - {{id: promo, effect: {{bonus_points: 100}}, caps: {{per_member_per_campaign: 100}},"
            f" when: {{date_range: {{start: '{start}', end: '{end}'}}}}}}")  # fmt: skip


async def test_simulating_a_longer_campaign_prices_it_as_publishing_it_does(rules: RulesUnderTest) -> None:
    """docs/rules.md, Caps: the same run made longer, its start written at another offset, keeps
    its counter (publish rewrites the start as the earlier version wrote it). Simulate of that
    draft must then preview the same counter and the same points as Evaluate after publishing."""
    at = datetime(2026, 3, 10, 12, tzinfo=UTC)
    await publish(rules, "c1", doc(promo("2026-03-01T00:00:00+02:00", "2026-03-15T00:00:00+02:00")),
                  datetime(2026, 1, 1, tzinfo=UTC))  # fmt: skip
    longer = doc(promo("2026-02-28T22:00:00Z", "2026-03-22T00:00:00+02:00"))  # same instant, written as UTC
    # The member already took the whole campaign cap under v1.
    member = rules_pb2.MemberContext(
        member_id="m1", preview_counters=True, counters={"promo:campaign:2026-03-01T00:00:00+02:00": 100}
    )
    item = rules_pb2.EvaluateItem(basket=basket(at, 1000), member=member)

    simulated = (await rules.stub.Simulate(rules_pb2.SimulateRequest(document=longer, items=[item]))).results[0]
    await publish(rules, "c2", longer, datetime(2026, 2, 1, tzinfo=UTC))
    evaluated = await rules.stub.Evaluate(rules_pb2.EvaluateRequest(program="shop", basket=item.basket, member=member))

    def promo_counters(e: rules_pb2.Evaluation) -> list[str]:
        return [p.guard.counter for p in e.parts if p.rule_id == "promo"]

    assert totals(evaluated.evaluation) == {"points": 10}  # cap spent: the bonus pays nothing
    assert promo_counters(simulated.evaluation) == promo_counters(evaluated.evaluation)
    assert totals(simulated.evaluation) == totals(evaluated.evaluation)
