"""Purchases and returns through the real mesh, with the explanation checked on every answer."""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Any

from pointmesh.v1 import common_pb2, ledger_pb2
from tests.ledger.helpers import balance, create_member, key, ts
from tests.mesh.conftest import Mesh

_receipts = itertools.count(1)
Line = tuple[str, int, int]  # (category, amount_minor, quantity)


def money(minor: int, currency: str = "EUR") -> common_pb2.Money:
    return common_pb2.Money(amount_minor=minor, currency=currency)


def purchase_request(
    member_id: str, lines: list[Line], *, at: datetime, currency: str = "EUR", channel: str = "pos",
    store: str = "HEL-01", receipt: str = "", transport_key: str = "", tender: str = "",
) -> ledger_pb2.RecordPurchaseRequest:  # fmt: skip
    return ledger_pb2.RecordPurchaseRequest(
        idempotency_key=common_pb2.IdempotencyKey(namespace=channel, key=transport_key) if transport_key else None,
        member_id=member_id, channel=channel, store_id=store, receipt_id=receipt or f"r-{next(_receipts)}",
        total=money(sum(a for _, a, _ in lines), currency),
        lines=[
            ledger_pb2.PurchaseLine(sku=f"{cat}-{i}", category=cat, quantity=q, amount=money(a, currency))
            for i, (cat, a, q) in enumerate(lines)
        ],
        receipt_time=ts(at), tender_transaction_id=tender,
    )  # fmt: skip


def exact(p: ledger_pb2.Purchase) -> dict[str, int]:
    """Points earned per unit, after checking the explained parts sum exactly to them."""
    summed: dict[str, int] = {}
    for part in p.parts:
        summed[part.part.unit] = summed.get(part.part.unit, 0) + part.part.points
    earned = {u.unit: u.points for u in p.earned}
    assert {u: n for u, n in summed.items() if n} == {u: n for u, n in earned.items() if n}
    return {u: n for u, n in earned.items() if n}


def by_rule(p: ledger_pb2.Purchase, unit: str = "points") -> dict[str, int]:
    out: dict[str, int] = {}
    for part in p.parts:
        if part.part.unit == unit:
            out[part.part.rule_id] = out.get(part.part.rule_id, 0) + part.part.points
    return out


async def buy(mesh: Mesh, member_id: str, lines: list[Line], **kw: Any) -> ledger_pb2.RecordPurchaseResponse:
    kw.setdefault("at", mesh.clock.now())
    response = await mesh.ledger.stub.RecordPurchase(purchase_request(member_id, lines, **kw))
    if response.purchase.status == ledger_pb2.PURCHASE_STATUS_EARNED:
        exact(response.purchase)
    return response


async def points(mesh: Mesh, member_id: str, unit: str = "points") -> int:
    return (await balance(mesh.ledger.stub, member_id, unit)).balance_points


async def new_member(mesh: Mesh) -> str:
    return (await create_member(mesh.ledger.stub)).member_id


async def welcomed_member(mesh: Mesh) -> str:
    """A member whose first purchase (0.50 EUR: no base points, the 100-point welcome) is done."""
    member_id = await new_member(mesh)
    first = await buy(mesh, member_id, [("misc", 50, 1)])
    assert exact(first.purchase) == {"points": 100}
    return member_id


async def return_lines(
    mesh: Mesh, purchase_id: str, lines: list[tuple[int, int]], **kw: Any
) -> ledger_pb2.RecordReturnResponse:
    return await mesh.ledger.stub.RecordReturn(
        ledger_pb2.RecordReturnRequest(
            idempotency_key=key(), purchase_id=purchase_id, channel=kw.pop("channel", "pos"),
            store_id=kw.pop("store", "HEL-01"),
            lines=[ledger_pb2.ReturnLine(line_index=i, quantity=q) for i, q in lines], **kw,
        )
    )  # fmt: skip


def reversed_points(r: ledger_pb2.RecordReturnResponse, unit: str = "points") -> int:
    return sum(u.points for u in r.reversed if u.unit == unit)
