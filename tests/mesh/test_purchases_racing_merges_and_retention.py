"""A purchase meeting a merge between its quote and its write, and a receipt arriving again
after its keys were purged. Before: the first earned on the merged-away member (its points
stranded until a restart, its count and caps never reaching the target, so the person's next
purchase took the welcome bonus again); the second earned the receipt twice, writing over the
first record, in a program taking receipts later than the ledger keeps their keys."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from pointmesh.clock import ManualClock
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import ledger_pb2
from tests.conftest import start_ledger, start_rules, stop_ledger, stop_rules
from tests.ledger.helpers import balance, error_field, key, rpc_error
from tests.mesh.conftest import PROGRAM, START, Mesh
from tests.mesh.helpers import new_member, purchase_request


@pytest.fixture
async def mesh(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Mesh]:
    """The mesh program, taking receipts up to 90 days late (the ledger keeps keys 35 days)."""
    program = tmp_path / "program.yaml"
    program.write_text(PROGRAM.read_text().replace("max_lateness_days: 30", "max_lateness_days: 90"))
    clock = ManualClock(START)
    port = free_port()
    rules = await start_rules(tmp_path / "rules", clock, rules_addr=f"127.0.0.1:{port}", rules_seed_file=str(program))
    ledger = await start_ledger(tmp_path / "ledger", redis_server.url, clock, rules_addr=f"127.0.0.1:{port}",
                                program="meshmart", rules_deadline_seconds=2.0)  # fmt: skip
    yield Mesh(rules, ledger, clock, port, tmp_path)
    await stop_ledger(ledger)
    await stop_rules(rules)


def _merge_after_quote(mesh: Mesh, source: str, target: str, method: str) -> None:
    """The merge lands while the purchase is between its quote and its shard write."""
    engine = mesh.ledger.app.service.accrual.engine
    original: Callable[..., Awaitable[Any]] = getattr(engine, method)
    armed = [True]

    async def quote_then_merge(*args: Any) -> Any:
        quoted = await original(*args)
        if armed.pop() if armed else False:
            await mesh.ledger.stub.MergeMembers(ledger_pb2.MergeMembersRequest(
                idempotency_key=key(), source_member_id=source, target_member_id=target))  # fmt: skip
        return quoted

    setattr(engine, method, quote_then_merge)


def _points(purchase: ledger_pb2.Purchase) -> dict[str, int]:
    return {x.part.rule_id: x.part.points for x in purchase.parts if x.part.unit == "points"}


async def test_a_purchase_meeting_a_merge_after_its_quote_is_refused_and_earns_once_on_the_target(mesh: Mesh) -> None:
    s = mesh.ledger.stub
    source, target = await new_member(mesh), await new_member(mesh)
    _merge_after_quote(mesh, source, target, "quote")
    request = purchase_request(source, [("misc", 5000, 1)], at=mesh.clock.now(), receipt="inflight-1")

    refused = await rpc_error(s.RecordPurchase(request), grpc.StatusCode.FAILED_PRECONDITION)
    assert error_field(refused) == "member_id" and f"merged into {target}" in (refused.details() or "")
    assert ((await balance(s, source)).balance_points, (await balance(s, target)).balance_points) == (0, 0)

    # Sent again for the member it was merged into: the receipt's keys were given back.
    request.member_id = target
    first = await s.RecordPurchase(request)
    assert (first.purchase.purchase_number, _points(first.purchase)) == (1, {"base": 50, "welcome": 100})
    second = await s.RecordPurchase(purchase_request(target, [("misc", 5000, 1)], at=mesh.clock.now(),
                                                     receipt="inflight-2"))  # fmt: skip
    assert (second.purchase.purchase_number, _points(second.purchase)) == (2, {"base": 50})
    assert ((await balance(s, source)).balance_points, (await balance(s, target)).balance_points) == (0, 200)


async def test_a_batch_purchase_meeting_a_merge_after_its_quote_fails_alone(mesh: Mesh) -> None:
    s = mesh.ledger.stub
    source, target, other = await new_member(mesh), await new_member(mesh), await new_member(mesh)
    _merge_after_quote(mesh, source, target, "quote_many")
    at = mesh.clock.now()
    requests = [purchase_request(source, [("misc", 5000, 1)], at=at, receipt="inflight-b1"),
                purchase_request(other, [("misc", 5000, 1)], at=at, receipt="inflight-b2")]  # fmt: skip

    async def stream() -> AsyncIterator[ledger_pb2.IngestBatchRequest]:
        for r in requests:
            yield ledger_pb2.IngestBatchRequest(purchase=r)

    response = await s.IngestBatch(stream())
    assert (response.posted, response.failed) == (1, 1)
    [failure] = response.failures
    assert (failure.index, failure.code, failure.field) == (0, "FAILED_PRECONDITION", "member_id")
    balances = [(await balance(s, m)).balance_points for m in (source, target, other)]
    assert balances == [0, 0, 150]
    # Its receipt's key was given back: sent again for the member it was merged into, it earns.
    requests[:] = [requests[0]]
    requests[0].member_id = target
    again = await s.IngestBatch(stream())
    assert (again.posted, again.failed) == (1, 0)
    assert (await balance(s, target)).balance_points == 150


async def test_a_receipt_older_than_the_ledger_keeps_keys_is_refused_not_earned_twice(mesh: Mesh) -> None:
    s = mesh.ledger.stub
    member = await new_member(mesh)
    request = purchase_request(member, [("misc", 5000, 1)], at=mesh.clock.now(), receipt="keep-1")
    await s.RecordPurchase(request)
    before = (await balance(s, member)).balance_points

    mesh.clock.advance(timedelta(days=40))  # within the program's 90 days, past the ledger's 35
    await mesh.ledger.app.service.purge_expired_keys(timedelta(days=35))
    late = await rpc_error(s.RecordPurchase(request), grpc.StatusCode.FAILED_PRECONDITION)
    assert error_field(late) == "receipt_time"
    assert "POINTMESH_IDEMPOTENCY_RETENTION_DAYS" in (late.details() or "")

    async def stream() -> AsyncIterator[ledger_pb2.IngestBatchRequest]:
        yield ledger_pb2.IngestBatchRequest(purchase=request)

    batch = await s.IngestBatch(stream())
    assert (batch.posted, batch.failed, batch.failures[0].field) == (0, 1, "receipt_time")
    assert (await balance(s, member)).balance_points == before


async def test_a_receipt_whose_keys_went_early_is_refused_in_the_write_not_written_over(mesh: Mesh) -> None:
    """Keys purged sooner than the ledger's policy assumes (a retention shortened since): the
    receipt is within the lateness bound, passes the directory, and meets its own stored
    purchase in the shard write."""
    s = mesh.ledger.stub
    member = await new_member(mesh)
    request = purchase_request(member, [("misc", 5000, 1)], at=mesh.clock.now(), receipt="keep-2")
    first = await s.RecordPurchase(request)
    mesh.clock.advance(timedelta(days=20))
    await mesh.ledger.app.service.purge_expired_keys(timedelta(days=10))

    again = await rpc_error(s.RecordPurchase(request), grpc.StatusCode.FAILED_PRECONDITION)
    assert error_field(again) == "receipt_id" and first.purchase.purchase_id in (again.details() or "")
    kept = await s.GetPurchase(ledger_pb2.GetPurchaseRequest(purchase_id=first.purchase.purchase_id))
    assert kept.purchase == first.purchase
    assert (await balance(s, member)).balance_points == 150
