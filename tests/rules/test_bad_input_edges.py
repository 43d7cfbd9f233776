"""rules_svc at the edges, through a real gRPC server: money past the shared bound, evaluations
whose points would not fit, and program documents nested deeper than any program is. Each is
INVALID_ARGUMENT naming the field (per item in a batch), never UNKNOWN, and one bad item never
fails the others of its batch."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from pointmesh.errors import status_details
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import common_pb2, rules_pb2
from rules_svc.domain import Basket
from tests.conftest import RulesUnderTest, start_rules, stop_rules

BOUND = 10**15  # the largest amount_minor any entry point takes; also the most points per unit
AT = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
PROGRAM = """
program: edges
default_timezone: Europe/Helsinki
units: [points]
channels: [pos]
stores: [{id: HEL-01, timezone: Europe/Helsinki}]
base_rates:
  - {currency: EUR, unit: points, points: 1, per_minor: 100}
  - {currency: JPY, unit: points, points: 10, per_minor: 1}
rules:
  - {id: boost, when: {categories: [boost]}, effect: {multiplier: "5"}}
"""


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RulesUnderTest]:
    tmp: Path = tmp_path_factory.mktemp("rules-edges")
    (tmp / "program.yaml").write_text(PROGRAM)
    running = await start_rules(tmp / "rules", rules_seed_file=str(tmp / "program.yaml"))
    yield running
    await stop_rules(running)


def money(minor: int, currency: str = "EUR") -> common_pb2.Money:
    return common_pb2.Money(amount_minor=minor, currency=currency)


def basket(*amounts: int, currency: str = "EUR", category: str = "misc", receipt: str = "r1", **fields: Any) -> Any:
    base: dict[str, Any] = {
        "channel": "pos", "store_id": "HEL-01", "receipt_id": receipt, "receipt_time": to_timestamp(AT),
        "lines": [rules_pb2.BasketLine(sku=f"s{i}", category=category, quantity=1, amount=money(a, currency))
                  for i, a in enumerate(amounts)],
    }  # fmt: skip
    base.update(fields)
    if "total" not in base:  # (not setdefault: the sum of some cases does not fit a Money)
        base["total"] = money(sum(amounts), currency)
    return rules_pb2.Basket(**base)


def item(b: rules_pb2.Basket) -> rules_pb2.EvaluateItem:
    return rules_pb2.EvaluateItem(basket=b, member=rules_pb2.MemberContext(member_id="m_" + "1" * 28))


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    found = [d for d in status_details(error) if isinstance(d, error_details_pb2.BadRequest)]
    assert len(found) == 1, status_details(error)
    return [v.field for v in found[0].field_violations]


async def evaluate(served: RulesUnderTest, b: rules_pb2.Basket) -> rules_pb2.EvaluateResponse:
    return await served.stub.Evaluate(rules_pb2.EvaluateRequest(program="edges", basket=b))


@pytest.mark.parametrize(
    ("b", "field"),
    [
        pytest.param(basket(BOUND + 1), "basket.total.amount_minor", id="total-over-bound"),
        pytest.param(basket(10**18, currency="JPY"), "basket.total.amount_minor", id="total-1e18-jpy"),
        pytest.param(basket(BOUND + 1, total=money(5)), "basket.lines[0].amount.amount_minor", id="line-over-bound"),
        pytest.param(
            basket(2**62, 2**62, total=money(5)), "basket.lines[0].amount.amount_minor", id="lines-summing-past-int64"
        ),
    ],
)
async def test_money_past_the_bound_is_refused_on_its_field(
    served: RulesUnderTest, b: rules_pb2.Basket, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await evaluate(served, b)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert violations(caught.value) == [field]
    assert f"at most {BOUND}" in (caught.value.details() or "")


async def test_the_bounds_themselves_evaluate(served: RulesUnderTest) -> None:
    got = await evaluate(served, basket(BOUND))
    assert {t.unit: t.points for t in got.evaluation.totals} == {"points": BOUND // 100}
    got = await evaluate(served, basket(BOUND // 10, currency="JPY"))
    assert {t.unit: t.points for t in got.evaluation.totals} == {"points": BOUND}


async def test_an_evaluation_whose_points_exceed_the_bound_is_refused_naming_the_basket(served: RulesUnderTest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await evaluate(served, basket(BOUND, currency="JPY"))  # 10^16 points
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert violations(caught.value) == ["basket"]
    assert "10000000000000000" in (caught.value.details() or "")


async def test_in_a_batch_the_basket_past_the_points_bound_fails_alone(served: RulesUnderTest) -> None:
    batch = rules_pb2.EvaluateBatchRequest(
        program="edges",
        items=[item(basket(BOUND, currency="JPY")), item(basket(2500)), item(basket(BOUND + 1))],
    )
    got = await served.stub.EvaluateBatch(batch)

    assert [r.WhichOneof("outcome") for r in got.results] == ["error", "evaluation", "error"]
    assert (got.results[0].error.code, got.results[0].error.field) == ("INVALID_ARGUMENT", "basket")
    assert {t.unit: t.points for t in got.results[1].evaluation.totals} == {"points": 25}
    assert (got.results[2].error.code, got.results[2].error.field) == (
        "INVALID_ARGUMENT", "items[2].basket.total.amount_minor",
    )  # fmt: skip


async def test_simulating_a_multiplier_that_overflows_refuses_that_item_only(served: RulesUnderTest) -> None:
    draft = PROGRAM.replace('multiplier: "5"', 'multiplier: "1000000"')
    got = await served.stub.Simulate(rules_pb2.SimulateRequest(
        document=draft, format="yaml", items=[item(basket(10**14, category="boost")), item(basket(1000))],
    ))  # fmt: skip

    assert [r.WhichOneof("outcome") for r in got.results] == ["error", "evaluation"]
    assert (got.results[0].error.code, got.results[0].error.field) == ("INVALID_ARGUMENT", "basket")
    assert {t.unit: t.points for t in got.results[1].evaluation.totals} == {"points": 10}


async def test_simulating_a_receipt_too_early_to_price_refuses_that_item_only(served: RulesUnderTest) -> None:
    """0001-01-01T00:30Z is a valid Timestamp, but in New York it is still year 0: converting it
    raised OverflowError, and the whole call failed as UNKNOWN."""
    draft = PROGRAM.replace("stores: [", "stores: [{id: NYC-01, timezone: America/New_York}, ")
    early = basket(1000, store_id="NYC-01", receipt_time=to_timestamp(datetime(1, 1, 1, 0, 30, tzinfo=UTC)))
    got = await served.stub.Simulate(rules_pb2.SimulateRequest(
        document=draft, format="yaml", items=[item(basket(1000, store_id="NYC-01")), item(early)],
    ))  # fmt: skip

    assert [r.WhichOneof("outcome") for r in got.results] == ["evaluation", "error"]
    assert {t.unit: t.points for t in got.results[0].evaluation.totals} == {"points": 10}
    assert (got.results[1].error.code, got.results[1].error.field) == ("INVALID_ARGUMENT", "basket.receipt_time")


async def test_a_program_with_a_yaml_binary_value_is_refused_naming_its_field(served: RulesUnderTest) -> None:
    """The bytes passed the time zone check, became text after it, and compiling them raised
    ZoneInfoNotFoundError: UNKNOWN instead of the field to fix."""
    draft = PROGRAM.replace("timezone: Europe/Helsinki}", "timezone: !!binary Tm93aGVyZS9DaXR5}")  # Nowhere/City
    assert "!!binary" in draft

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Simulate(rules_pb2.SimulateRequest(document=draft, format="yaml", items=[item(basket(1000))]))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert violations(caught.value) == ["stores[0].timezone"]


async def test_an_unexpected_failure_of_one_batch_item_is_reported_on_that_item(
    served: RulesUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = served.app.service
    real = service.evaluate

    def evaluate_with_a_bug(program: str, version: int, b: Basket, member: Any) -> Any:
        if b.receipt_id == "crash":
            raise ValueError("a bug only this basket trips")
        return real(program, version, b, member)

    monkeypatch.setattr(service, "evaluate", evaluate_with_a_bug)
    got = await served.stub.EvaluateBatch(rules_pb2.EvaluateBatchRequest(
        program="edges", items=[item(basket(1000)), item(basket(1000, receipt="crash")), item(basket(2000))],
    ))  # fmt: skip

    assert [r.WhichOneof("outcome") for r in got.results] == ["evaluation", "error", "evaluation"]
    assert got.results[1].error.code == "INTERNAL"
    assert [{t.unit: t.points for t in r.evaluation.totals} for r in got.results[::2]] == [
        {"points": 10}, {"points": 20},
    ]  # fmt: skip


DEEP = [
    pytest.param("[" * 5000 + "]" * 5000, "json", id="json-lists"),
    pytest.param('{"a": ' * 3000 + "1" + "}" * 3000, "json", id="json-objects"),
    pytest.param("a: " + "[" * 5000 + "]" * 5000, "yaml", id="yaml-flow-lists"),
    pytest.param("{a: " * 3000 + "1" + "}" * 3000, "yaml", id="yaml-flow-mappings"),
    pytest.param("- " * 3000 + "x", "yaml", id="yaml-block-lists"),
]


@pytest.mark.parametrize(("document", "fmt"), DEEP)
async def test_a_deeply_nested_document_is_refused_as_an_invalid_program(
    served: RulesUnderTest, document: str, fmt: str
) -> None:
    for call in (
        served.stub.Simulate(rules_pb2.SimulateRequest(document=document, format=fmt), timeout=5),
        served.stub.PublishProgram(rules_pb2.PublishProgramRequest(
            idempotency_key=common_pb2.IdempotencyKey(key=f"deep-{fmt}-{len(document)}"), document=document,
            format=fmt,
        ), timeout=5),
    ):  # fmt: skip
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert "nested" in (caught.value.details() or "")
        assert time.monotonic() - started < 2


async def test_brackets_inside_json_strings_do_not_count_as_nesting(served: RulesUnderTest) -> None:
    document = '{"program": "' + "[" * 500 + '", "channels": []}'
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Simulate(rules_pb2.SimulateRequest(document=document, format="json"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nested" not in (caught.value.details() or "")
