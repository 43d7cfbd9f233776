"""The ledger client retries exactly the unary methods, all of which carry idempotency or are reads;
the Cassandra connection retries only reads."""

from __future__ import annotations

import json

from pointmesh.cassandra_client import read_retry
from pointmesh.clients import LEDGER_SERVICE, unary_methods
from pointmesh.rpc import service_config


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
