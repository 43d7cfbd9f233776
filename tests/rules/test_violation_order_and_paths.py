"""docs/rules.md, Errors: a refused program lists one violation per problem *in document order*,
each at the path of the bad field (`rules[3].when.time_window.start`)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from pointmesh.errors import status_details
from pointmesh.v1 import common_pb2, rules_pb2
from tests.conftest import RulesUnderTest
from tests.rules.test_many_problems import HEAD


def _fields(error: grpc.aio.AioRpcError) -> list[str]:
    return [v.field for d in status_details(error) if isinstance(d, error_details_pb2.BadRequest)
            for v in d.field_violations]  # fmt: skip


async def _refused(rules: RulesUnderTest, document: str) -> list[str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rules.stub.PublishProgram(rules_pb2.PublishProgramRequest(
            idempotency_key=common_pb2.IdempotencyKey(namespace="test", key="k1"), document=document))  # fmt: skip
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return _fields(caught.value)


async def test_violations_come_in_the_order_the_document_is_written(rules: RulesUnderTest) -> None:
    # rules written first (as an export might), a bad base rate at the bottom of the file
    document = """
program: shop
rules:
  - {id: a, effect: {multiplier: 1.5}}
default_timezone: Europe/Helsinki
channels: [pos]
base_rates: [{currency: EUR, points: 1, per_minor: 0}]
"""
    assert await _refused(rules, document) == ["rules[0].effect.multiplier", "base_rates[0].per_minor"]


async def test_a_bad_attribute_name_is_refused_at_a_readable_path(rules: RulesUnderTest) -> None:
    document = HEAD + '  - {id: a, when: {attributes: {"club level": gold}}, effect: {bonus_points: 5}}\n'
    fields = await _refused(rules, document)
    assert fields == ["rules[0].when.attributes"] or fields == ["rules[0].when.attributes['club level']"], fields
