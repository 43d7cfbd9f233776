"""The background reconciliation inside ledger_svc voids a hold its timer missed, on each store.

The hold timer is the maintenance pass (an hour apart here, so it never runs); the ledger's
reconciliation pass runs every 0.2 s, finds the hold still placed past its timeout by a scan
of the holds themselves, and voids it: the points are available again, once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from pointmesh.redis_server import RedisServer
from pointmesh.v1 import ledger_pb2
from tests.conftest import LedgerUnderTest, start_ledger, stop_ledger, store_settings
from tests.ledger.helpers import balance, create_member, earn, place_hold
from tests.waiting import until


@pytest.fixture(params=["sqlite", "cassandra"])
async def reconciling(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[LedgerUnderTest]:
    running = await start_ledger(
        tmp_path / "data", redis_server.url, reconcile_interval_seconds=0.2, **store_settings(request, request.param)
    )
    yield running
    await stop_ledger(running)


async def test_a_hold_past_its_timeout_is_voided_by_the_reconciliation_pass(reconciling: LedgerUnderTest) -> None:
    stub = reconciling.stub
    member = (await create_member(stub)).member_id
    await earn(stub, member, 100)
    held = await place_hold(stub, member, 60)
    runs = REGISTRY.get_sample_value("pointmesh_reconcile_runs_total") or 0.0
    await until(lambda: (REGISTRY.get_sample_value("pointmesh_reconcile_runs_total") or 0.0) > runs + 1, 20)
    # Not yet due: the pass leaves it alone.
    assert (await balance(stub, member)).reserved_points == 60

    reconciling.clock.advance(timedelta(minutes=16))  # the default hold timeout is 15 minutes

    async def voided() -> bool:
        return (await balance(stub, member)).reserved_points == 0

    await until(voided, 20)
    hold = (await stub.GetHold(ledger_pb2.GetHoldRequest(hold_id=held.hold.hold_id))).hold
    assert hold.status == ledger_pb2.HOLD_STATUS_EXPIRED
    assert (await balance(stub, member)).available_points == 100
    runs = REGISTRY.get_sample_value("pointmesh_reconcile_runs_total") or 0.0
    await until(lambda: (REGISTRY.get_sample_value("pointmesh_reconcile_runs_total") or 0.0) > runs + 1, 20)
    assert REGISTRY.get_sample_value("pointmesh_reconcile_differences") == 0
