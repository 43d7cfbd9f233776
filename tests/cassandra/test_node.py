"""The Cassandra node the store tests run on: a real server from the Maven-resolved jars,
answering CQL, deciding lightweight transactions, and keeping acknowledged writes across a
restart (commit log synced in groups, never periodic)."""

from __future__ import annotations

import uuid

from cassandra.cluster import Cluster

from pointmesh.cassandra_server import CassandraServer


def session_for(node: CassandraServer):  # type: ignore[no-untyped-def]
    cluster = Cluster([node.address], port=node.cql_port, protocol_version=5)
    return cluster, cluster.connect()


def test_a_conditional_write_decides_once_and_survives_a_restart(cassandra_node: CassandraServer) -> None:
    keyspace = f"t_{uuid.uuid4().hex[:8]}"
    cluster, session = session_for(cassandra_node)
    try:
        assert session.execute("SELECT release_version FROM system.local").one().release_version.startswith("5.0")
        session.execute(f"CREATE KEYSPACE {keyspace} WITH replication = {{'class': 'SimpleStrategy', "
                        "'replication_factor': 1}")  # fmt: skip
        session.execute(f"CREATE TABLE {keyspace}.accounts (member text PRIMARY KEY, balance bigint, version bigint)")
        insert = f"INSERT INTO {keyspace}.accounts (member, balance, version) VALUES ('m1', 100, 1) IF NOT EXISTS"
        assert session.execute(insert).one().applied
        assert not session.execute(insert).one().applied  # the second claim loses
        spend = f"UPDATE {keyspace}.accounts SET balance = %s, version = %s WHERE member = 'm1' IF version = %s"
        assert session.execute(spend, (60, 2, 1)).one().applied
        stale = session.execute(spend, (20, 2, 1)).one()  # a writer that read version 1 too
        assert not stale.applied and stale.version == 2
    finally:
        cluster.shutdown()
    cassandra_node.stop()
    cassandra_node.start()
    cluster, session = session_for(cassandra_node)
    try:
        row = session.execute(f"SELECT balance, version FROM {keyspace}.accounts WHERE member = 'm1'").one()
        assert (row.balance, row.version) == (60, 2)
        session.execute(f"DROP KEYSPACE {keyspace}")
    finally:
        cluster.shutdown()
