"""Bad input at the edges of the ledger's value ranges, over gRPC with a real rules_svc: money past
the shared bound, unknown currencies, Durations and page tokens that do not parse, a context
timestamp out of range, and baskets rules_svc cannot price. Each is refused with
INVALID_ARGUMENT (or FAILED_PRECONDITION) naming the full field path, never UNKNOWN, and writes
nothing; a basket rules_svc refuses never holds back other members' purchases."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2

from ledger_svc.accrual import BREAKER_SECONDS
from ledger_svc.reconcile import reconcile
from pointmesh.clock import ManualClock
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc
from rules_svc.domain import Basket
from tests.conftest import (
    LedgerUnderTest,
    RulesUnderTest,
    start_ledger,
    start_rules,
    stop_ledger,
    stop_rules,
    store_settings,
)
from tests.ledger.helpers import balance, create_member, detail, earn, entries, error_field, key, place_hold, ts

INVALID = grpc.StatusCode.INVALID_ARGUMENT
REFUSED = grpc.StatusCode.FAILED_PRECONDITION
BOUND = 10**15  # the largest amount_minor any entry point takes (the gateway's bound too)
START = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
# 10 points per yen: a 10^15 JPY basket, inside the money bound, would earn 10^16 points.
PROGRAM = """
program: edges
default_timezone: Europe/Helsinki
units: [points]
channels: [pos]
stores: [{id: HEL-01, region: FI, timezone: Europe/Helsinki}]
base_rates:
  - {currency: EUR, unit: points, points: 1, per_minor: 100}
  - {currency: JPY, unit: points, points: 10, per_minor: 1}
fx:
  base_currency: EUR
  rates:
    - {currency: KWD, per_base: "0.332"}
