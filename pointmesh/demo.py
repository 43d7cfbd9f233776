"""`pointmesh demo`: a scripted multichannel tour against a running mesh (start it with `make up`).

A store POS, the web shop and the app act on two household members: earn, hold and capture,
a return, a household transfer, a retried request, then purchases explained rule by rule by
rules_svc and a return in another store; the balances are printed at each step.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from pointmesh.clients import ledger_stub
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc


def _line(label: str, balance: ledger_pb2.Balance) -> None:
    print(
        f"  {label:44s} balance {balance.balance_points:6d}  available {balance.available_points:6d}"
        f"  reserved {balance.reserved_points:5d}  pending {balance.pending_points:5d}  debt {balance.debt_points:4d}"
    )


async def _balance(stub: ledger_pb2_grpc.LedgerServiceStub, member_id: str) -> ledger_pb2.Balance:
    response: ledger_pb2.GetBalanceResponse = await stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=member_id))
    return response.balance


async def run_demo(target: str, now: datetime | None = None) -> None:
    stub = ledger_stub(target)
    run = uuid.uuid4().hex[:8]

    def key(channel: str, name: str) -> common_pb2.IdempotencyKey:
        return common_pb2.IdempotencyKey(namespace=channel, key=f"{run}-{name}")

    print(f"pointmesh demo against {target}")
    alice = (await stub.CreateMember(ledger_pb2.CreateMemberRequest(
        idempotency_key=key("web", "alice"), external_ids=[common_pb2.ExternalId(kind="card", value=f"{run}-A")],
        profile={"name": "Alice"},
    ))).member.member_id  # fmt: skip
    bob = (await stub.CreateMember(ledger_pb2.CreateMemberRequest(
        idempotency_key=key("app", "bob"), external_ids=[common_pb2.ExternalId(kind="card", value=f"{run}-B")],
    ))).member.member_id  # fmt: skip
    print(f"members: alice {alice}, bob {bob}")

    earn = ledger_pb2.EarnRequest(
        idempotency_key=key("pos", "receipt-1"), member_id=alice, points=1200, reference=f"store-12/receipt-{run}",
        purchase_amount=common_pb2.Money(amount_minor=12000, currency="EUR"),
    )  # fmt: skip
    first = await stub.Earn(earn)
    _line("POS purchase 120.00 EUR earns 1200", first.transaction.balance_after)
    again = await stub.Earn(earn)
    same = again.transaction.transaction_id == first.transaction.transaction_id
    _line(f"POS retries the same request (same tx: {same})", again.transaction.balance_after)

    web = await stub.Earn(ledger_pb2.EarnRequest(
        idempotency_key=key("web", "order-7"), member_id=alice, points=300, pending_review=True,
    ))  # fmt: skip
    _line("web order earns 300, pending review", web.transaction.balance_after)

    hold = await stub.PlaceHold(
        ledger_pb2.PlaceHoldRequest(idempotency_key=key("app", "hold"), member_id=alice, points=500)
    )
    _line("app reserves 500 for a reward", hold.balance_after)
    capture = await stub.CaptureHold(ledger_pb2.CaptureHoldRequest(
        idempotency_key=key("app", "capture"), hold_id=hold.hold.hold_id, points=400,
    ))  # fmt: skip
    _line("reward costs 400; 100 released", capture.transaction.balance_after)

    await stub.ReleasePending(ledger_pb2.ReleasePendingRequest(
        idempotency_key=key("ops", "approve"), transaction_id=web.transaction.transaction_id,
    ))  # fmt: skip
    _line("fraud team approves the web order", await _balance(stub, alice))

    refund = await stub.Reverse(ledger_pb2.ReverseRequest(
        idempotency_key=key("pos", "return-1"), transaction_id=first.transaction.transaction_id,
        refund_amount=common_pb2.Money(amount_minor=3000, currency="EUR"),
    ))  # fmt: skip
    _line(f"return of 30.00 EUR takes back {refund.reversed_points}", refund.transaction.balance_after)

    transfer = await stub.Transfer(ledger_pb2.TransferRequest(
        idempotency_key=key("app", "pool"), source_member_id=alice, destination_member_id=bob, points=250,
    ))  # fmt: skip
    _line("alice pools 250 to bob", transfer.debit.balance_after)
    _line("bob", transfer.credit.balance_after)
    found = (await stub.LookupMember(ledger_pb2.LookupMemberRequest(
        external_id=common_pb2.ExternalId(kind="card", value=f"{run}-B")
    ))).member.member_id  # fmt: skip
    print(f"card {run}-B belongs to {found}")
    await _purchases(stub, alice, run, now or datetime.now(UTC))
    print("done: run `pointmesh ledger reconcile` to prove the books balance")


def _eur(minor: int) -> common_pb2.Money:
    return common_pb2.Money(amount_minor=minor, currency="EUR")


async def _purchases(stub: ledger_pb2_grpc.LedgerServiceStub, member_id: str, run: str, now: datetime) -> None:
    request = ledger_pb2.RecordPurchaseRequest(
        idempotency_key=common_pb2.IdempotencyKey(namespace="pos", key=f"{run}-till-3"), member_id=member_id,
        channel="pos", store_id="HEL-01", receipt_id=f"{run}-HEL-01-0042", total=_eur(12980),
        lines=[ledger_pb2.PurchaseLine(sku="tent-2p", category="outdoor", quantity=1, amount=_eur(9990)),
               ledger_pb2.PurchaseLine(sku="wool-socks", category="socks", quantity=2, amount=_eur(2990))],
        receipt_time=to_timestamp(now - timedelta(minutes=1)),
    )  # fmt: skip
    bought = await stub.RecordPurchase(request)
    purchase = bought.purchase
    if purchase.status != ledger_pb2.PURCHASE_STATUS_EARNED:
        print(f"  purchase {purchase.purchase_id} is waiting for rules_svc ({purchase.status_reason})")
        return
    print(f"  Helsinki POS purchase 129.80 EUR, program v{purchase.program_version}, tier {purchase.tier_before}:")
    for part in purchase.parts:
        where = f"line {part.part.line_index}" if part.part.line_index >= 0 else "basket"
        print(f"    {part.part.rule_id:22s} {part.part.unit:13s} {part.part.points:6d}  {where:7s} {part.part.detail}")
    request.idempotency_key.CopyFrom(common_pb2.IdempotencyKey(namespace="rest", key=f"{run}-api-9"))
    again = await stub.RecordPurchase(request)
    print(f"  the same receipt through another channel earns nothing new (replayed: {again.replayed})")
    back = await stub.RecordReturn(ledger_pb2.RecordReturnRequest(
        idempotency_key=common_pb2.IdempotencyKey(namespace="pos", key=f"{run}-LIS-01-return-1"),
        purchase_id=purchase.purchase_id, channel="pos", store_id="LIS-01",
        lines=[ledger_pb2.ReturnLine(line_index=1, quantity=2)],
    ))  # fmt: skip
    taken = ", ".join(f"{u.points} {u.unit}" for u in back.reversed)
    print(f"  socks returned in Lisbon: {taken} taken back from the original breakdown")
    _line("alice after the purchase and the return", await _balance(stub, member_id))
