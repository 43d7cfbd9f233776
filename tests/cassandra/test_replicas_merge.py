"""An earn or adjustment on one ledger replica right after another replica merged the member
away. Each replica keeps a member's status for a moment (MEMBER_CACHE_SECONDS); before, the
replica that had just served the member took the earn on the merged-away member, whose points
then sat where nothing reads them (the target's balance lacked them, a redemption of the
person's whole balance was refused) until a replica restarted. Now the write reads the member's
state, which the merge marked in the same partition, and refuses."""

from __future__ import annotations

from pathlib import Path

import grpc

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
