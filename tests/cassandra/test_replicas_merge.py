"""An earn or adjustment on one ledger replica right after another replica merged the member
away. Each replica keeps a member's status for a moment (MEMBER_CACHE_SECONDS); before, the
replica that had just served the member took the earn on the merged-away member, whose points
then sat where nothing reads them (the target's balance lacked them, a redemption of the
person's whole balance was refused) until a replica restarted. Now the write reads the member's
state, which the merge marked in the same partition, and refuses."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from ledger_svc.store import cassandra as cassandra_store
from pointmesh.redis_server import RedisServer
from pointmesh.v1 import ledger_pb2
from tests.conftest import CassandraSession, LedgerUnderTest, fresh_cassandra_ledger, start_ledger, stop_ledger
from tests.ledger.helpers import balance, create_member, earn, error_field, key, rpc_error


async def test_an_earn_on_another_replica_right_after_a_merge_is_refused_and_nothing_strands(
    tmp_path: Path, redis_server: RedisServer, cassandra_session: CassandraSession
) -> None:
    shared = fresh_cassandra_ledger(cassandra_session)
    replicas: list[LedgerUnderTest] = []
    try:
        merging = await start_ledger(tmp_path / "a", redis_server.url, **shared)
        replicas.append(merging)
        serving = await start_ledger(tmp_path / "b", redis_server.url, **shared)
        replicas.append(serving)
        for _ in range(3):
            source, target = (
                (await create_member(merging.stub)).member_id,
                (await create_member(merging.stub)).member_id,
            )
            await earn(serving.stub, source, 100)  # the serving replica has the source as ACTIVE now
            await merging.stub.MergeMembers(ledger_pb2.MergeMembersRequest(
                idempotency_key=key(), source_member_id=source, target_member_id=target))  # fmt: skip

            refused = await rpc_error(earn(serving.stub, source, 7), grpc.StatusCode.FAILED_PRECONDITION)
            assert error_field(refused) == "member_id" and f"merged into {target}" in (refused.details() or "")
            adjusted = serving.stub.Adjust(ledger_pb2.AdjustRequest(
                idempotency_key=key(), member_id=source, points=5, reason="goodwill", operator_id="ops-1"))  # fmt: skip
            assert error_field(await rpc_error(adjusted, grpc.StatusCode.FAILED_PRECONDITION)) == "member_id"
            assert ((await balance(merging.stub, source)).balance_points,
                    (await balance(merging.stub, target)).balance_points) == (0, 100)  # fmt: skip
    finally:
        for replica in replicas:
            await stop_ledger(replica)


def _merge(source: str, target: str) -> ledger_pb2.MergeMembersRequest:
    return ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=source, target_member_id=target)


async def test_merges_into_each_other_on_two_replicas_at_once_leave_one_member_active(
    tmp_path: Path, redis_server: RedisServer, cassandra_session: CassandraSession
) -> None:
    """A into B on one replica, B into A on the other, sent together: each replica's status
    write reads both members, but per partition; the merge lease keeps one from running beside
    the other, so the second finds its target merged and is refused."""
    shared = fresh_cassandra_ledger(cassandra_session)
    replicas: list[LedgerUnderTest] = []
    try:
        for name in ("a", "b"):
            replicas.append(await start_ledger(tmp_path / name, redis_server.url, **shared))
        one, two = replicas
        for _ in range(3):
            a, b = (await create_member(one.stub)).member_id, (await create_member(one.stub)).member_id
            await earn(one.stub, a, 100)
            await earn(one.stub, b, 50)

            outcomes = await asyncio.gather(one.stub.MergeMembers(_merge(a, b)), two.stub.MergeMembers(_merge(b, a)),
                                            return_exceptions=True)  # fmt: skip

            refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
            assert [e.code() for e in refused] == [grpc.StatusCode.FAILED_PRECONDITION], outcomes
            statuses = {m: (await one.stub.GetMember(ledger_pb2.GetMemberRequest(member_id=m))).member.status
                        for m in (a, b)}  # fmt: skip
            assert sorted(statuses.values()) == sorted([ledger_pb2.MEMBER_STATUS_ACTIVE,
                                                        ledger_pb2.MEMBER_STATUS_MERGED])  # fmt: skip
            survivor = next(m for m, s in statuses.items() if s == ledger_pb2.MEMBER_STATUS_ACTIVE)
            assert (await balance(two.stub, survivor)).balance_points == 150
    finally:
        for replica in replicas:
            await stop_ledger(replica)


async def test_a_merge_waits_for_a_lease_held_elsewhere_then_answers_unavailable(
    tmp_path: Path, redis_server: RedisServer, cassandra_session: CassandraSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica holds the merge lease (its row, as that replica wrote it): the merge waits,
    is refused UNAVAILABLE with nothing written, and the same call with the same key goes
    through once the lease is given back."""
    monkeypatch.setattr(cassandra_store, "LEASE_WAIT_SECONDS", 0.5)
    shared = fresh_cassandra_ledger(cassandra_session)
    ledger = await start_ledger(tmp_path / "a", redis_server.url, **shared)
    try:
        a, b = (await create_member(ledger.stub)).member_id, (await create_member(ledger.stub)).member_id
        keyspace, name = shared["cassandra_keyspace"], shared["cassandra_ledger"]
        cassandra_session.session.execute(
            f"INSERT INTO {keyspace}.meta (ledger, k, v) VALUES (%s, 'lease:merge', 'elsewhere') USING TTL 60", (name,)
        )
        request = _merge(a, b)

        await rpc_error(ledger.stub.MergeMembers(request), grpc.StatusCode.UNAVAILABLE)

        member = (await ledger.stub.GetMember(ledger_pb2.GetMemberRequest(member_id=a))).member
        assert member.status == ledger_pb2.MEMBER_STATUS_ACTIVE
        cassandra_session.session.execute(f"DELETE FROM {keyspace}.meta WHERE ledger=%s AND k='lease:merge'", (name,))
        await ledger.stub.MergeMembers(request)
        member = (await ledger.stub.GetMember(ledger_pb2.GetMemberRequest(member_id=a))).member
        assert member.status == ledger_pb2.MEMBER_STATUS_MERGED
        row = cassandra_session.session.execute(
            f"SELECT v FROM {keyspace}.meta WHERE ledger=%s AND k='lease:merge'", (name,)
        ).one()
        assert row is None  # given back
    finally:
        await stop_ledger(ledger)