rules: []
"""
_receipts = itertools.count(1)


@dataclass
class Edge:
    ledger: LedgerUnderTest
    rules: RulesUnderTest

    @property
    def stub(self) -> ledger_pb2_grpc.LedgerServiceStub:
        return self.ledger.stub


@pytest.fixture(scope="module", params=["sqlite", "cassandra"])
async def edge(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> AsyncIterator[Edge]:
    """rules_svc serving PROGRAM and a ledger pricing purchases with it, once per store."""
    tmp: Path = tmp_path_factory.mktemp("edges")
    (tmp / "program.yaml").write_text(PROGRAM)
    clock = ManualClock(START)
    port = free_port()
    rules = await start_rules(tmp / "rules", clock, rules_addr=f"127.0.0.1:{port}",
                              rules_seed_file=str(tmp / "program.yaml"))  # fmt: skip
    ledger = await start_ledger(
        tmp / "ledger", redis_server.url, clock, rules_addr=f"127.0.0.1:{port}", program="edges",
        rules_deadline_seconds=2.0, **store_settings(request, request.param),
    )  # fmt: skip
    yield Edge(ledger, rules)
    await stop_ledger(ledger)
    await stop_rules(rules)


def money(amount_minor: int, currency: str = "EUR") -> common_pb2.Money:
    return common_pb2.Money(amount_minor=amount_minor, currency=currency)


def purchase(member_id: str, at: datetime, *amounts: int, currency: str = "EUR", **fields: Any) -> Any:
    base: dict[str, Any] = {
        "member_id": member_id, "channel": "pos", "store_id": "HEL-01", "receipt_id": f"edge-{next(_receipts)}",
        "receipt_time": ts(at - timedelta(hours=1)),
        "lines": [ledger_pb2.PurchaseLine(sku=f"s{i}", category="misc", quantity=1, amount=money(a, currency))
                  for i, a in enumerate(amounts)],
    }  # fmt: skip
    base.update(fields)
    if "total" not in base:  # (not setdefault: the sum of some cases does not fit a Money)
        base["total"] = money(sum(amounts), currency)
    return ledger_pb2.RecordPurchaseRequest(**base)


@dataclass(frozen=True)
class Ctx:
    edge: Edge
    member: str
    other: str
    earn_tx: str
    purchase_id: str

    @property
    def stub(self) -> ledger_pb2_grpc.LedgerServiceStub:
        return self.edge.stub

    @property
    def now(self) -> datetime:
        return self.edge.ledger.clock.now()


Call = Callable[[Ctx], Awaitable[Any]]


def buy(x: Ctx, *amounts: int, **fields: Any) -> Awaitable[Any]:
    return x.stub.RecordPurchase(purchase(x.member, x.now, *amounts, **fields))


def earn_req(x: Ctx, **fields: Any) -> Awaitable[Any]:
    return x.stub.Earn(ledger_pb2.EarnRequest(idempotency_key=key(), member_id=x.member, points=10, **fields))


def reverse_req(x: Ctx, **fields: Any) -> Awaitable[Any]:
    return x.stub.Reverse(ledger_pb2.ReverseRequest(idempotency_key=key(), transaction_id=x.earn_tx, **fields))


def return_req(x: Ctx, **fields: Any) -> Awaitable[Any]:
    return x.stub.RecordReturn(ledger_pb2.RecordReturnRequest(
        idempotency_key=key(), purchase_id=x.purchase_id, channel="pos", store_id="HEL-01", **fields
    ))  # fmt: skip


def hold_req(x: Ctx, **fields: Any) -> Awaitable[Any]:
    return x.stub.PlaceHold(ledger_pb2.PlaceHoldRequest(idempotency_key=key(), member_id=x.member, points=10, **fields))


def list_req(x: Ctx, token: str) -> Awaitable[Any]:
    return x.stub.ListPurchases(ledger_pb2.ListPurchasesRequest(
        channel="pos", store_id="HEL-01", receipt_time_from=ts(x.now - timedelta(days=2)),
        receipt_time_until=ts(x.now + timedelta(days=1)), page_token=token,
    ))  # fmt: skip


BAD_CONTEXT = ledger_pb2.ScreeningContext(contact_changed_at=Timestamp(seconds=2**62))

# (id, call, code, field, words the message must hold)
CASES: list[tuple[str, Call, grpc.StatusCode, str, str]] = [
    ("purchase-total-over-bound", lambda x: buy(x, BOUND + 1), INVALID, "total.amount_minor", f"at most {BOUND}"),
    ("purchase-total-int64-max-kwd", lambda x: buy(x, 2**63 - 1, currency="KWD"), INVALID, "total.amount_minor",
     f"at most {BOUND}"),
    ("purchase-line-over-bound", lambda x: buy(x, BOUND + 1, total=money(10)), INVALID, "lines[0].amount.amount_minor",
     f"at most {BOUND}"),
    ("purchase-lines-sum-past-int64", lambda x: buy(x, 2**62, 2**62, total=money(10)), INVALID,
     "lines[0].amount.amount_minor", f"at most {BOUND}"),
    ("earn-purchase-amount-over-bound", lambda x: earn_req(x, purchase_amount=money(BOUND + 1)), INVALID,
     "purchase_amount.amount_minor", f"at most {BOUND}"),
    ("earn-purchase-amount-unknown-currency", lambda x: earn_req(x, purchase_amount=money(100, "ZZZ")), INVALID,
     "purchase_amount.currency", "ISO 4217"),
    ("earn-released-when-it-expires", lambda x: earn_req(x, expires_at=ts(x.now + timedelta(days=10)),
     release_at=ts(x.now + timedelta(days=10))), INVALID, "release_at", "before the points expire"),
    ("earn-released-after-the-default-expiry", lambda x: earn_req(x, release_at=ts(x.now + timedelta(days=400))),
     INVALID, "release_at", "could never be spent"),
    ("reverse-refund-unknown-currency", lambda x: reverse_req(x, refund_amount=money(10, "ZZZ")), INVALID,
     "refund_amount.currency", "ISO 4217"),
    ("reverse-refund-over-bound", lambda x: reverse_req(x, refund_amount=money(2**63 - 1)), INVALID,
     "refund_amount.amount_minor", f"at most {BOUND}"),
    ("return-refund-unknown-currency", lambda x: return_req(x, refund=money(10, "ZZZ")), INVALID, "refund.currency",
     "ISO 4217"),
    ("return-refund-over-bound", lambda x: return_req(x, refund=money(2**63 - 1)), INVALID, "refund.amount_minor",
     f"at most {BOUND}"),
    ("hold-timeout-2-pow-62", lambda x: hold_req(x, timeout=Duration(seconds=2**62)), INVALID, "timeout", ""),
    ("hold-timeout-past-duration-range", lambda x: hold_req(x, timeout=Duration(seconds=315_576_000_001)), INVALID,
     "timeout", ""),
    ("hold-timeout-nanos-2e9", lambda x: hold_req(x, timeout=Duration(seconds=0, nanos=2_000_000_000)), INVALID,
     "timeout", "nanos"),
    ("hold-timeout-mixed-signs", lambda x: hold_req(x, timeout=Duration(seconds=100, nanos=-5)), INVALID, "timeout",
     "sign"),
    ("list-token-without-offset", lambda x: list_req(x, "2026-01-05T07:00:00|pu_" + "0" * 28), INVALID, "page_token",
     "is not a token this API returned"),
    ("list-token-bad-time", lambda x: list_req(x, "yesterday|pu_" + "0" * 28), INVALID, "page_token",
     "is not a token this API returned"),
    ("redeem-bad-contact-time", lambda x: x.stub.Redeem(ledger_pb2.RedeemRequest(
        idempotency_key=key(), member_id=x.member, points=1, context=BAD_CONTEXT)), INVALID,
     "context.contact_changed_at", ""),
    ("transfer-bad-contact-time", lambda x: x.stub.Transfer(ledger_pb2.TransferRequest(
        idempotency_key=key(), source_member_id=x.member, destination_member_id=x.other, points=1,
        context=BAD_CONTEXT)), INVALID, "context.contact_changed_at", ""),
    ("hold-bad-contact-time", lambda x: hold_req(x, context=BAD_CONTEXT), INVALID, "context.contact_changed_at", ""),
    ("purchase-bad-contact-time", lambda x: buy(x, 1000, context=BAD_CONTEXT), INVALID, "context.contact_changed_at",
     ""),
]  # fmt: skip


async def _state(x: Ctx) -> Any:
    """Everything a refused call must leave as it was."""
    ledger = x.edge.ledger
    report = await reconcile(ledger.app.store, ledger.clock.now())
    assert report.ok, [d.describe() for d in report.differences]
    listed = await list_req(x, "")
    return (
        report.totals_by_account_class,
        [await balance(x.stub, m) for m in (x.member, x.other)],
        [len(await entries(x.stub, m)) for m in (x.member, x.other)],
        [p.purchase_id for p in listed.purchases],
        await x.stub.GetPurchase(ledger_pb2.GetPurchaseRequest(purchase_id=x.purchase_id)),
    )


async def _ctx(edge: Edge) -> Ctx:
    stub = edge.stub
    member = (await create_member(stub)).member_id
    other = (await create_member(stub)).member_id
    earned = await earn(stub, member, 500, purchase_amount=money(5000))
    bought = await stub.RecordPurchase(purchase(member, edge.ledger.clock.now(), 2000))
    assert bought.purchase.status == ledger_pb2.PURCHASE_STATUS_EARNED
    await place_hold(stub, member, 10)
    return Ctx(edge, member, other, earned.transaction.transaction_id, bought.purchase.purchase_id)


@pytest.mark.parametrize(("call", "code", "field", "words"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
async def test_bad_input_is_refused_on_its_full_field_path_and_writes_nothing(
    edge: Edge, call: Call, code: grpc.StatusCode, field: str, words: str
) -> None:
    x = await _ctx(edge)
    before = await _state(x)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(x)

    error = caught.value
    assert error.code() == code, error.details()
    assert error_field(error) == field
    assert [v.field for v in detail(error, error_details_pb2.BadRequest).field_violations] == [field]
    assert words in (error.details() or "")
    assert await _state(x) == before


async def test_the_bounds_themselves_are_accepted(edge: Edge) -> None:
    x = await _ctx(edge)
    at_bound = await buy(x, BOUND, currency="KWD")
    assert at_bound.purchase.status == ledger_pb2.PURCHASE_STATUS_EARNED
    # 10^15 fils = 10^12 KWD = 10^12 / 0.332 EUR, at 1 point per euro.
    assert {u.unit: u.points for u in at_bound.purchase.earned} == {"points": 10**15 * 100 * 250 // (1000 * 83) // 100}
    assert (await earn_req(x, purchase_amount=money(BOUND, "JPY"))).transaction.points == 10
    placed = await hold_req(x, timeout=Duration(seconds=60, nanos=999_999_999))
    lasts = placed.hold.expires_at.ToDatetime(tzinfo=UTC) - x.now
    assert timedelta(seconds=60) <= lasts < timedelta(seconds=61)
    listed = await x.stub.ListPurchases(ledger_pb2.ListPurchasesRequest(
        channel="pos", store_id="HEL-01", receipt_time_from=ts(x.now - timedelta(days=2)),
        receipt_time_until=ts(x.now + timedelta(days=1)), page_size=1,
    ))  # fmt: skip
    assert listed.next_page_token
    following = await list_req(x, listed.next_page_token)
    assert listed.purchases[0].purchase_id not in [p.purchase_id for p in following.purchases]


async def _another_member_earns_at_once(edge: Edge) -> None:
    """The breaker is closed: a fresh member's purchase is priced now, not parked."""
    member = (await create_member(edge.stub)).member_id
    got = await edge.stub.RecordPurchase(purchase(member, edge.ledger.clock.now(), 2500))
    assert got.purchase.status == ledger_pb2.PURCHASE_STATUS_EARNED, got.purchase.status_reason
    assert {u.unit: u.points for u in got.purchase.earned} == {"points": 25}


