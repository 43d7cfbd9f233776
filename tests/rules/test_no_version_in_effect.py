"""With no version in effect yet, each call names its own field: GetProgram `version`,
QuoteRedemption and GetTierStatus `at`, Evaluate `basket.receipt_time`. Before, GetProgram and
QuoteRedemption named `basket.receipt_time`, a field neither request has."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from google.rpc import error_details_pb2

from pointmesh.errors import status_details
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import rules_pb2
from tests.conftest import RulesUnderTest
from tests.rules.test_rules_grpc import basket, doc, eur, publish

REDEEM = "\nredemption: {values: [{currency: EUR, points: 100, amount_minor: 100}]}\n"


def _fields(error: grpc.aio.AioRpcError) -> list[str]:
    found = [d for d in status_details(error) if isinstance(d, error_details_pb2.BadRequest)]
    return [v.field for d in found for v in d.field_violations]


async def test_before_the_first_version_each_call_names_its_own_field(rules: RulesUnderTest) -> None:
    now = rules.clock.now()
    await publish(rules, "v1", doc() + REDEEM, now + timedelta(days=1))  # scheduled for tomorrow
    with pytest.raises(grpc.aio.AioRpcError) as got:
        await rules.stub.GetProgram(rules_pb2.GetProgramRequest(program="shop"))
    with pytest.raises(grpc.aio.AioRpcError) as quoted:
        await rules.stub.QuoteRedemption(
            rules_pb2.QuoteRedemptionRequest(
                program="shop", basket_total=eur(1000), points_available=500, at=to_timestamp(now)
            )
        )
    with pytest.raises(grpc.aio.AioRpcError) as quoted_now:
        await rules.stub.QuoteRedemption(
            rules_pb2.QuoteRedemptionRequest(program="shop", basket_total=eur(1000), points_available=500)
        )
    with pytest.raises(grpc.aio.AioRpcError) as tiers:
        await rules.stub.GetTierStatus(rules_pb2.GetTierStatusRequest(program="shop", at=to_timestamp(now)))
    with pytest.raises(grpc.aio.AioRpcError) as evaluated:
        await rules.stub.Evaluate(rules_pb2.EvaluateRequest(program="shop", basket=basket(now, 1000)))
    for error in (got, quoted, quoted_now, tiers, evaluated):
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no version of program shop was in effect" in (error.value.details() or "")
    assert _fields(got.value) == ["version"]
    assert _fields(quoted.value) == ["at"]
    assert _fields(quoted_now.value) == ["at"]
    assert _fields(tiers.value) == ["at"]
    assert _fields(evaluated.value) == ["basket.receipt_time"]
    # The named version itself is there to read.
    pinned = await rules.stub.GetProgram(rules_pb2.GetProgramRequest(program="shop", version=1))
    assert pinned.version.version == 1
