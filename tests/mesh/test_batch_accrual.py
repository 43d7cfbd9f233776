"""Purchases through IngestBatch: one EvaluateBatch per chunk instead of a unary Evaluate each,
with the same outcome RecordPurchase gives purchase by purchase (welcome bonus, member caps,
tier crossings inside one chunk), replays on the natural key, and bad items reported alone.

Figures come from tests/mesh/program.yaml (see test_purchases.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import grpc
import pytest

from pointmesh.v1 import ledger_pb2
from tests.ledger.helpers import balance, figures, key
from tests.mesh.conftest import Mesh
from tests.mesh.helpers import Line, by_rule, exact, new_member, purchase_request
from tests.mesh.test_outage import settle_all

# (which member, lines): A crosses silver (300 tier credits) in its third purchase and earns
# 2x after it; B hits the 50-point daily boost cap; C buys once.
SCRIPT: list[tuple[str, list[Line]]] = [
    ("A", [("misc", 1000, 1)]), ("B", [("boost", 500, 1)]), ("A", [("misc", 25000, 1)]),
    ("B", [("boost", 500, 1), ("misc", 300, 2)]), ("C", [("misc", 12000, 1)]), ("A", [("misc", 6000, 1)]),
    ("B", [("boost", 500, 1)]), ("A", [("misc", 1000, 1)]), ("B", [("boost", 500, 1)]), ("A", [("misc", 2000, 1)]),
]  # fmt: skip


def stream(mesh: Mesh, members: dict[str, str], tag: str) -> list[ledger_pb2.RecordPurchaseRequest]:
    start = mesh.clock.now() - timedelta(minutes=len(SCRIPT))
    return [
        purchase_request(members[who], lines, at=start + timedelta(minutes=k), receipt=f"{tag}-{k}")
        for k, (who, lines) in enumerate(SCRIPT)
    ]


async def ingest(mesh: Mesh, items: Sequence[ledger_pb2.IngestBatchRequest]) -> ledger_pb2.IngestBatchResponse:
    async def requests():  # type: ignore[no-untyped-def]
        for item in items:
            yield item

    response: ledger_pb2.IngestBatchResponse = await mesh.ledger.stub.IngestBatch(requests())
    return response


def as_items(purchases: list[ledger_pb2.RecordPurchaseRequest]) -> list[ledger_pb2.IngestBatchRequest]:
    return [ledger_pb2.IngestBatchRequest(purchase=p) for p in purchases]


async def members(mesh: Mesh) -> dict[str, str]:
    return {who: await new_member(mesh) for who in "ABC"}


def outcome(p: ledger_pb2.Purchase) -> tuple[object, ...]:
    return (exact(p), by_rule(p), p.purchase_number, p.tier_before, p.tier_after, p.status)


async def test_a_batch_earns_exactly_what_the_same_purchases_earn_one_by_one(mesh: Mesh) -> None:
    one_by_one, batched = await members(mesh), await members(mesh)
    unary = [(await mesh.ledger.stub.RecordPurchase(r)).purchase for r in stream(mesh, one_by_one, "u")]
    response = await ingest(mesh, as_items(stream(mesh, batched, "b")))

    assert (response.received, response.posted, response.failed) == (len(SCRIPT), len(SCRIPT), 0)
    assert [p.index for p in response.purchases] == list(range(len(SCRIPT)))
    got = [
        (await mesh.ledger.stub.GetPurchase(ledger_pb2.GetPurchaseRequest(purchase_id=p.purchase_id))).purchase
        for p in response.purchases
    ]
    assert [outcome(p) for p in got] == [outcome(p) for p in unary]
    assert [dict(p.earned) for p in response.purchases] == [exact(p) for p in got]
    # The figures themselves: A's welcome, its crossing into silver on the third purchase and
    # 2x after; B's boost capped at 50 a day.
    a = [p for (who, _), p in zip(SCRIPT, got, strict=True) if who == "A"]
    assert by_rule(a[0]) == {"base": 10, "welcome": 100}
    assert [(p.tier_before, p.tier_after) for p in a[1:4]] == [
        ("blue", "blue"),
        ("blue", "silver"),
        ("silver", "silver"),
    ]
    assert by_rule(a[3]) == {"base": 10, "silver": 10}
    b = [p for (who, _), p in zip(SCRIPT, got, strict=True) if who == "B"]
    assert sum(by_rule(p).get("boost", 0) for p in b) == 50
    for who in "ABC":
        for unit in ("points", "tier_credits"):
            assert figures(await balance(mesh.ledger.stub, batched[who], unit)) == figures(
                await balance(mesh.ledger.stub, one_by_one[who], unit)
            )


async def test_a_resent_stream_replays_and_bad_items_fail_alone(mesh: Mesh) -> None:
    people = await members(mesh)
    good = stream(mesh, people, "r")[:4]
    bad_quantity = purchase_request(people["C"], [("misc", 500, 1)], at=mesh.clock.now(), receipt="r-bad")
    bad_quantity.lines[0].quantity = 0
    unknown = purchase_request("m_" + "0" * 28, [("misc", 500, 1)], at=mesh.clock.now(), receipt="r-unknown")
    items = [*as_items(good[:2]), ledger_pb2.IngestBatchRequest(purchase=bad_quantity), ledger_pb2.IngestBatchRequest(),
             ledger_pb2.IngestBatchRequest(purchase=unknown), *as_items(good[2:])]  # fmt: skip

    first = await ingest(mesh, items)
    assert (first.received, first.posted, first.replayed, first.failed) == (7, 4, 0, 3)
    assert [(f.index, f.code, f.field) for f in first.failures] == [
        (2, "INVALID_ARGUMENT", "lines[0].quantity"), (3, "INVALID_ARGUMENT", "operation"), (4, "NOT_FOUND", "member_id"),
    ]  # fmt: skip
    before = {who: figures(await balance(mesh.ledger.stub, m)) for who, m in people.items()}

    again = await ingest(mesh, items)
    assert (again.posted, again.replayed, again.failed) == (0, 4, 3)
    assert [p.purchase_id for p in again.purchases] == [p.purchase_id for p in first.purchases]
    assert {who: figures(await balance(mesh.ledger.stub, m)) for who, m in people.items()} == before

    # The same receipt with another body is a conflict, reported by index; nothing earns.
    changed = purchase_request(people["A"], [("misc", 99_000, 1)], at=mesh.clock.now(), receipt="r-0")
    conflict = await ingest(mesh, as_items([changed]))
    assert [(f.index, f.code) for f in conflict.failures] == [(0, grpc.StatusCode.ALREADY_EXISTS.name)]
    assert figures(await balance(mesh.ledger.stub, people["A"])) == before["A"]


async def test_with_rules_svc_down_a_batch_waits_and_earns_in_order_when_it_returns(mesh: Mesh) -> None:
    reference, people = await members(mesh), await members(mesh)
    unary = [(await mesh.ledger.stub.RecordPurchase(r)).purchase for r in stream(mesh, reference, "x")]
    await mesh.stop_rules()
    response = await ingest(mesh, as_items(stream(mesh, people, "w")))
    assert response.posted == len(SCRIPT)
    assert {p.status for p in response.purchases} == {ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL}
    await mesh.restart_rules()
    await settle_all(mesh)
    got = [
        (await mesh.ledger.stub.GetPurchase(ledger_pb2.GetPurchaseRequest(purchase_id=p.purchase_id))).purchase
        for p in response.purchases
    ]
    assert [outcome(p) for p in got] == [outcome(p) for p in unary]


async def test_a_purchase_that_cannot_post_fails_alone_among_its_members_others(mesh: Mesh) -> None:
    member = await new_member(mesh)
    at = mesh.clock.now() - timedelta(minutes=5)
    first = await mesh.ledger.stub.RecordPurchase(purchase_request(member, [("misc", 1000, 1)], at=at, receipt="t-0"))
    earn_tx = first.purchase.earn_transactions["points"]  # not a redemption: no tender
    items = [
        purchase_request(member, [("misc", 2000, 1)], at=at, receipt="t-1"),
        purchase_request(member, [("misc", 3000, 1)], at=at, receipt="t-2", tender=earn_tx),
        purchase_request(member, [("misc", 4000, 1)], at=at, receipt="t-3"),
    ]
    response = await ingest(mesh, as_items(items))
    assert [(f.index, f.code, f.field) for f in response.failures] == [(1, "INVALID_ARGUMENT", "tender_transaction_id")]
    assert [(p.index, dict(p.earned)) for p in response.purchases] == [
        (0, {"points": 20, "tier_credits": 20}),
        (2, {"points": 40, "tier_credits": 40}),
    ]
    assert (await balance(mesh.ledger.stub, member)).balance_points == 110 + 20 + 40


async def test_a_write_retried_after_a_lost_race_reports_only_what_committed(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Cassandra store runs a unit again when another replica's write for the member wins
    the race. Here the first attempt of the batch's write is thrown away and, in between, a
    purchase of the same member commits elsewhere: the batch's purchases were quoted for
    counts that no longer hold, so they must be quoted again, not reported from the lost attempt."""
    member = await new_member(mesh)
    at = mesh.clock.now() - timedelta(minutes=5)
    store = mesh.ledger.app.service.store
    original = store.write
    armed = True

    class Discarded(Exception):
        pass

    async def racing(shard: int, unit: Callable[[Any], Any]) -> Any:
        nonlocal armed
        if not armed:
            return await original(shard, unit)
        armed = False

        def attempt(tx: Any) -> Any:
            unit(tx)
            raise Discarded

        with contextlib.suppress(Discarded):
            await original(shard, attempt)
        other = purchase_request(member, [("misc", 500, 1)], at=at, receipt="race-elsewhere")
        await mesh.ledger.stub.RecordPurchase(other)
        return await original(shard, unit)

    monkeypatch.setattr(store, "write", racing)
    items = [purchase_request(member, [("misc", 1000 * k, 1)], at=at, receipt=f"race-{k}") for k in (1, 2)]
    response = await ingest(mesh, as_items(items))
    assert not armed and response.failed == 0
    stored = [
        (await mesh.ledger.stub.GetPurchase(ledger_pb2.GetPurchaseRequest(purchase_id=p.purchase_id))).purchase
        for p in response.purchases
    ]
    # The purchase that won the race was the member's first (welcome bonus); the batch's are 2nd and 3rd.
    assert [(p.receipt_id, p.purchase_number, by_rule(p)) for p in stored] == [
        ("race-1", 2, {"base": 10}),
        ("race-2", 3, {"base": 20}),
    ]
    assert [dict(p.earned) for p in response.purchases] == [exact(p) for p in stored]
    assert (await balance(mesh.ledger.stub, member)).balance_points == 5 + 100 + 10 + 20


