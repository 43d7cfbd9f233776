"""A refused program comes back INVALID_ARGUMENT / PROGRAM_INVALID naming its fields however many
problems it has or however long the bad text is (docs/rules.md, Errors): past gRPC's trailer
limit the caller got RESOURCE_EXHAUSTED and no field at all."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from pointmesh.errors import status_details
from pointmesh.v1 import common_pb2, rules_pb2
from tests.conftest import RulesUnderTest

HEAD = """
program: shop
default_timezone: Europe/Helsinki
channels: [pos]
base_rates: [{currency: EUR, points: 1, per_minor: 100}]
rules:
"""
# A spreadsheet export writes every multiplier unquoted: each rule is refused at its path.
MANY = HEAD + "".join(f"  - {{id: r{i}, effect: {{multiplier: 1.5}}}}\n" for i in range(200))
# A rule's description pasted into its id: one problem, quoted back.
LONG = HEAD + "  - {id: " + "Double-points-on-weekends-" * 400 + ", effect: {multiplier: '2'}}\n"


def _violations(error: grpc.aio.AioRpcError) -> list[error_details_pb2.BadRequest.FieldViolation]:
    return [v for d in status_details(error) if isinstance(d, error_details_pb2.BadRequest) for v in d.field_violations]


@pytest.mark.parametrize(("document", "first"), [(MANY, "rules[0].effect.multiplier"), (LONG, "rules[0].id")])
async def test_a_program_refused_at_length_is_refused_as_invalid_naming_its_first_problems(
    rules: RulesUnderTest, document: str, first: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as published:
        await rules.stub.PublishProgram(rules_pb2.PublishProgramRequest(
            idempotency_key=common_pb2.IdempotencyKey(namespace="test", key="k1"), document=document))  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as simulated:
        await rules.stub.Simulate(rules_pb2.SimulateRequest(document=document))

    for error in (published.value, simulated.value):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), (error.details() or "")[:200])
        violations = _violations(error)
        assert violations[0].field == first
    if document is MANY:
        listed = _violations(published.value)
        more = int(listed[-1].description.split()[1])
        assert listed[-1].field == "" and len(listed) - 1 + more == 200
