"""`pointmesh demo`: a scripted multichannel tour against a running ledger (start it with `make up`).

A store POS, the web shop and the app act on two household members: earn, hold and capture,
a return, a household transfer, a retried request; the balances are printed at each step.
"""

from __future__ import annotations

import uuid

from pointmesh.clients import ledger_stub
from pointmesh.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc


def _line(label: str, balance: ledger_pb2.Balance) -> None:
    print(
        f"  {label:44s} balance {balance.balance_points:6d}  available {balance.available_points:6d}"
        f"  reserved {balance.reserved_points:5d}  pending {balance.pending_points:5d}  debt {balance.debt_points:4d}"
    )


async def _balance(stub: ledger_pb2_grpc.LedgerServiceStub, member_id: str) -> ledger_pb2.Balance:
    response: ledger_pb2.GetBalanceResponse = await stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=member_id))
    return response.balance


async def run_demo(target: str) -> None:
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
    print("done: run `pointmesh ledger reconcile` to prove the books balance")