async def test_a_redemption_after_the_purchase_that_earns_its_points_in_one_batch_posts(mesh: Mesh) -> None:
    """Purchases and other postings of a batch run side by side; a member's redemption after
    its purchase waits for it (the batch is cut there), as it would in two batches."""
    member, other = await new_member(mesh), await new_member(mesh)
    items = [
        ledger_pb2.IngestBatchRequest(purchase=purchase_request(member, [("misc", 50, 1)], at=mesh.clock.now())),
        ledger_pb2.IngestBatchRequest(purchase=purchase_request(other, [("misc", 50, 1)], at=mesh.clock.now())),
        ledger_pb2.IngestBatchRequest(redeem=ledger_pb2.RedeemRequest(idempotency_key=key(), member_id=member,
                                                                      points=60)),
        ledger_pb2.IngestBatchRequest(redeem=ledger_pb2.RedeemRequest(idempotency_key=key(), member_id=other,
                                                                      points=100)),
    ]  # fmt: skip
    response = await ingest(mesh, items)
    assert [(f.index, f.code) for f in response.failures] == []
    assert (response.posted, response.failed) == (4, 0)
    assert (await balance(mesh.ledger.stub, member)).balance_points == 100 - 60  # the welcome bonus, less 60
    assert (await balance(mesh.ledger.stub, other)).balance_points == 0
