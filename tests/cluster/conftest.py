"""A three-node Cassandra cluster on 127.0.0.1-3 for the failure tests (`make test-cluster`).

Not part of `make test`: tests/conftest.py leaves this directory out unless
POINTMESH_CLUSTER_TESTS=1, which `make test-cluster` sets (after the main run has stopped its
single node, so the two never share this machine's memory and cores).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ledger_svc.store.cassandra_schema import migrate
from pointmesh import cassandra_client
from pointmesh.cassandra_cluster import CassandraCluster
from pointmesh.config import Settings, load_settings
from pointmesh.redis_server import free_port

KEYSPACE = "pointmesh_cluster"


@dataclass
class Cluster:
    nodes: CassandraCluster
    settings: Settings
    session: Any
    started_in: float


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    nodes = CassandraCluster(tmp_path_factory.mktemp("cluster"), free_port(), free_port(),
                             (free_port(), free_port(), free_port()))  # fmt: skip
    try:
        took = nodes.start()
        settings = load_settings({}, cassandra_contact_points=nodes.contact_points, cassandra_keyspace=KEYSPACE)
        driver, session = cassandra_client.connect(settings)
        _until_three_up(session)
        migrate(session, KEYSPACE, "simple:3")
        print(f"\nthree-node cluster up in {took:.1f}s")
        yield Cluster(nodes, settings, session, took)
        driver.shutdown()
    finally:
        nodes.stop()


def _until_three_up(session: Any, timeout: float = 120) -> None:
    """Every node sees both others as peers (joined the ring), not merely an open port, and
    the driver has all three up (else a keyspace created now meets "RF 3 > 2 nodes"), and the
    nodes agree on the schema (each node creates its own system keyspaces as it joins; a schema
    change made before they settle keeps all three busy pulling schemas from each other)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hosts = session.cluster.metadata.all_hosts()
        if (
            len(list(session.execute("SELECT peer FROM system.peers_v2"))) == 2
            and len(hosts) == 3
            and all(h.is_up for h in hosts)
            and session.cluster.control_connection.wait_for_schema_agreement(wait_time=10)
        ):
            return
        time.sleep(1)
    raise TimeoutError("the three nodes did not form one ring")
