"""A return meeting a merge of its member between looking where the purchase's points live and
its shard write. Before: the return, told the points were still with the member, reversed them
there after the merge had moved them out: the merged-away member owed the points as debt and
the target kept them. Now the write sees the member's state marked merged and the return looks
again, and takes the points back from the target."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from ledger_svc.domain import ReverseResult
from ledger_svc.reconcile import reconcile
from pointmesh.v1 import ledger_pb2
from tests.ledger.helpers import balance, key
from tests.mesh.conftest import Mesh
from tests.mesh.helpers import buy, exact, new_member, return_lines, reversed_points, welcomed_member


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


async def _merge(mesh: Mesh, source: str, target: str) -> None:
    await mesh.ledger.stub.MergeMembers(
        ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=source, target_member_id=target)
    )


async def _standing(mesh: Mesh, member_id: str) -> ledger_pb2.TierStatus:
    return (await mesh.ledger.stub.GetMemberTier(ledger_pb2.GetMemberTierRequest(member_id=member_id))).status


async def test_a_return_whose_heir_merges_on_meanwhile_takes_the_tier_credits_off_the_new_heir(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bought for 350 EUR (350 tier credits: silver) and was merged into B; A's purchase is
    returned, and B is merged into C before the return's reversal saga reaches B. The credits
    came off B's months, which B's merge had already moved to C: C stayed silver for a
    purchase fully returned, and kept the silver multiplier on every later purchase."""
    a, b, c = await new_member(mesh), await new_member(mesh), await new_member(mesh)
    bought = await buy(mesh, a, [("misc", 35_000, 1)])
    await _merge(mesh, a, b)
    assert (await _standing(mesh, b)).tier == "silver"
    sagas = mesh.ledger.app.service.sagas
    drive = sagas.drive_reversal

    async def heir_merges_first(saga_id: str) -> ReverseResult:
        await _merge(mesh, b, c)
        return await drive(saga_id)

    with monkeypatch.context() as patched:
        patched.setattr(sagas, "drive_reversal", heir_merges_first)
        back = await return_lines(mesh, bought.purchase.purchase_id, [(0, 1)])
    assert reversed_points(back, "tier_credits") == 350
    await mesh.ledger.stub.RunExpiry(ledger_pb2.RunExpiryRequest())
    assert (await balance(mesh.ledger.stub, c, "tier_credits")).balance_points == 0
    after = await _standing(mesh, c)
    assert (after.tier, after.qualifying_points) == ("blue", 0)
    assert (await reconcile(mesh.ledger.app.store, mesh.clock.now())).ok
