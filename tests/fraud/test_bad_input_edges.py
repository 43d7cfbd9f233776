"""fraud_svc refuses an amount it cannot compare: a currency that is not ISO 4217, or a nonzero
amount without a currency, with INVALID_ARGUMENT on the field (per item in a batch)."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from google.rpc import error_details_pb2

from pointmesh.errors import status_details
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import common_pb2, fraud_pb2, fraud_pb2_grpc
from tests.fraud.conftest import NOW


def tx(event_id: str, amount: common_pb2.Money | None, **fields: object) -> fraud_pb2.ScoredTransaction:
    return fraud_pb2.ScoredTransaction(
        event_id=event_id,
        kind=fields.pop("kind", fraud_pb2.SCORED_KIND_PURCHASE),
        member_id=f"m_{event_id}",
        occurred_at=to_timestamp(NOW),
        channel="pos",
        store_id="HEL-01",
        amount=amount,
        points=25,
        member_since=to_timestamp(NOW - timedelta(days=400)),
        balance_points=3000,
        **fields,  # type: ignore[arg-type]
    )


def money(minor: int, currency: str) -> common_pb2.Money:
    return common_pb2.Money(amount_minor=minor, currency=currency)


@pytest.mark.parametrize(
    "amount",
    [
        pytest.param(money(100, "ZZZ"), id="unknown-code"),
        pytest.param(money(100, "eur"), id="lowercase-code"),
        pytest.param(money(100, ""), id="nonzero-amount-without-currency"),
    ],
)
async def test_an_amount_in_no_known_currency_is_refused_on_its_field(
    stub: fraud_pb2_grpc.FraudServiceStub, amount: common_pb2.Money
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Score(fraud_pb2.ScoreRequest(transaction=tx("bad", amount)))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    found = [d for d in status_details(caught.value) if isinstance(d, error_details_pb2.BadRequest)]
    assert [[v.field for v in d.field_violations] for d in found] == [["transaction.amount.currency"]]


async def test_known_currencies_and_no_amount_are_scored(stub: fraud_pb2_grpc.FraudServiceStub) -> None:
    for i, amount in enumerate([money(2500, "EUR"), money(300, "JPY"), None, money(0, "")]):
        got = await stub.Score(fraud_pb2.ScoreRequest(
            transaction=tx(f"ok{i}", amount, kind=fraud_pb2.SCORED_KIND_REDEMPTION)
        ))  # fmt: skip
        assert got.event_id == f"ok{i}"


async def test_in_a_batch_the_unknown_currency_fails_alone(stub: fraud_pb2_grpc.FraudServiceStub) -> None:
    got = await stub.ScoreBatch(fraud_pb2.ScoreBatchRequest(
        transactions=[tx("b0", money(100, "EUR")), tx("b1", money(100, "ZZZ")), tx("b2", money(7, ""))]
    ))  # fmt: skip

    assert [i.WhichOneof("outcome") for i in got.items] == ["result", "error", "error"]
    assert got.items[0].result.event_id == "b0"
    assert got.items[1].error.startswith("transactions[1].amount.currency: ")
    assert got.items[2].error.startswith("transactions[2].amount.currency: ")


@pytest.mark.parametrize("field", ["member_id", "channel", "store_id", "device_id", "ip", "card_hash",
                                   "employee_card", "counterparty_member_id"])  # fmt: skip
async def test_an_oversized_identity_is_refused_before_it_becomes_velocity_state(
    stub: fraud_pb2_grpc.FraudServiceStub, field: str
) -> None:
    """Identities key the velocity state in Redis: a megabyte device id would be stored (and
    kept for the window's retention) as a key; 128 characters is the ledger's own bound."""

    def scored(event_id: str, length: int) -> fraud_pb2.ScoreRequest:
        transaction = tx(event_id, None, kind=fraud_pb2.SCORED_KIND_TRANSFER, counterparty_member_id="m_other")
        setattr(transaction, field, "x" * length)
        return fraud_pb2.ScoreRequest(transaction=transaction)

    assert (await stub.Score(scored(f"fine-{field}", 128))).event_id == f"fine-{field}"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Score(scored(f"big-{field}", 129))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert caught.value.details().startswith(f"transaction.{field}:"), caught.value.details()
