"""Three Cassandra nodes on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (`make test-cluster`).

Linux routes all of 127.0.0.0/8 to the loopback interface, so each node gets its own address
with the same CQL and storage ports (the driver needs one CQL port for every node); only the
JMX ports differ, since JMX listens on 127.0.0.1. Nodes join one at a time: Cassandra refuses
two bootstraps at once.
"""

from __future__ import annotations

import time
from pathlib import Path

from pointmesh.cassandra_server import CassandraServer
from pointmesh.jvm import JvmExited

ADDRESSES = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
JOIN_ATTEMPTS = 3


class CassandraCluster:
    def __init__(self, data_dir: Path, cql_port: int, storage_port: int, jmx_ports: tuple[int, int, int]) -> None:
        seed = f"{ADDRESSES[0]}:{storage_port}"
        self.nodes = [
            CassandraServer(Path(data_dir) / f"node{i + 1}", cql_port, storage_port, jmx, address=address, seeds=seed)
            for i, (address, jmx) in enumerate(zip(ADDRESSES, jmx_ports, strict=True))
        ]

    @property
    def contact_points(self) -> str:
        return ",".join(node.contact_point for node in self.nodes)

    def start(self) -> float:
        """Starts every node in turn; returns the seconds until all three answer CQL."""
        started = time.monotonic()
        for node in self.nodes:
            for attempt in range(JOIN_ATTEMPTS):
                try:
                    node.start()
                    break
                except JvmExited as exc:
                    # A node whose gossip round found the seed busy gives up at once; it has not
                    # joined, so starting it again is safe. (The reason is in the whole start's
                    # log: its tail is the shutdown hook's flushing.)
                    if "Unable to contact any seeds" not in exc.log or attempt == JOIN_ATTEMPTS - 1:
                        raise
                    time.sleep(5)
        return time.monotonic() - started

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
