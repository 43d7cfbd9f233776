"""Small helpers for ledger service tests: keys, members, postings and error details over gRPC."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2

from ledger_svc import commands as c
from ledger_svc.domain import IdemKey
from ledger_svc.reconcile import reconcile
from ledger_svc.service import LedgerService
from pointmesh.errors import status_details
from pointmesh.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc
from tests.conftest import LedgerUnderTest

M = TypeVar("M", bound=Message)
_counter = itertools.count()

# Well-formed ids that no ledger ever hands out.
ABSENT_MEMBER = "m_" + "0" * 28
ABSENT_HOLD = "h_" + "0" * 28
ABSENT_TX = "tx_" + "0" * 28


def key(name: str = "", namespace: str = "") -> common_pb2.IdempotencyKey:
    """An idempotency key; a fresh unique one when no name is given."""
    return common_pb2.IdempotencyKey(namespace=namespace, key=name or f"k-{next(_counter)}")


def ts(when: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(when)
    return out


async def create_member(stub: ledger_pb2_grpc.LedgerServiceStub, **fields: Any) -> ledger_pb2.Member:
    fields.setdefault("idempotency_key", key())
    return (await stub.CreateMember(ledger_pb2.CreateMemberRequest(**fields))).member


async def new_member(
    svc: LedgerService, key: Callable[[], IdemKey], *, shard_of: str = "", same_shard: bool = False
) -> str:
    """A member created through the service (no gRPC) under the caller's next key; given
    `shard_of`, one on that member's shard or (same_shard False) on another."""
    while True:
        member_id = (await svc.create_member(c.CreateMember(key()))).member_id
        if not shard_of or (svc.shard_of(member_id) == svc.shard_of(shard_of)) == same_shard:
            return member_id


async def points(svc: LedgerService, member_id: str) -> tuple[int, int, int]:
    """The member's points as (balance, pending, debt), read through the service."""
    b = await svc.get_balance(member_id, "points")
    return b.balance_points, b.pending_points, b.debt_points


async def earn(
    stub: ledger_pb2_grpc.LedgerServiceStub, member_id: str, points: int, **fields: Any
) -> ledger_pb2.EarnResponse:
    fields.setdefault("idempotency_key", key())
    return await stub.Earn(ledger_pb2.EarnRequest(member_id=member_id, points=points, **fields))


async def redeem(
    stub: ledger_pb2_grpc.LedgerServiceStub, member_id: str, points: int, **fields: Any
) -> ledger_pb2.RedeemResponse:
    fields.setdefault("idempotency_key", key())
    return await stub.Redeem(ledger_pb2.RedeemRequest(member_id=member_id, points=points, **fields))


async def place_hold(
    stub: ledger_pb2_grpc.LedgerServiceStub, member_id: str, points: int, **fields: Any
) -> ledger_pb2.PlaceHoldResponse:
    fields.setdefault("idempotency_key", key())
    return await stub.PlaceHold(ledger_pb2.PlaceHoldRequest(member_id=member_id, points=points, **fields))


def earn_item(name: str, member_id: str, points: int) -> ledger_pb2.IngestBatchRequest:
    """An IngestBatch item earning `points` under the key `name`."""
    return ledger_pb2.IngestBatchRequest(
        earn=ledger_pb2.EarnRequest(idempotency_key=key(name), member_id=member_id, points=points)
    )


def redeem_item(name: str, member_id: str, points: int) -> ledger_pb2.IngestBatchRequest:
    return ledger_pb2.IngestBatchRequest(
        redeem=ledger_pb2.RedeemRequest(idempotency_key=key(name), member_id=member_id, points=points)
    )


async def balance(stub: ledger_pb2_grpc.LedgerServiceStub, member_id: str, unit: str = "") -> ledger_pb2.Balance:
    return (await stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=member_id, unit=unit))).balance


def figures(b: ledger_pb2.Balance) -> dict[str, int]:
    """The point figures of a balance, for one exact comparison."""
    return {
        "balance": b.balance_points,
        "reserved": b.reserved_points,
        "available": b.available_points,
        "pending": b.pending_points,
        "debt": b.debt_points,
    }


async def entries(stub: ledger_pb2_grpc.LedgerServiceStub, member_id: str, unit: str = "") -> list[ledger_pb2.Entry]:
    response = await stub.ListEntries(
        ledger_pb2.ListEntriesRequest(member_id=member_id, unit=unit, page=common_pb2.PageRequest(page_size=500))
    )
    return list(response.entries)


async def rpc_error(call: Awaitable[Any], code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """Awaits a call that must fail with `code` and returns the error for its details."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


def detail(error: grpc.aio.AioRpcError, cls: type[M]) -> M:
    """The one detail of type `cls` attached to a failed call."""
    found = [d for d in status_details(error) if isinstance(d, cls)]
    assert len(found) == 1, f"expected one {cls.__name__} in {status_details(error)}"
    return found[0]


def error_field(error: grpc.aio.AioRpcError) -> str:
    """The field named by ErrorInfo, checked against the BadRequest violation when there is one."""
    info = detail(error, error_details_pb2.ErrorInfo)
    field = info.metadata["field"]
    violations = [d for d in status_details(error) if isinstance(d, error_details_pb2.BadRequest)]
    if violations:
        assert [v.field for v in violations[0].field_violations] == [field]
    return field


def error_reason(error: grpc.aio.AioRpcError) -> str:
    return detail(error, error_details_pb2.ErrorInfo).reason


async def assert_books_balance(ledger: LedgerUnderTest) -> dict[str, int]:
    """Reconciles the ledger and returns its totals by account class (which sum to zero)."""
    report = await reconcile(ledger.app.store, ledger.clock.now())
    assert report.ok, [d.describe() for d in report.differences]
    assert sum(report.totals_by_account_class.values()) == 0
    return report.totals_by_account_class
