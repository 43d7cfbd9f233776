"""The ledger client retries exactly the unary methods, all of which carry idempotency or are reads;
the Cassandra connection retries only reads; whoever builds a client closes its channel."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from pointmesh.cassandra_client import read_retry
from pointmesh.clients import LEDGER_SERVICE, closing, ledger_stub, unary_methods
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.rpc import service_config
from pointmesh.v1 import fraud_pb2, ledger_pb2, rules_pb2, rules_pb2_grpc
from tests.conftest import start_ledger, stop_ledger


def test_ledger_client_retries_unary_methods_but_never_streams() -> None:
    methods = unary_methods(LEDGER_SERVICE)
    assert "/pointmesh.v1.LedgerService/Earn" in methods
    assert "/pointmesh.v1.LedgerService/GetBalance" in methods
    assert "/pointmesh.v1.LedgerService/WatchEvents" not in methods
    assert "/pointmesh.v1.LedgerService/IngestBatch" not in methods
    config = json.loads(service_config(methods, 4))
    names = {(n["service"], n["method"]) for n in config["methodConfig"][0]["name"]}
    assert ("pointmesh.v1.LedgerService", "Transfer") in names
    assert ("pointmesh.v1.LedgerService", "WatchEvents") not in names


def test_cassandra_reads_timed_out_short_of_replicas_are_asked_once_more_elsewhere_writes_never() -> None:
    """A read that timed out with too few replicas answering (a replica killed a moment ago that
    its coordinator still asks) goes once to the next coordinator; a second timeout, a read with
    enough answers, and every write timeout keep the driver's default decisions."""
    from cassandra import ConsistencyLevel, WriteType
    from cassandra.policies import RetryPolicy

    policy, default, quorum = read_retry(), RetryPolicy(), ConsistencyLevel.LOCAL_QUORUM
    assert policy.on_read_timeout(None, quorum, 2, 1, False, 0) == (RetryPolicy.RETRY_NEXT_HOST, None)
    assert default.on_read_timeout(None, quorum, 2, 1, False, 0) == (RetryPolicy.RETHROW, None)
    for answers in [(2, 1, False, 1), (2, 2, False, 0), (2, 2, True, 0)]:
        assert policy.on_read_timeout(None, quorum, *answers) == default.on_read_timeout(None, quorum, *answers)
    for kind in (WriteType.SIMPLE, WriteType.BATCH, WriteType.CAS, WriteType.BATCH_LOG):
        assert policy.on_write_timeout(None, quorum, kind, 2, 1, 0) == default.on_write_timeout(
            None, quorum, kind, 2, 1, 0
        )


async def test_a_stopped_ledger_has_closed_its_channels_to_rules_and_fraud(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Channels left open keep a connection, keepalive pings and gRPC's poller for the life of
    the process: a ledger stopped and built again (tests, or an embedding host) leaked both."""
    ledger = await start_ledger(tmp_path, redis_server.url, fraud_screening=True, fraud_addr=f"127.0.0.1:{free_port()}")
    stubs = ledger.app.stubs
    assert len(stubs) == 2
    await stop_ledger(ledger)
    for stub in stubs:
        method = stub.Evaluate if isinstance(stub, rules_pb2_grpc.RulesServiceStub) else stub.Score
        request = rules_pb2.EvaluateRequest() if isinstance(stub, rules_pb2_grpc.RulesServiceStub) else None
        with pytest.raises(grpc.aio.UsageError, match="closed"):
            await method(request or fraud_pb2.ScoreRequest())


async def test_a_one_shot_client_closes_its_channel_on_the_way_out() -> None:
    async with closing(ledger_stub(f"127.0.0.1:{free_port()}")) as stub:
        pass
    with pytest.raises(grpc.aio.UsageError, match="closed"):
        await stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id="m-1"))
