"""Paying with points: value per currency, maximum share, minimum redemption, no wasted points."""

from __future__ import annotations

import grpc
import pytest

from pointmesh.v1 import common_pb2, rules_pb2
from rules_svc.app import seed_text
from rules_svc.domain import FailedPrecondition
from rules_svc.program import load_program
from rules_svc.redemption import quote_redemption
from tests.conftest import RulesUnderTest


async def quote(
    rules: RulesUnderTest, minor: int, currency: str, available: int, wanted: int = 0
) -> rules_pb2.QuoteRedemptionResponse:
    return await rules.stub.QuoteRedemption(
        rules_pb2.QuoteRedemptionRequest(
            program="aurora", basket_total=common_pb2.Money(amount_minor=minor, currency=currency),
            points_available=available, points_wanted=wanted,
        )
    )  # fmt: skip


@pytest.fixture
async def aurora(rules: RulesUnderTest) -> RulesUnderTest:
    await rules.stub.PublishProgram(
        rules_pb2.PublishProgramRequest(
            idempotency_key=common_pb2.IdempotencyKey(key="a"), document=seed_text("builtin:aurora")
        )
    )
    return rules


async def test_points_pay_at_most_half_the_basket_in_euros(aurora: RulesUnderTest) -> None:
    q = await quote(aurora, 4000, "EUR", available=10_000)
    assert (q.points, q.pays.amount_minor, q.remaining.amount_minor) == (2000, 2000, 2000)
    assert "capped at 50%" in q.explanation
    some = await quote(aurora, 4000, "EUR", available=10_000, wanted=800)
    assert (some.points, some.pays.amount_minor, some.remaining.amount_minor) == (800, 800, 3200)


async def test_yen_value_is_floored_and_capped_exactly(aurora: RulesUnderTest) -> None:
    # 100 points = 160 yen; a 10,000 yen basket may take 5,000 yen = 3,125 points.
    q = await quote(aurora, 10_000, "JPY", available=3127)
    assert (q.points, q.pays.amount_minor, q.remaining.amount_minor) == (3125, 5000, 5000)
    odd = await quote(aurora, 10_000, "JPY", available=5000, wanted=503)
    assert (odd.points, odd.pays.amount_minor) == (503, 804)  # 804.8 yen, floored


async def test_below_the_minimum_or_in_a_currency_without_value_is_refused(aurora: RulesUnderTest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await quote(aurora, 4000, "EUR", available=10_000, wanted=300)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details().startswith("points_wanted:") and "minimum redemption of 500" in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await quote(aurora, 4000, "USD", available=10_000)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "basket_total.currency" in caught.value.details()


def test_points_that_add_no_value_are_not_spent() -> None:
    text = seed_text("builtin:aurora").replace(
        "- {currency: JPY, points: 100, amount_minor: 160}", "- {currency: JPY, points: 100, amount_minor: 1}"
    )
    program = load_program(text)
    q = quote_redemption(program, "JPY", 100_000, available=10_000, wanted=650)
    # 650 points are worth 6.5 yen, floored to 6; 600 points already pay 6 yen.
    assert (q.points, q.pays_minor) == (600, 6)
    with pytest.raises(FailedPrecondition):
        quote_redemption(program.model_copy(update={"redemption": None}), "JPY", 1000, 10, 0)


@pytest.mark.parametrize(
    ("total_minor", "available", "wanted", "field", "said"),
    [
        (4000, 300, 600, "points_available", "the member has 300 points"),  # asked enough, has too few
        (600, 10_000, 0, "basket_total.amount_minor", "capped at 50%"),  # the basket's cap is under the minimum
        (4000, 10_000, 300, "points_wanted", ""),  # asked for too few
        (4000, 300, 0, "points_available", ""),  # all the member has is too few
    ],
)
def test_a_quote_below_the_minimum_names_what_held_the_points_down(
    total_minor: int, available: int, wanted: int, field: str, said: str
) -> None:
    """Aurora: 100 points = 1.00 EUR, at least 500, at most 50% of the basket. A member with
    300 asking for 600 was told `points_wanted` was at fault; a 6.00 EUR basket (capped at 300
    points) was blamed on `points_available`, as if more points would help."""
    with pytest.raises(FailedPrecondition) as refused:
        quote_redemption(load_program(seed_text("builtin:aurora")), "EUR", total_minor, available, wanted)
    assert refused.value.field == field, refused.value.message
    assert "below the minimum redemption of 500" in refused.value.message and said in refused.value.message
