"""A caller cannot choose to go unscored. fraud_svc's refusal of a field, and a balance that
looks short when the spend is screened, were both decided by the operation's policy without a
score, which lets a small redemption through fail-open: a blocked device's included. Each test
has fraud_svc block one device and sends that device's redemption down the path."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from ledger_svc.domain import Balance
from pointmesh.redis_server import RedisServer
from pointmesh.v1 import ledger_pb2
from tests.ledger.helpers import balance, error_field, key, rpc_error, ts
from tests.screening.test_fraud_on_the_path import NOW, Screened, regular_member, screened_mesh

BLOCKED = "dv-blocked-1"


@pytest.fixture
async def blocking(tmp_path: Path, redis_server: RedisServer, fraud_models: Path) -> AsyncIterator[Screened]:
    """The screened mesh, with fraud_svc started on a decision file that blocks one device."""
    async with screened_mesh(tmp_path, redis_server, fraud_models) as env:
        decision = tmp_path / "decision.json"
        decision.write_text(json.dumps({"blocked_devices": [BLOCKED]}))
        await env.stop_fraud()
        await env.start_fraud(decision)
        yield env


def _redeem(member: str, points: int, name: str, **context: object) -> ledger_pb2.RedeemRequest:
    return ledger_pb2.RedeemRequest(
        idempotency_key=key(name), member_id=member, unit="points", points=points, business_time=ts(NOW),
        context=ledger_pb2.ScreeningContext(channel="app", device_id=BLOCKED, ip="203.0.113.9", **context),
    )  # fmt: skip


async def test_a_contact_change_dated_ahead_is_refused_not_decided_unscored(blocking: Screened) -> None:
    stub = blocking.ledger.stub
    destination = await regular_member(blocking, visits=1)
    member = await regular_member(blocking)
    before = await balance(stub, member)
    assert before.available_points > 1500
    denied = await rpc_error(stub.Redeem(_redeem(member, 1500, "blocked-1")), grpc.StatusCode.FAILED_PRECONDITION)
    assert "rule:blocked_device" in (denied.details() or "")
    for when in (NOW + timedelta(days=1), NOW.replace(year=1969)):
        ahead = _redeem(member, 1500, f"blocked-{when.year}", contact_changed_at=ts(when))
        refused = await rpc_error(stub.Redeem(ahead), grpc.StatusCode.INVALID_ARGUMENT)
        assert error_field(refused) == "context.contact_changed_at"
        transfer = ledger_pb2.TransferRequest(
            idempotency_key=key(f"t-{when.year}"), source_member_id=member,
            destination_member_id=destination, unit="points", points=100,
            context=ahead.context,
        )  # fmt: skip
        refused = await rpc_error(stub.Transfer(transfer), grpc.StatusCode.INVALID_ARGUMENT)
        assert error_field(refused) == "context.contact_changed_at"
    assert (await balance(stub, member)).available_points == before.available_points


async def test_a_spend_screened_while_the_balance_looks_short_is_scored_all_the_same(
    blocking: Screened, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The member holds all but 100 points, sends the blocked device's redemption, and voids the
    hold between the screening's balance read and the write (the read is slowed by 50 ms to
    make that moment reliable; nothing else is changed)."""
    stub = blocking.ledger.stub
    member = await regular_member(blocking)
    before = await balance(stub, member)
    hold = await stub.PlaceHold(ledger_pb2.PlaceHoldRequest(
        idempotency_key=key("own-hold"), member_id=member, unit="points", points=before.available_points - 100,
        context=ledger_pb2.ScreeningContext(channel="pos", store_id="LIS-01")))  # fmt: skip
    assert hold.hold.status == ledger_pb2.HOLD_STATUS_PLACED
    service = blocking.ledger.app.service
    read = service.stored_balance

    async def slow(member_id: str, unit: str) -> Balance:
        found = await read(member_id, unit)
        await asyncio.sleep(0.05)
        return found

    monkeypatch.setattr(service, "stored_balance", slow)
    redeem = asyncio.ensure_future(stub.Redeem(_redeem(member, 1500, "short-1")))
    await asyncio.sleep(0.02)
    await stub.VoidHold(ledger_pb2.VoidHoldRequest(idempotency_key=key("void-own"), hold_id=hold.hold.hold_id))
    denied = await rpc_error(redeem, grpc.StatusCode.FAILED_PRECONDITION)
    assert "rule:blocked_device" in (denied.details() or ""), denied.details()
    assert (await balance(stub, member)).available_points == before.available_points