async def test_a_basket_earning_past_the_points_bound_is_refused_and_holds_back_no_one(edge: Edge) -> None:
    x = await _ctx(edge)
    before = await _state(x)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await buy(x, BOUND, currency="JPY")  # 10^16 points at 10 a yen

    error = caught.value
    assert error.code() == INVALID, error.details()
    assert error_field(error) == "total"
    assert "1000000000000000" in (error.details() or "")
    assert await _state(x) == before
    await _another_member_earns_at_once(edge)


async def test_in_a_batch_a_basket_earning_past_the_points_bound_fails_alone(edge: Edge) -> None:
    x = await _ctx(edge)
    good = (await create_member(edge.stub)).member_id
    items = [
        ledger_pb2.IngestBatchRequest(purchase=purchase(x.member, x.now, BOUND, currency="JPY")),
        ledger_pb2.IngestBatchRequest(purchase=purchase(good, x.now, 1500)),
    ]
    response = await edge.stub.IngestBatch(iter(items), timeout=60)

    assert [(f.index, f.code, f.field) for f in response.failures] == [(0, "INVALID_ARGUMENT", "total")]
    assert [(p.index, p.status) for p in response.purchases] == [(1, ledger_pb2.PURCHASE_STATUS_EARNED)]
    assert (await balance(edge.stub, good)).balance_points == 15
    await _another_member_earns_at_once(edge)


