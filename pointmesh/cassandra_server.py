"""A single Apache Cassandra node on loopback, for development (`pointmesh dev cassandra start`)
and tests, from the `cassandra-all` jars Maven resolves (dev/cassandra/pom.xml).

Settings and why (the rest are Cassandra's defaults):
* `commitlog_sync: group` with a 15 ms window: a write is acknowledged only once its commit
  log segment is synced (never `periodic`, which acknowledges before the sync); grouping keeps
  that affordable on a slow disk;
* timeouts are left at their defaults: this 2-core machine is slow, and shorter ones would turn
  load into spurious write timeouts (unknown LWT outcomes);
* loopback only, its own free ports (CQL, storage, JMX) and data directory, so several nodes
  and test runs can live side by side;
* a 1 GB heap and 8 concurrent reads/writes: test traffic, two cores;
* `auto_snapshot: false`: tests drop keyspaces freely;
* JVM options: the `--add-exports`/`--add-opens` Cassandra needs on Java 17 (as its own
  jvm17-server.options), G1, attach allowed for its own tooling.
"""

from __future__ import annotations

from pathlib import Path

from pointmesh.jvm import REPO, JvmProcess, resolve_classpath

POM_DIR = REPO / "dev" / "cassandra"
_EXPORTS = [
    "java.base/jdk.internal.misc", "java.base/jdk.internal.ref", "java.base/sun.nio.ch",
    "java.management.rmi/com.sun.jmx.remote.internal.rmi", "java.rmi/sun.rmi.registry", "java.rmi/sun.rmi.server",
    "java.sql/java.sql", "java.base/java.lang.ref", "jdk.unsupported/sun.misc",
]  # fmt: skip
_OPENS = [
    "java.base/java.lang.module", "java.base/jdk.internal.loader", "java.base/jdk.internal.ref",
    "java.base/jdk.internal.reflect", "java.base/jdk.internal.math", "java.base/jdk.internal.module",
    "java.base/jdk.internal.util.jar", "jdk.management/com.sun.management.internal", "java.base/sun.nio.ch",
    "java.base/java.io", "java.base/java.nio", "java.base/java.util.concurrent", "java.base/java.util",
    "java.base/java.util.concurrent.atomic", "java.base/java.lang", "java.base/java.math",
    "java.base/java.lang.reflect", "java.base/java.net",
]  # fmt: skip
JVM_OPTS = [
    "-Xms512m", "-Xmx1g", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=100", "-Djdk.attach.allowAttachSelf=true",
    "-Djava.net.preferIPv4Stack=true", "-Dcassandra-foreground=yes", "-Dcassandra.ring_delay_ms=1000",
    "-Dcassandra.skip_wait_for_gossip_to_settle=0",
    *(f"--add-exports={m}=ALL-UNNAMED" for m in _EXPORTS), *(f"--add-opens={m}=ALL-UNNAMED" for m in _OPENS),
]  # fmt: skip


class CassandraServer:
    def __init__(self, data_dir: Path, cql_port: int, storage_port: int, jmx_port: int,
                 address: str = "127.0.0.1", seeds: str = "") -> None:  # fmt: skip
        self.data_dir = Path(data_dir)
        self.cql_port, self.storage_port, self.jmx_port = cql_port, storage_port, jmx_port
        self.address = address
        self.seeds = seeds or f"{address}:{storage_port}"
        self.process = JvmProcess("cassandra", self.data_dir)

    @property
    def contact_point(self) -> str:
        return f"{self.address}:{self.cql_port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "cassandra.yaml"

    def _config(self) -> str:
        d = self.data_dir.resolve()
        return "\n".join([
            "cluster_name: pointmesh-dev",
            "num_tokens: 16",
            "allocate_tokens_for_local_replication_factor: 1",
            "partitioner: org.apache.cassandra.dht.Murmur3Partitioner",
            "endpoint_snitch: SimpleSnitch",
            "seed_provider:",
            "  - class_name: org.apache.cassandra.locator.SimpleSeedProvider",
            "    parameters:",
            f'      - seeds: "{self.seeds}"',
            f"listen_address: {self.address}",
            f"rpc_address: {self.address}",
            f"storage_port: {self.storage_port}",
            f"native_transport_port: {self.cql_port}",
            "start_native_transport: true",
            f"data_file_directories: [{d / 'data'}]",
            f"commitlog_directory: {d / 'commitlog'}",
            f"saved_caches_directory: {d / 'saved_caches'}",
            f"hints_directory: {d / 'hints'}",
            f"cdc_raw_directory: {d / 'cdc_raw'}",
            "commitlog_sync: group",
            "commitlog_sync_group_window: 2ms",
            "paxos_variant: v2",
            "commitlog_segment_size: 32MiB",
            "disk_failure_policy: stop",
            "commit_failure_policy: stop",
            "auto_snapshot: false",
            "concurrent_reads: 8",
            "concurrent_writes: 8",
            "concurrent_counter_writes: 8",
            "",
        ])  # fmt: skip

    def start(self, timeout: float = 240.0) -> float:
        """Starts the node and returns once the CQL port answers; returns seconds to ready."""
        classpath = resolve_classpath(POM_DIR)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config())
        args = [*JVM_OPTS, f"-Dcassandra.config=file://{self.config_path.resolve()}",
                f"-Dcassandra.storagedir={self.data_dir.resolve()}", f"-Dcassandra.jmx.local.port={self.jmx_port}",
                "-Dcassandra.logdir=" + str(self.data_dir.resolve()), "-cp", classpath,
                "org.apache.cassandra.service.CassandraDaemon"]  # fmt: skip
        return self.process.start(args, self.cql_port, timeout, host=self.address)

    def stop(self) -> None:
        self.process.stop(timeout=60)

    def kill(self) -> None:
        self.process.kill()

    def running(self) -> bool:
        return self.process.running_pid() is not None
