"""A member's tier qualification is credits by month, keyed "YYYY-MM". GetTierStatus refused a
key that is no month ("2026-1"), but Evaluate and EvaluateBatch took it and read it as no
credits at all: a silver member was priced at the entry tier without a word. Every entry point
now refuses such a key naming it (per item in a batch), and the ledger never writes one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from pointmesh.tiers import bucket_of, first_non_month
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import common_pb2, rules_pb2
from tests.conftest import RulesUnderTest, start_rules, stop_rules
from tests.ledger.helpers import error_field, rpc_error

MESH_PROGRAM = Path(__file__).resolve().parents[1] / "mesh" / "program.yaml"  # silver (300 credits) earns 2x
AT = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)  # a Monday: no weekend rule


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RulesUnderTest]:
    running = await start_rules(tmp_path_factory.mktemp("qualification") / "rules", rules_seed_file=str(MESH_PROGRAM))
    yield running
    await stop_rules(running)


def basket() -> rules_pb2.Basket:
    total = common_pb2.Money(amount_minor=10_000, currency="EUR")
    return rules_pb2.Basket(channel="pos", store_id="HEL-01", receipt_id="q-1", receipt_time=to_timestamp(AT),
                            total=total, lines=[rules_pb2.BasketLine(sku="a", category="misc", quantity=1, amount=total)])  # fmt: skip


async def test_evaluate_refuses_a_qualification_key_that_is_not_a_month_as_get_tier_status_does(
    served: RulesUnderTest,
) -> None:
    good = rules_pb2.EvaluateRequest(program="meshmart", basket=basket(),
                                     member=rules_pb2.MemberContext(qualification={"2026-01": 500}))  # fmt: skip
    assert (await served.stub.Evaluate(good)).evaluation.tier == "silver"

    status = rules_pb2.GetTierStatusRequest(program="meshmart", qualification={"2026-1": 500}, at=to_timestamp(AT))
    error = await rpc_error(served.stub.GetTierStatus(status), grpc.StatusCode.INVALID_ARGUMENT)
    assert error_field(error) == "qualification['2026-1']"

    bad = rules_pb2.EvaluateRequest(program="meshmart", basket=basket(),
                                    member=rules_pb2.MemberContext(qualification={"2026-1": 500}))  # fmt: skip
    error = await rpc_error(served.stub.Evaluate(bad), grpc.StatusCode.INVALID_ARGUMENT)
    assert error_field(error) == "member.qualification['2026-1']"
    assert "'2026-1' is not a month" in (error.details() or "")


async def test_in_a_batch_the_member_with_a_key_that_is_not_a_month_fails_alone(served: RulesUnderTest) -> None:
    items = [
        rules_pb2.EvaluateItem(basket=basket(), member=rules_pb2.MemberContext(qualification={"2026-01": 500})),
        rules_pb2.EvaluateItem(basket=basket(), member=rules_pb2.MemberContext(qualification={"2026-13": 500})),
    ]
    got = await served.stub.EvaluateBatch(rules_pb2.EvaluateBatchRequest(program="meshmart", items=items))

    assert [r.WhichOneof("outcome") for r in got.results] == ["evaluation", "error"]
    assert got.results[0].evaluation.tier == "silver"
    assert (got.results[1].error.code, got.results[1].error.field) == (
        "INVALID_ARGUMENT", "items[1].member.qualification['2026-13']",
    )  # fmt: skip


def test_the_months_the_ledger_writes_are_months_in_any_year() -> None:
    """bucket_of names the ledger's buckets: strftime wrote year 999 as "999-01", a key no
    lookup reads and every entry point now refuses."""
    assert bucket_of(datetime(999, 3, 1, tzinfo=UTC)) == "0999-03"
    assert bucket_of(datetime(2026, 12, 31, 23, 30, tzinfo=UTC), "Europe/Helsinki") == "2027-01"
    written = [bucket_of(datetime(year, 1, 1, tzinfo=UTC)) for year in (1, 999, 1000, 9999)]
    assert first_non_month(written) is None
    assert first_non_month(["2026-01", "2026-1", "26-01"]) == "2026-1"
