"""Bad input over gRPC: the right status code, the offending field in ErrorInfo and BadRequest,
and nothing written: the books, the member's balance version and journal stay as they were."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2

from ledger_svc.reconcile import reconcile
from pointmesh.redis_server import RedisServer
from pointmesh.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc
from tests.conftest import LedgerUnderTest, start_ledger, stop_ledger
from tests.ledger.helpers import (
    ABSENT_HOLD,
    ABSENT_MEMBER,
    ABSENT_TX,
    balance,
    create_member,
    detail,
    earn,
    entries,
    error_field,
    key,
    place_hold,
    rpc_error,
    ts,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
async def shared_ledger(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> AsyncIterator[LedgerUnderTest]:
    """One ledger for the module: every case uses its own members and compares before with after."""
    running = await start_ledger(tmp_path_factory.mktemp("bad-input") / "data", redis_server.url)
    yield running
    await stop_ledger(running)


@dataclass(frozen=True)
class Ctx:
    ledger: LedgerUnderTest
    member: str
    other: str
    hold_id: str
    earn_tx: str

    @property
    def stub(self) -> ledger_pb2_grpc.LedgerServiceStub:
        return self.ledger.stub


Call = Callable[[Ctx], Awaitable[Any]]


def earn_req(ctx: Ctx, **fields: Any) -> Awaitable[Any]:
    base: dict[str, Any] = {"idempotency_key": key(), "member_id": ctx.member, "points": 10}
    return ctx.stub.Earn(ledger_pb2.EarnRequest(**{**base, **fields}))


def redeem_req(ctx: Ctx, **fields: Any) -> Awaitable[Any]:
    base: dict[str, Any] = {"idempotency_key": key(), "member_id": ctx.member, "points": 10}
    return ctx.stub.Redeem(ledger_pb2.RedeemRequest(**{**base, **fields}))


def adjust_req(ctx: Ctx, **fields: Any) -> Awaitable[Any]:
    base: dict[str, Any] = {"idempotency_key": key(), "member_id": ctx.member, "points": 10, "reason": "fix"}
    return ctx.stub.Adjust(ledger_pb2.AdjustRequest(**{**base, **fields}))


def hold_req(ctx: Ctx, **fields: Any) -> Awaitable[Any]:
    base: dict[str, Any] = {"idempotency_key": key(), "member_id": ctx.member, "points": 10}
    return ctx.stub.PlaceHold(ledger_pb2.PlaceHoldRequest(**{**base, **fields}))


def transfer_req(ctx: Ctx, **fields: Any) -> Awaitable[Any]:
    base: dict[str, Any] = {
        "idempotency_key": key(), "source_member_id": ctx.member, "destination_member_id": ctx.other, "points": 10,
    }  # fmt: skip
    return ctx.stub.Transfer(ledger_pb2.TransferRequest(**{**base, **fields}))


def reverse_req(ctx: Ctx, **fields: Any) -> Awaitable[Any]:
    base: dict[str, Any] = {"idempotency_key": key(), "transaction_id": ctx.earn_tx}
    return ctx.stub.Reverse(ledger_pb2.ReverseRequest(**{**base, **fields}))


def page(size: int = 0, token: str = "") -> common_pb2.PageRequest:
    return common_pb2.PageRequest(page_size=size, page_token=token)


def money(amount_minor: int, currency: str) -> common_pb2.Money:
    return common_pb2.Money(amount_minor=amount_minor, currency=currency)


CASES: list[tuple[str, Call, grpc.StatusCode, str]] = [
    ("earn-negative-points", lambda x: earn_req(x, points=-5), INVALID, "points"),
    ("earn-zero-points", lambda x: earn_req(x, points=0), INVALID, "points"),
    ("redeem-zero-points", lambda x: redeem_req(x, points=0), INVALID, "points"),
    ("redeem-negative-points", lambda x: redeem_req(x, points=-10), INVALID, "points"),
    ("hold-zero-points", lambda x: hold_req(x, points=0), INVALID, "points"),
    ("transfer-negative-points", lambda x: transfer_req(x, points=-1), INVALID, "points"),
    ("adjust-zero-points", lambda x: adjust_req(x, points=0), INVALID, "points"),
    ("reverse-zero-points", lambda x: reverse_req(x, points=0), INVALID, "points"),
    (
        "capture-negative-points",
        lambda x: x.stub.CaptureHold(
            ledger_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=x.hold_id, points=-1)
        ),
        INVALID,
        "points",
    ),
    ("earn-absent-member", lambda x: earn_req(x, member_id=ABSENT_MEMBER), NOT_FOUND, "member_id"),
    ("redeem-absent-member", lambda x: redeem_req(x, member_id=ABSENT_MEMBER), NOT_FOUND, "member_id"),
    (
        "balance-absent-member",
        lambda x: x.stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=ABSENT_MEMBER)),
        NOT_FOUND,
        "member_id",
    ),
    (
        "transfer-absent-destination",
        lambda x: transfer_req(x, destination_member_id=ABSENT_MEMBER),
        NOT_FOUND,
        "destination_member_id",
    ),
    (
        "merge-absent-source",
        lambda x: x.stub.MergeMembers(
            ledger_pb2.MergeMembersRequest(
                idempotency_key=key(), source_member_id=ABSENT_MEMBER, target_member_id=x.member
            )
        ),
        NOT_FOUND,
        "source_member_id",
    ),
    ("earn-malformed-member", lambda x: earn_req(x, member_id="bob"), INVALID, "member_id"),
    ("earn-uppercase-member", lambda x: earn_req(x, member_id=x.member.upper()), INVALID, "member_id"),
    ("redeem-missing-member", lambda x: redeem_req(x, member_id=""), INVALID, "member_id"),
    (
        "entries-malformed-member",
        lambda x: x.stub.ListEntries(ledger_pb2.ListEntriesRequest(member_id="m_123")),
        INVALID,
        "member_id",
    ),
    ("earn-unknown-unit", lambda x: earn_req(x, unit="miles"), INVALID, "unit"),
    (
        "balance-unknown-unit",
        lambda x: x.stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=x.member, unit="miles")),
        INVALID,
        "unit",
    ),
    (
        "entries-page-size-1000",
        lambda x: x.stub.ListEntries(ledger_pb2.ListEntriesRequest(member_id=x.member, page=page(size=1000))),
        INVALID,
        "page.page_size",
    ),
    (
        "entries-page-size-negative",
        lambda x: x.stub.ListEntries(ledger_pb2.ListEntriesRequest(member_id=x.member, page=page(size=-1))),
        INVALID,
        "page.page_size",
    ),
    (
        "entries-bad-page-token",
        lambda x: x.stub.ListEntries(ledger_pb2.ListEntriesRequest(member_id=x.member, page=page(token="not-a-token"))),
        INVALID,
        "page.page_token",
    ),
    ("earn-missing-key", lambda x: earn_req(x, idempotency_key=None), INVALID, "idempotency_key.key"),
    ("redeem-missing-key", lambda x: redeem_req(x, idempotency_key=None), INVALID, "idempotency_key.key"),
    (
        "create-member-missing-key",
        lambda x: x.stub.CreateMember(ledger_pb2.CreateMemberRequest()),
        INVALID,
        "idempotency_key.key",
    ),
    ("earn-key-with-space", lambda x: earn_req(x, idempotency_key=key("a b")), INVALID, "idempotency_key.key"),
    ("earn-key-too-long", lambda x: earn_req(x, idempotency_key=key("k" * 129)), INVALID, "idempotency_key.key"),
    (
        "earn-bad-namespace",
        lambda x: earn_req(x, idempotency_key=key("k", namespace="no spaces")),
        INVALID,
        "idempotency_key.namespace",
    ),
    (
        "entries-page-token-out-of-range",
        lambda x: x.stub.ListEntries(
            ledger_pb2.ListEntriesRequest(member_id=x.member, page=page(token="e" + "9" * 30))
        ),
        INVALID,
        "page.page_token",
    ),
    (
        "entries-page-token-superscript-digit",
        lambda x: x.stub.ListEntries(ledger_pb2.ListEntriesRequest(member_id=x.member, page=page(token="e\u00b2"))),
        INVALID,
        "page.page_token",
    ),
    ("adjust-without-reason", lambda x: adjust_req(x, reason=""), INVALID, "reason"),
    ("adjust-blank-reason", lambda x: adjust_req(x, points=-5, reason="   "), INVALID, "reason"),
    (
        "get-absent-hold",
        lambda x: x.stub.GetHold(ledger_pb2.GetHoldRequest(hold_id=ABSENT_HOLD)),
        NOT_FOUND,
        "hold_id",
    ),
    (
        "capture-absent-hold",
        lambda x: x.stub.CaptureHold(ledger_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=ABSENT_HOLD)),
        NOT_FOUND,
        "hold_id",
    ),
    (
        "void-absent-hold",
        lambda x: x.stub.VoidHold(ledger_pb2.VoidHoldRequest(idempotency_key=key(), hold_id=ABSENT_HOLD)),
        NOT_FOUND,
        "hold_id",
    ),
    (
        "capture-malformed-hold",
        lambda x: x.stub.CaptureHold(ledger_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id="hold-1")),
        INVALID,
        "hold_id",
    ),
    (
        "reverse-absent-transaction",
        lambda x: reverse_req(x, transaction_id=ABSENT_TX, full=True),
        NOT_FOUND,
        "transaction_id",
    ),
    ("reverse-without-amount", lambda x: reverse_req(x), INVALID, "amount"),
    (
        "reverse-refund-lowercase-currency",
        lambda x: reverse_req(x, refund_amount=money(100, "eur")),
        INVALID,
        "refund_amount.currency",
    ),
    (
        "reverse-refund-above-purchase",
        lambda x: reverse_req(x, refund_amount=money(1001, "EUR")),
        INVALID,
        "refund_amount.amount_minor",
    ),
    ("transfer-to-self", lambda x: transfer_req(x, destination_member_id=x.member), INVALID, "destination_member_id"),
    (
        "earn-expiry-before-business-time",
        lambda x: earn_req(x, expires_at=ts(x.ledger.clock.now() - timedelta(days=1))),
        INVALID,
        "expires_at",
    ),
    (
        "redeem-business-time-ahead",  # fraud_svc would trim its velocity state to that time
        lambda x: redeem_req(x, business_time=ts(x.ledger.clock.now() + timedelta(hours=1))),
        INVALID,
        "business_time",
    ),
    (
        "earn-purchase-negative",
        lambda x: earn_req(x, purchase_amount=money(-1, "EUR")),
        INVALID,
        "purchase_amount.amount_minor",
    ),
    ("earn-bad-funding-source", lambda x: earn_req(x, funding_source="spring promo!"), INVALID, "funding_source"),
    ("earn-reference-too-long", lambda x: earn_req(x, reference="r" * 201), INVALID, "reference"),
    ("hold-zero-timeout", lambda x: hold_req(x, timeout=Duration(seconds=0)), INVALID, "timeout"),
    (
        "hold-sub-second-timeout",
        lambda x: hold_req(x, timeout=Duration(seconds=0, nanos=999_999_000)),
        INVALID,
        "timeout",
    ),
    (
        "lookup-empty-value",
        lambda x: x.stub.LookupMember(ledger_pb2.LookupMemberRequest(external_id=common_pb2.ExternalId(kind="card"))),
        INVALID,
        "external_id.value",
    ),
    (
        "earn-timestamp-out-of-range",
        lambda x: earn_req(x, expires_at=Timestamp(seconds=2**40)),
        INVALID,
        "expires_at",
    ),
    (
        "create-member-bad-id-kind",
        lambda x: x.stub.CreateMember(
            ledger_pb2.CreateMemberRequest(
                idempotency_key=key(), external_ids=[common_pb2.ExternalId(kind="bad kind", value="1")]
            )
        ),
        INVALID,
        "external_ids[0].kind",
    ),
]


@pytest.mark.parametrize(("call", "code", "field"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
async def test_bad_input_is_rejected_on_its_field_and_writes_nothing(
    shared_ledger: LedgerUnderTest, call: Call, code: grpc.StatusCode, field: str
) -> None:
    stub = shared_ledger.stub
    member = (await create_member(stub)).member_id
    other = (await create_member(stub)).member_id
    earned = await earn(stub, member, 100, purchase_amount=money(1000, "EUR"))
    hold = (await place_hold(stub, member, 10)).hold
    ctx = Ctx(shared_ledger, member, other, hold.hold_id, earned.transaction.transaction_id)
    before_totals = (await reconcile(shared_ledger.app.store, shared_ledger.clock.now())).totals_by_account_class
    before = [await balance(stub, m) for m in (member, other)]
    before_entries = [len(await entries(stub, m)) for m in (member, other)]

    error = await rpc_error(call(ctx), code)

    assert error_field(error) == field
    violations = detail(error, error_details_pb2.BadRequest).field_violations
    assert [v.field for v in violations] == [field]
    assert detail(error, error_details_pb2.ErrorInfo).domain == "ledger.pointmesh.dev"
    report = await reconcile(shared_ledger.app.store, shared_ledger.clock.now())
    assert report.ok, [d.describe() for d in report.differences]
    assert report.totals_by_account_class == before_totals
    assert [await balance(stub, m) for m in (member, other)] == before
    assert [len(await entries(stub, m)) for m in (member, other)] == before_entries
    assert (await stub.GetHold(ledger_pb2.GetHoldRequest(hold_id=hold.hold_id))).hold == hold


async def test_a_fresh_member_rejected_everywhere_has_an_empty_journal(shared_ledger: LedgerUnderTest) -> None:
    stub = shared_ledger.stub
    member = (await create_member(stub)).member_id
    for points in (0, -1):
        await rpc_error(earn(stub, member, points), INVALID)
    await rpc_error(earn(stub, member, 5, unit="miles"), INVALID)
    await rpc_error(stub.Redeem(ledger_pb2.RedeemRequest(idempotency_key=key(), member_id=member, points=1)),
                    grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip

    assert await entries(stub, member) == []
    fresh = await balance(stub, member)
    assert (fresh.balance_points, fresh.version) == (0, 0)
