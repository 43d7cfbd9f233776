"""A cross-shard transfer survives the ledger process being SIGKILLed between its saga steps.

The real `pointmesh ledger serve` runs as a child process with a fault point that kills it
half-way through a Transfer. While it is down `pointmesh ledger reconcile` reports the open
saga; the restarted process completes it at start-up, points move exactly once, and a replay
of the original request returns the finished transfer without moving anything again.
"""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest

from ledger_svc.domain import bucket_of
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc
from tests.conftest import ledger_process, ledger_process_env, pointmesh_cli, store_env, wait_for_port

SHARDS = 4
EARNED = 100
MOVED = 40
CALL_TIMEOUT_SECONDS = 10.0


def _key(name: str) -> common_pb2.IdempotencyKey:
    return common_pb2.IdempotencyKey(namespace="crash-test", key=name)


def _members_on_two_shards(stub: ledger_pb2_grpc.LedgerServiceStub) -> tuple[str, str]:
    """Creates members until two of them live on different shards."""
    first = ""
    for i in range(64):
        member_id = stub.CreateMember(
            ledger_pb2.CreateMemberRequest(idempotency_key=_key(f"member-{i}")), timeout=CALL_TIMEOUT_SECONDS
        ).member.member_id
        if not first:
            first = member_id
        elif bucket_of(member_id) % SHARDS != bucket_of(first) % SHARDS:
            return first, member_id
    raise AssertionError("64 members all landed on one shard")


def _balance(stub: ledger_pb2_grpc.LedgerServiceStub, member_id: str) -> ledger_pb2.Balance:
    return stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=member_id), timeout=CALL_TIMEOUT_SECONDS).balance


def _entries(stub: ledger_pb2_grpc.LedgerServiceStub, member_id: str) -> list[ledger_pb2.Entry]:
    return list(
        stub.ListEntries(
            ledger_pb2.ListEntriesRequest(member_id=member_id, page=common_pb2.PageRequest(page_size=500)),
            timeout=CALL_TIMEOUT_SECONDS,
        ).entries
    )


@pytest.mark.parametrize("store", ["sqlite", "cassandra"])
@pytest.mark.parametrize("fault_point", ["transfer_after_hold", "transfer_after_credit"])
def test_cross_shard_transfer_killed_mid_saga_completes_exactly_once_after_restart(
    fault_point: str, store: str, tmp_path: Path, redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    port = free_port()
    env = ledger_process_env(
        tmp_path / "data", redis_server.url, port, **store_env(request, store),
        POINTMESH_LEDGER_SHARDS=str(SHARDS), POINTMESH_FAULT_POINT="",
    )  # fmt: skip
    log_path = tmp_path / "ledger.log"
    transfer = ledger_pb2.TransferRequest(
        idempotency_key=_key("transfer-1"), unit="points", points=MOVED, reason="gift to a friend"
    )

    with ledger_process({**env, "POINTMESH_FAULT_POINT": fault_point}, log_path) as doomed:
        wait_for_port(port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            source, destination = _members_on_two_shards(stub)
            stub.Earn(
                ledger_pb2.EarnRequest(idempotency_key=_key("earn-1"), member_id=source, points=EARNED),
                timeout=CALL_TIMEOUT_SECONDS,
            )
            transfer.source_member_id, transfer.destination_member_id = source, destination
            with pytest.raises(grpc.RpcError) as failed:
                stub.Transfer(transfer, timeout=CALL_TIMEOUT_SECONDS)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert doomed.wait(timeout=10) == -signal.SIGKILL, log_path.read_text()

    down = pointmesh_cli("ledger", "reconcile", "--saga-grace-seconds", "0", env=env)  # the ledger is down
    assert down.returncode == 1, down.stdout + down.stderr
    assert "transfer saga left open" in down.stdout
    assert "reconcile: OK" not in down.stdout

    with ledger_process(env, log_path) as recovered:
        wait_for_port(port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            src, dst = _balance(stub, source), _balance(stub, destination)
            assert (src.balance_points, src.reserved_points, src.available_points) == (
                EARNED - MOVED,
                0,
                EARNED - MOVED,
            )
            assert (dst.balance_points, dst.available_points) == (MOVED, MOVED)
            assert src.balance_points + dst.balance_points == EARNED

            replayed = stub.Transfer(transfer, timeout=CALL_TIMEOUT_SECONDS)
            again = stub.Transfer(transfer, timeout=CALL_TIMEOUT_SECONDS)
            assert replayed.transfer_id and replayed.transfer_id == again.transfer_id
            assert (replayed.debit.member_id, replayed.debit.points) == (source, -MOVED)
            assert (replayed.credit.member_id, replayed.credit.points) == (destination, MOVED)
            assert replayed.debit.kind == ledger_pb2.TRANSACTION_KIND_TRANSFER_OUT
            assert replayed.credit.kind == ledger_pb2.TRANSACTION_KIND_TRANSFER_IN
            assert (replayed.debit, replayed.credit) == (again.debit, again.credit)

            # The transfer recovery completed is the one the replay reports, and it posted once.
            outs = [e for e in _entries(stub, source) if e.kind == ledger_pb2.TRANSACTION_KIND_TRANSFER_OUT]
            ins = [e for e in _entries(stub, destination) if e.kind == ledger_pb2.TRANSACTION_KIND_TRANSFER_IN]
            assert [(e.transaction_id, e.points, e.reference) for e in outs] == [
                (replayed.debit.transaction_id, -MOVED, replayed.transfer_id)
            ]
            assert [(e.transaction_id, e.points, e.reference) for e in ins] == [
                (replayed.credit.transaction_id, MOVED, replayed.transfer_id)
            ]
            assert _balance(stub, source).balance_points == EARNED - MOVED
            assert _balance(stub, destination).balance_points == MOVED
        recovered.terminate()
        assert recovered.wait(timeout=15) == 0, log_path.read_text()

    up = pointmesh_cli("ledger", "reconcile", env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "zero differences" in up.stdout