def _crash_on(edge: Edge, monkeypatch: pytest.MonkeyPatch, receipt: str) -> None:
    """A bug in rules_svc that only one basket trips (an unexpected exception, not a refusal)."""
    service = edge.rules.app.service
    real = service.evaluate

    def evaluate(program: str, version: int, basket: Basket, member: Any) -> Any:
        if basket.receipt_id == receipt:
            raise ValueError("a bug that only this basket trips")
        return real(program, version, basket, member)

    monkeypatch.setattr(service, "evaluate", evaluate)


async def test_a_basket_that_crashes_rules_svc_waits_alone_and_is_not_taken_for_an_outage(
    edge: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug one basket trips parks that purchase (nothing earned, nothing lost: it earns once
    rules_svc is fixed), but the breaker stays closed, so every other member earns at once."""
    x = await _ctx(edge)
    _crash_on(edge, monkeypatch, "R-CRASH")

    parked = await buy(x, 1000, receipt_id="R-CRASH")

    assert parked.purchase.status == ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL
    assert edge.ledger.app.service.accrual.engine_up()
    await _another_member_earns_at_once(edge)

    good = (await create_member(edge.stub)).member_id
    items = [
        ledger_pb2.IngestBatchRequest(purchase=purchase(x.member, x.now, 1000, receipt_id="R-CRASH-2")),
        ledger_pb2.IngestBatchRequest(purchase=purchase(good, x.now, 1500)),
    ]
    _crash_on(edge, monkeypatch, "R-CRASH-2")
    response = await edge.stub.IngestBatch(iter(items), timeout=60)
    assert list(response.failures) == []
    assert [(p.index, p.status) for p in response.purchases] == [
        (0, ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL), (1, ledger_pb2.PURCHASE_STATUS_EARNED),
    ]  # fmt: skip
    assert (await balance(edge.stub, good)).balance_points == 15
    await _another_member_earns_at_once(edge)


async def test_a_waiting_purchase_rules_svc_fails_on_keeps_waiting_and_the_queue_behind_it_drains(
    edge: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub, accrual = edge.stub, edge.ledger.app.service.accrual
    first, second = [(await create_member(stub)).member_id for _ in range(2)]
    accrual.engine_down("the test", RuntimeError("an outage"))  # the breaker is open for a second
    now = edge.ledger.clock.now()
    waiting = [
        await stub.RecordPurchase(purchase(first, now, 1000, receipt_id="R-WAIT-CRASH")),
        await stub.RecordPurchase(purchase(second, now, 3000)),
    ]
    assert [w.purchase.status for w in waiting] == [ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL] * 2
    _crash_on(edge, monkeypatch, "R-WAIT-CRASH")
    await asyncio.sleep(BREAKER_SECONDS + 0.1)
    assert accrual.engine_up()

    await accrual.process_waiting()  # (what earlier tests of this module parked settles too)

    settled = [
        (await stub.GetPurchase(ledger_pb2.GetPurchaseRequest(purchase_id=w.purchase.purchase_id))).purchase
        for w in waiting
    ]
    assert [s.status for s in settled] == [ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL,
                                           ledger_pb2.PURCHASE_STATUS_EARNED]  # fmt: skip
    assert [(await balance(stub, m)).balance_points for m in (first, second)] == [0, 30]
    assert accrual.engine_up()

    monkeypatch.undo()  # rules_svc fixed: the parked purchase earns, once
    assert await accrual.process_waiting() >= 1
    assert await accrual.process_waiting() == 0
    assert [(await balance(stub, m)).balance_points for m in (first, second)] == [10, 30]
