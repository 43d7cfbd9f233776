"""A single-node Apache Kafka broker in KRaft mode (broker and controller in one JVM) on
loopback, for development (`pointmesh dev kafka start`) and tests.

Settings and why:
* one node, replication factor 1 for the internal topics: there is one broker;
* `auto.create.topics.enable=false`: topics come from `pointmesh events topics create`
  (or the bus creating the ones it needs) with their configured partitions, never by typo;
* `group.initial.rebalance.delay.ms=0`: consumer groups form at once in tests;
* a 512 MB heap: the machine has 2 cores and the broker only carries test traffic.
"""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

from pointmesh.jvm import REPO, JvmProcess, resolve_classpath, run_java

POM_DIR = REPO / "dev" / "kafka"
JVM_OPTS = ["-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true"]


class KafkaServer:
    def __init__(self, data_dir: Path, port: int, controller_port: int) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.controller_port = controller_port
        self.process = JvmProcess("kafka", self.data_dir)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def properties_path(self) -> Path:
        return self.data_dir / "server.properties"

    def _properties(self) -> str:
        return "\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={(self.data_dir / 'logs').resolve()}",
            "num.partitions=4",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=false",
            "log.flush.interval.messages=9223372036854775807",
            "",
        ])  # fmt: skip

    def start(self, timeout: float = 120.0) -> float:
        """Formats the storage on first start, then starts the broker; returns seconds to ready."""
        classpath = resolve_classpath(POM_DIR)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.properties_path.write_text(self._properties())
        if not (self.data_dir / "logs" / "meta.properties").exists():
            cluster_id = new_cluster_id()
            run_java(
                classpath, ["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.properties_path)]
            )
        log4j = self.data_dir / "log4j2.properties"
        log4j.write_text(_LOG4J)
        args = [*JVM_OPTS, f"-Dlog4j2.configurationFile={log4j}", f"-Dkafka.logs.dir={self.data_dir}", "-cp",
                classpath, "kafka.Kafka", str(self.properties_path)]  # fmt: skip
        return self.process.start(args, self.port, timeout)

    def stop(self) -> None:
        self.process.stop()

    def kill(self) -> None:
        self.process.kill()

    def running(self) -> bool:
        return self.process.running_pid() is not None


_LOG4J = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/broker.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.startup.name = kafka.server.KafkaRaftServer
logger.startup.level = INFO
"""


def new_cluster_id() -> str:
    """A random cluster id in Kafka's form (URL-safe base64 of 16 bytes) that does not start with
    '-': the storage tool's argument parser reads one that does as an option and refuses to
    format (1 start in 64 failed that way). Kafka's own random ids skip those the same way."""
    while True:
        candidate = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not candidate.startswith("-"):
            return candidate
