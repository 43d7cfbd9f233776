"""What a return answers: the parts' returned_points are the points returns took back (not
what ops had reversed before them), and the debt is what the member owes once the points paid
as the purchase's tender are back."""

from __future__ import annotations

from pointmesh.v1 import ledger_pb2
from tests.ledger.helpers import balance, key, redeem
from tests.mesh.conftest import Mesh
from tests.mesh.helpers import buy, return_lines, reversed_points, welcomed_member


async def test_returned_points_in_the_explanation_are_what_returns_took_back(mesh: Mesh) -> None:
    """PurchasePart.returned_points is "points taken back by returns so far": after ops took 10
    back, the two returns reverse 20 + 10, and the parts must say 30, not 40."""
    member = await welcomed_member(mesh)
    bought = await buy(mesh, member, [("misc", 4000, 2)])
    pid = bought.purchase.purchase_id
    await mesh.ledger.stub.Reverse(ledger_pb2.ReverseRequest(
        idempotency_key=key(), transaction_id=bought.purchase.earn_transactions["points"], points=10))  # fmt: skip
    first = await return_lines(mesh, pid, [(0, 1)])
    second = await return_lines(mesh, pid, [(0, 1)])
    by_returns = reversed_points(first) + reversed_points(second)
    assert by_returns == 30
    explained = sum(p.returned_points for p in second.purchase.parts if p.part.unit == "points")
    assert explained == by_returns


async def test_a_return_giving_back_its_tender_reports_the_debt_the_member_is_left_with(mesh: Mesh) -> None:
    """Spent down to 0, the member returns a purchase (50 earned) paid with 80 points: they end
    with 30 points and no debt, and the answer must not tell the till they owe 50."""
    member = await welcomed_member(mesh)
    paid = (await redeem(mesh.ledger.stub, member, 80)).transaction.transaction_id
    bought = await buy(mesh, member, [("misc", 5000, 1)], tender=paid)
    await redeem(mesh.ledger.stub, member, 70)  # 100 - 80 + 50 = 70 -> 0
    back = await return_lines(mesh, bought.purchase.purchase_id, [(0, 1)])
    after = await balance(mesh.ledger.stub, member, "points")
    assert (reversed_points(back), back.tender_recredited_points) == (50, 80)
    assert (after.balance_points, after.debt_points) == (30, 0)
    assert back.debt_points == after.debt_points
