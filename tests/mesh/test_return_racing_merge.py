"""A return meeting a merge of its member between looking where the purchase's points live and
its shard write. Before: the return, told the points were still with the member, reversed them
there after the merge had moved them out: the merged-away member owed the points as debt and
the target kept them. Now the write sees the member's state marked merged and the return looks
again, and takes the points back from the target."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ledger_svc.reconcile import reconcile
from pointmesh.v1 import ledger_pb2
from tests.ledger.helpers import balance, key
from tests.mesh.conftest import Mesh
from tests.mesh.helpers import buy, exact, return_lines, reversed_points, welcomed_member


def _merge_after_looking(mesh: Mesh, source: str, target: str) -> None:
    """The merge lands right after the return found the purchase's member still active."""
    accrual = mesh.ledger.app.service.accrual
    original: Callable[[str], Awaitable[str]] = accrual._merged_into
    armed = [True]

    async def look_then_merge(member_id: str) -> str:
        found = await original(member_id)
        if armed.pop() if armed else False:
            await mesh.ledger.stub.MergeMembers(ledger_pb2.MergeMembersRequest(
                idempotency_key=key(), source_member_id=source, target_member_id=target))  # fmt: skip
        return found

    accrual._merged_into = look_then_merge  # type: ignore[method-assign]


async def test_a_return_meeting_a_merge_takes_the_points_back_from_the_target(mesh: Mesh) -> None:
    s = mesh.ledger.stub
    source, target = await welcomed_member(mesh), await welcomed_member(mesh)
    bought = await buy(mesh, source, [("misc", 5000, 1)])
    earned = exact(bought.purchase)["points"]
    before = (await balance(s, target)).balance_points

    _merge_after_looking(mesh, source, target)
    back = await return_lines(mesh, bought.purchase.purchase_id, [(0, 1)])

    assert reversed_points(back) == earned and back.debt_points == 0
    after_source, after_target = await balance(s, source), await balance(s, target)
    assert (after_source.balance_points, after_source.debt_points) == (0, 0)
    assert (
        after_target.balance_points == before + 100
    )  # the source's welcome moved over; the returned earn did not stay
    report = await reconcile(mesh.ledger.app.store, mesh.clock.now())
    assert report.ok, [d.describe() for d in report.differences]
