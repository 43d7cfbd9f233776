"""A ledger process SIGKILLed in the middle of a stream of mutations loses nothing it
acknowledged and posts nothing twice, on every store.

The real `pointmesh ledger serve` runs as a child process; 16 client threads send earns and
redemptions on a few members; after the first acknowledgements the process is killed. With
the ledger down, `pointmesh ledger reconcile` must find zero differences (no half-written
unit of work). After a restart every request is sent again with its idempotency key: the
acknowledged ones must answer exactly as before, and the final balances must equal what
applying each operation exactly once gives.
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc
from tests.conftest import ledger_process, ledger_process_env, pointmesh_cli, store_env, wait_for_port

MEMBERS = 4
OPENING = 1_000
OPS = 240
EARN, SPEND = 7, 5
TIMEOUT = 15.0


def _key(name: str) -> common_pb2.IdempotencyKey:
    return common_pb2.IdempotencyKey(namespace="crash-stream", key=name)


def _request(i: int, members: list[str]) -> ledger_pb2.EarnRequest | ledger_pb2.RedeemRequest:
    member = members[(i // 2) % MEMBERS]
    if i % 2:
        return ledger_pb2.RedeemRequest(idempotency_key=_key(f"r{i}"), member_id=member, points=SPEND)
    return ledger_pb2.EarnRequest(idempotency_key=_key(f"e{i}"), member_id=member, points=EARN)


def _send(stub: ledger_pb2_grpc.LedgerServiceStub, request: object) -> str:
    """The transaction id the ledger answered with."""
    if isinstance(request, ledger_pb2.EarnRequest):
        return str(stub.Earn(request, timeout=TIMEOUT).transaction.transaction_id)
    assert isinstance(request, ledger_pb2.RedeemRequest)
    return str(stub.Redeem(request, timeout=TIMEOUT).transaction.transaction_id)


@pytest.mark.parametrize("store", ["sqlite", "cassandra"])
def test_sigkill_mid_stream_keeps_every_acknowledged_posting_once(
    store: str, tmp_path: Path, redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    port = free_port()
    env = ledger_process_env(tmp_path / "data", redis_server.url, port, **store_env(request, store))
    log_path = tmp_path / "ledger.log"
    acked: dict[int, str] = {}
    lock = threading.Lock()

    with ledger_process(env, log_path) as doomed:
        wait_for_port(port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            members = [
                stub.CreateMember(ledger_pb2.CreateMemberRequest(idempotency_key=_key(f"m{i}")), timeout=TIMEOUT)
                .member.member_id
                for i in range(MEMBERS)
            ]  # fmt: skip
            for i, member in enumerate(members):
                stub.Earn(ledger_pb2.EarnRequest(idempotency_key=_key(f"open{i}"), member_id=member, points=OPENING),
                          timeout=TIMEOUT)  # fmt: skip

            def one(i: int) -> None:
                try:
                    tx_id = _send(stub, _request(i, members))
                except grpc.RpcError:
                    return  # in flight when the process died, or refused after it: replayed below
                with lock:
                    acked[i] = tx_id
                    if len(acked) == OPS // 3:
                        os.kill(doomed.pid, signal.SIGKILL)

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(one, range(OPS)))
        assert doomed.wait(timeout=10) == -signal.SIGKILL, log_path.read_text()
    assert OPS // 3 <= len(acked) < OPS

    down = pointmesh_cli("ledger", "reconcile", env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "zero differences" in down.stdout

    with ledger_process(env, log_path) as recovered:
        wait_for_port(port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            replayed = {i: _send(stub, _request(i, members)) for i in range(OPS)}
            assert {i: replayed[i] for i in acked} == acked
            for m, member in enumerate(members):
                ops = [i for i in range(OPS) if (i // 2) % MEMBERS == m]
                expected = OPENING + sum(SPEND * -1 if i % 2 else EARN for i in ops)
                got = stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=member), timeout=TIMEOUT).balance
                assert (got.balance_points, got.reserved_points) == (expected, 0)
        recovered.terminate()
        assert recovered.wait(timeout=15) == 0, log_path.read_text()

    up = pointmesh_cli("ledger", "reconcile", env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "zero differences" in up.stdout
