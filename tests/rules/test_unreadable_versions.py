"""A stored version this build cannot read: during a rolling upgrade a newer leader publishes a
field an older replica does not know. Before, rules_svc answered FAILED_PRECONDITION field
`version` and the ledger saved the waiting purchase REFUSED for good; a follower copied the
version and failed every basket under it."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest

from ledger_svc import commands as c
from ledger_svc.accrual import EngineUnavailable
from ledger_svc.domain import IdemKey, Money
from ledger_svc.purchases import MemberState
from ledger_svc.rules_client import RulesEngineClient
from pointmesh.v1 import rules_pb2
from tests.conftest import RulesUnderTest, start_rules, stop_rules
from tests.rules.test_rules_grpc import BLACK_FRIDAY, MONDAY, WEEKEND, basket, doc, publish
from tests.waiting import until


async def _store_newer_version(rules: RulesUnderTest, version: int, effective_from: datetime) -> None:
    """Writes version `version` as a newer release would: v1's document plus a field this build
    does not know, straight into the replica's version file."""
    got = await rules.stub.GetProgram(rules_pb2.GetProgramRequest(program="shop", version=1))
    text = json.dumps(json.loads(got.document_json) | {"new_feature": {"x": 1}}, sort_keys=True, separators=(",", ":"))
    db = sqlite3.connect(rules.app.settings.data_dir / "rules" / "programs.db")
    try:
        db.execute(
            "INSERT INTO versions VALUES ('shop',?,?,?,'newer-leader',?,?)",
            (version, rules.clock.now().isoformat(), effective_from.isoformat(),
             hashlib.sha256(text.encode()).hexdigest(), text),
        )  # fmt: skip
        db.commit()
    finally:
        db.close()
    await rules.app.service.refresh()


def _purchase(at: datetime) -> c.RecordPurchase:
    return c.RecordPurchase(
        IdemKey("test", "p1"), "m1", "pos", "HEL-01", "r1", Money(1000, "EUR"),
        (c.PurchaseLine("sku0", "misc", 1, 1000),), at,
    )  # fmt: skip


async def test_a_stored_version_this_build_cannot_read_keeps_the_purchase_waiting(rules: RulesUnderTest) -> None:
    now = rules.clock.now()
    await publish(rules, "v1", doc(), now)
    await _store_newer_version(rules, 2, now + timedelta(seconds=1))
    receipt = MONDAY + timedelta(days=5)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rules.stub.Evaluate(rules_pb2.EvaluateRequest(program="shop", basket=basket(receipt, 1000)))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shop v2" in (caught.value.details() or "")
    assert "new_feature" in (caught.value.details() or "")

    # What the ledger makes of it: not the basket's fault, so the purchase keeps waiting.
    client = RulesEngineClient(rules.address, deadline_seconds=5.0, batch_deadline_seconds=5.0)
    with pytest.raises(EngineUnavailable):
        await client.quote("shop", _purchase(receipt), MemberState(), {})
    (outcome,) = await client.quote_many("shop", [(_purchase(receipt), MemberState(), {})])
    assert outcome is None or isinstance(outcome, EngineUnavailable)


async def test_a_follower_answers_like_its_leader_for_a_version_it_cannot_read_and_copies_the_ones_after(
    tmp_path: Path,
) -> None:
    """Skipping the version would price its receipts under the one before on the follower
    while the leader keeps them waiting: the replica the ledger reached would decide the points."""
    leader = await start_rules(tmp_path / "leader")
    follower = None
    try:
        now = leader.clock.now()
        await publish(leader, "v1", doc(WEEKEND), now)
        await _store_newer_version(leader, 2, now + timedelta(seconds=1))
        await publish(leader, "v3", doc(BLACK_FRIDAY), now + timedelta(days=30))
        follower = await start_rules(tmp_path / "f", leader.clock, rules_leader_addr=leader.address,
                                     rules_reload_seconds=0.2)  # fmt: skip
        on_follower = follower

        async def has_v3() -> bool:
            found = await on_follower.stub.ListVersions(rules_pb2.ListVersionsRequest(program="shop"))
            return 3 in [v.version for v in found.versions]

        await until(has_v3, 10)
        listed = await follower.stub.ListVersions(rules_pb2.ListVersionsRequest(program="shop"))
        assert [v.version for v in listed.versions] == [1, 2, 3]
        leader.clock.advance(timedelta(seconds=2))
        saturday = MONDAY + timedelta(days=5)
        for replica in (leader, follower):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await replica.stub.Evaluate(rules_pb2.EvaluateRequest(program="shop", basket=basket(saturday, 1000)))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "shop v2" in (caught.value.details() or "")
        later = await follower.stub.Evaluate(
            rules_pb2.EvaluateRequest(program="shop", basket=basket(saturday + timedelta(days=40), 1000))
        )
        assert later.evaluation.version == 3  # a readable version after it still arrives
    finally:
        if follower is not None:
            await stop_rules(follower)
        await stop_rules(leader)
