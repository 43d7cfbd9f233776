"""`pointmesh ledger migrate` on a node that stalls mid-migration (a long GC pause, a machine
short of CPU): the schema statements that time out are run again, and the migration ends
with every table in place and recorded once."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile

from ledger_svc.store import cassandra_schema
from ledger_svc.store.cassandra_schema import LATEST, applied_version, migrate
from pointmesh.cassandra_server import CassandraServer

PAUSE_SECONDS = 4.0


def test_a_node_that_stalls_mid_migration_still_ends_fully_migrated(
    cassandra_node: CassandraServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.environ.get("POINTMESH_CASSANDRA_CONTACT_POINTS"):
        pytest.skip("pauses the session's own node; a given node is not ours to stop")
    pid = cassandra_node.process.running_pid()
    assert pid is not None
    # Both the session's default and the schema statements' own timeout are far shorter than
    # the pause, so at least one statement is sure to time out while the node is stopped.
    monkeypatch.setattr(cassandra_schema, "SCHEMA_STATEMENT_TIMEOUT", 1.0)
    profile = ExecutionProfile(request_timeout=1.0)
    cluster = Cluster([cassandra_node.address], port=cassandra_node.cql_port, protocol_version=5,
                      execution_profiles={EXEC_PROFILE_DEFAULT: profile})  # fmt: skip
    session = cluster.connect()
    keyspace = f"m_{uuid.uuid4().hex[:8]}"
    paused = threading.Event()

    def stall() -> None:
        os.kill(pid, signal.SIGSTOP)
        paused.set()
        time.sleep(PAUSE_SECONDS)
        os.kill(pid, signal.SIGCONT)

    staller = threading.Thread(target=stall)
    try:
        staller.start()
        paused.wait(5)
        applied = migrate(session, keyspace, "simple:1")
        staller.join()
        assert applied == list(range(1, LATEST + 1))
        assert applied_version(session, keyspace) == LATEST
        recorded = [row.version for row in session.execute(f"SELECT version FROM {keyspace}.schema_migrations")]
        assert sorted(recorded) == list(range(1, LATEST + 1))
        assert migrate(session, keyspace, "simple:1") == []  # nothing left to apply
    finally:
        staller.join()
        os.kill(pid, signal.SIGCONT)
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)
        cluster.shutdown()
