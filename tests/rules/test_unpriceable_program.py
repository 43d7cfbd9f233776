"""A program that can price no basket at all must be refused at publish, at its path, rather
than published and then refusing every purchase (the active version replaced by a dead one)."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest

from pointmesh.v1 import rules_pb2
from rules_svc.program import ProgramInvalid
from tests.conftest import RulesUnderTest
from tests.rules import load_doc, program_doc
from tests.rules.test_rules_grpc import PROGRAM, basket, doc, publish, totals

AT = datetime(2026, 3, 10, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("edit", "path"),
    [
        (("base_rates: [{currency: EUR, points: 1, per_minor: 100}]", "base_rates: []"), "base_rates"),
        (("channels: [pos, app]", "channels: []"), "channels"),
    ],
)
async def test_a_program_no_basket_can_earn_in_is_refused_at_its_path(
    rules: RulesUnderTest, edit: tuple[str, str], path: str
) -> None:
    await publish(rules, "v1", doc(), datetime(2026, 1, 1, tzinfo=UTC))
    good = await rules.stub.Evaluate(rules_pb2.EvaluateRequest(program="shop", basket=basket(AT, 1000)))
    assert totals(good.evaluation) == {"points": 10}

    dead = PROGRAM.replace(*edit).replace(
        "{rules}",
        "  - {id: visit, effect: {bonus_points: 1}}",  # a stamp-per-visit style bonus
    )
    assert dead != PROGRAM
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        accepted = await publish(rules, "v2", dead, datetime(2026, 2, 1, tzinfo=UTC))
        try:  # what the accepted version then does to every purchase
            await rules.stub.Evaluate(rules_pb2.EvaluateRequest(program="shop", basket=basket(AT, 1000)))
        except grpc.aio.AioRpcError as every_basket:
            pytest.fail(f"published as v{accepted.version}; every basket now fails: {every_basket.details()}")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert path in refused.value.details()
    still = await rules.stub.Evaluate(rules_pb2.EvaluateRequest(program="shop", basket=basket(AT, 1000)))
    assert still.evaluation.version == 1


@pytest.mark.parametrize(("release", "expiry", "refused"), [(60, 30, True), (30, 30, True), (29, 30, False)])
def test_points_released_when_or_after_they_expire_are_refused_at_the_policy_path(
    release: int, expiry: int, refused: bool
) -> None:
    """A purchase's credit pending past its lot's expiry expired unspent (the Earn RPC refuses
    such a credit): the program is refused at `policy.release_after_days` instead."""
    doc = program_doc(policy={"expiry_days": expiry, "release_after_days": release})
    if not refused:
        assert load_doc(doc).policy.release_after_days == release
        return
    with pytest.raises(ProgramInvalid) as caught:
        load_doc(doc)
    assert [path for path, _ in caught.value.errors] == ["policy.release_after_days"], caught.value.errors
