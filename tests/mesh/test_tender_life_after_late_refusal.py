"""A purchase that waited for rules_svc and was then refused as too late still gives back its
tender on a return (take_back accepts a refused purchase): those points live as long as the
purchase's program gives points, as they do on every other path (docs/ledger.md, Returns)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from pointmesh.redis_server import RedisServer
from pointmesh.v1 import ledger_pb2
from tests.ledger.helpers import balance, earn, key, redeem, ts
from tests.mesh.conftest import PROGRAM, Mesh, running_mesh
from tests.mesh.helpers import new_member, purchase_request
from tests.mesh.test_outage import settle_all


@pytest.fixture
async def never_mesh(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Mesh]:
    """meshmart whose points never expire (`expiry_days: null`) from its first version on."""
    seed = tmp_path / "never.yaml"
    seed.write_text(PROGRAM.read_text().replace("  expiry_days: 365\n", "  expiry_days: null\n"))
    assert seed.read_text() != PROGRAM.read_text()
    async with running_mesh(tmp_path, redis_server, seed) as running:
        yield running


async def test_the_tender_of_a_purchase_refused_late_after_waiting_lives_as_the_program_says(
    never_mesh: Mesh,
) -> None:
    mesh = never_mesh
    s = mesh.ledger.stub
    mesh.clock.advance(timedelta(days=40))  # the receipt below is after the program's start
    member = await new_member(mesh)
    await earn(s, member, 500, expires_at=ts(mesh.clock.now() + timedelta(days=3650)))
    tender = (await redeem(s, member, 200)).transaction.transaction_id
    await mesh.stop_rules()  # the ledger cannot tell the receipt is too late: it waits
    waiting = await s.RecordPurchase(purchase_request(
        member, [("misc", 5_000, 1)], at=mesh.clock.now() - timedelta(days=31), tender=tender))  # fmt: skip
    assert waiting.purchase.status == ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL
    await mesh.restart_rules()
    await settle_all(mesh)
    refused = await s.GetPurchase(ledger_pb2.GetPurchaseRequest(purchase_id=waiting.purchase.purchase_id))
    assert refused.purchase.status == ledger_pb2.PURCHASE_STATUS_REFUSED, refused.purchase.status_reason
    back = await s.RecordReturn(ledger_pb2.RecordReturnRequest(
        idempotency_key=key(), purchase_id=waiting.purchase.purchase_id, channel="pos", store_id="HEL-01",
        lines=[ledger_pb2.ReturnLine(line_index=0, quantity=1)]))  # fmt: skip
    assert back.tender_recredited_points == 200
    assert (await balance(s, member)).balance_points == 500

    mesh.clock.advance(timedelta(days=400))  # past the ledger's own default of 365 days
    await s.RunExpiry(ledger_pb2.RunExpiryRequest())

    assert (await balance(s, member)).balance_points == 500
