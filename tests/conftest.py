"""Real fixtures: a redis-server on a free port, and ledger_svc on loopback with a test clock."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from ledger_svc.app import LedgerApp, build
from ledger_svc.store.cassandra import CassandraLedgerStore
from ledger_svc.store.cassandra_schema import migrate
from pointmesh import cassandra_client
from pointmesh.cassandra_server import CassandraServer
from pointmesh.clock import ManualClock
from pointmesh.config import Settings, load_settings
from pointmesh.event_loop import loop_factory
from pointmesh.kafka_server import KafkaServer
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.rpc import client_channel
from pointmesh.v1 import ledger_pb2_grpc, rules_pb2_grpc
from rules_svc.app import RulesApp
from rules_svc.app import build as build_rules
from tests.loops import suite_loop

REPO = Path(__file__).resolve().parent.parent


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """In-process services and clients run on the loop service processes run on:
    POINTMESH_EVENT_LOOP, uvloop unless set (`POINTMESH_EVENT_LOOP=asyncio make test` runs the
    suite on Python's own loop)."""
    kind = suite_loop()
    return {kind: loop_factory(kind) or asyncio.new_event_loop}


# The three-node failure tests start their own cluster; only `make test-cluster` runs them.
collect_ignore = [] if os.environ.get("POINTMESH_CLUSTER_TESTS") == "1" else ["cluster"]


def start_kafka(data_dir: Path) -> KafkaServer | None:
    """A real single-node broker (KRaft) from the Maven-resolved jars, or None to skip.

    CI sets POINTMESH_REQUIRE_KAFKA=1: there a broker that cannot start fails the run.
    """
    required = os.environ.get("POINTMESH_REQUIRE_KAFKA") == "1"
    server = KafkaServer(data_dir, free_port(), free_port())
    try:
        server.start()
    except Exception as exc:
        if required:
            raise
        pytest.skip(f"no Kafka broker could start here ({exc}); CI requires one")
        return None
    return server


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One broker for the session, or the one POINTMESH_KAFKA_BOOTSTRAP names."""
    given = os.environ.get("POINTMESH_KAFKA_BOOTSTRAP")
    if given:
        yield given
        return
    server = start_kafka(tmp_path_factory.mktemp("kafka"))
    assert server is not None
    yield server.bootstrap
    server.stop()


@pytest.fixture(scope="session")
def cassandra_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CassandraServer]:
    """One real Cassandra node for the session (CI sets POINTMESH_REQUIRE_CASSANDRA=1: a node
    that cannot start fails the run there instead of skipping)."""
    node = CassandraServer(tmp_path_factory.mktemp("cassandra"), free_port(), free_port(), free_port())
    try:
        node.start()
    except Exception as exc:
        if os.environ.get("POINTMESH_REQUIRE_CASSANDRA") == "1":
            raise
        pytest.skip(f"no Cassandra node could start here ({exc}); CI requires one")
    yield node
    node.stop()


@pytest.fixture(scope="session")
def cassandra_contact_points(request: pytest.FixtureRequest) -> str:
    """A running node given by POINTMESH_CASSANDRA_CONTACT_POINTS, or the session's own."""
    given = os.environ.get("POINTMESH_CASSANDRA_CONTACT_POINTS")
    if given:
        return given
    node: CassandraServer = request.getfixturevalue("cassandra_node")
    return node.contact_point


@pytest.fixture(scope="session")
def cassandra_session(cassandra_contact_points: str) -> Iterator[CassandraSession]:
    """A driver session on a keyspace migrated once; tests keep apart by ledger name."""
    settings = load_settings(cassandra_contact_points=cassandra_contact_points, cassandra_keyspace="pointmesh_test")
    cluster, session = cassandra_client.connect(settings)
    migrate(session, settings.cassandra_keyspace, "simple:1")
    yield CassandraSession(settings, session)
    cluster.shutdown()


@dataclass(frozen=True)
class CassandraSession:
    settings: Settings
    session: Any

    def open_store(self, ledger: str, shards: int) -> CassandraLedgerStore:
        self.reconnected()
        return CassandraLedgerStore(self.session, self.settings.cassandra_keyspace, ledger, shards)

    def reconnected(self, timeout: float = 60) -> None:
        """Waits out the driver's reconnection after a test restarted the node (test_node.py)."""
        from cassandra.cluster import NoHostAvailable

        deadline = time.monotonic() + timeout
        while True:
            try:
                self.session.execute("SELECT release_version FROM system.local")
                return
            except NoHostAvailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the whole session; tests keep apart by member id."""
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def ledger_settings(data_dir: Path, redis_url: str, **overrides: object) -> Settings:
    """Settings for a ledger under test: fast background loops, its own data dir."""
    base: dict[str, object] = {
        "data_dir": data_dir,
        "redis_url": redis_url,
        "ledger_addr": "127.0.0.1:0",
        "ledger_metrics_port": 0,
        "maintenance_interval_seconds": 3600.0,
        "outbox_poll_seconds": 0.02,
        "grace_seconds": 2.0,
        "redis_timeout_seconds": 0.3,
        # Tests that screen with fraud_svc turn this on and point fraud_addr at one.
        "fraud_screening": False,
        # Tests of bulk ingest turn the ingest consumer on.
        "ingest_consumer": False,
    }
    base.update(overrides)
    return load_settings({}, **base)


@dataclass
class LedgerUnderTest:
    app: LedgerApp
    clock: ManualClock
    stub: ledger_pb2_grpc.LedgerServiceStub
    channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.port}"


async def start_ledger(
    data_dir: Path, redis_url: str, clock: ManualClock | None = None, **overrides: object
) -> LedgerUnderTest:
    return await _started(ledger_settings(data_dir, redis_url, **overrides), clock or ManualClock())


async def _started(settings: Settings, clock: ManualClock) -> LedgerUnderTest:
    app = await build(settings, clock=clock)
    await app.start()
    channel = client_channel(f"127.0.0.1:{app.port}", default_timeout_seconds=10.0)
    return LedgerUnderTest(app, clock, ledger_pb2_grpc.LedgerServiceStub(channel), channel)


async def stop_ledger(ledger: LedgerUnderTest) -> None:
    await ledger.channel.close()
    await ledger.app.stop(grace=1.0)


async def restart_ledger(ledger: LedgerUnderTest) -> LedgerUnderTest:
    """The same ledger (settings, store, clock) stopped and started again, as after a crash or a
    deploy: on Cassandra it comes back to its own rows, not a fresh ledger's."""
    await stop_ledger(ledger)
    return await _started(ledger.app.settings, ledger.clock)


def store_settings(request: pytest.FixtureRequest, store: str) -> dict[str, object]:
    """Settings overrides that put a ledger on `store`: SQLite under its data dir, or a fresh
    ledger (its own rows) in the session's migrated Cassandra keyspace."""
    if store == "sqlite":
        return {"store": "sqlite"}
    return fresh_cassandra_ledger(request.getfixturevalue("cassandra_session"))


def fresh_cassandra_ledger(cassandra: CassandraSession) -> dict[str, object]:
    """Settings overrides for a new ledger in the session's keyspace; replicas of one ledger
    start with the same overrides."""
    return {
        "store": "cassandra",
        "cassandra_contact_points": cassandra.settings.cassandra_contact_points,
        "cassandra_keyspace": cassandra.settings.cassandra_keyspace,
        "cassandra_ledger": "l" + uuid.uuid4().hex[:16],
    }


def store_env(request: pytest.FixtureRequest, store: str) -> dict[str, str]:
    """store_settings as POINTMESH_* variables, for ledgers run as child processes."""
    return {f"POINTMESH_{k.upper()}": str(v) for k, v in store_settings(request, store).items()}


def ledger_process_env(data_dir: Path, redis_url: str, port: int, **extra: str) -> dict[str, str]:
    """Environment of a `pointmesh ledger serve` child: its data, Redis, port; no metrics port."""
    return {
        "POINTMESH_DATA_DIR": str(data_dir), "POINTMESH_REDIS_URL": redis_url,
        "POINTMESH_LEDGER_ADDR": f"127.0.0.1:{port}", "POINTMESH_LEDGER_METRICS_PORT": "0",
        "POINTMESH_GRACE_SECONDS": "2", "POINTMESH_INGEST_CONSUMER": "false", **extra,
    }  # fmt: skip


@pytest.fixture
async def ledger(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[LedgerUnderTest]:
    """A fresh ledger_svc (4 SQLite shards, ManualClock) serving gRPC on a free loopback port.

    tests/ledger overrides it to run each of its tests on SQLite and on Cassandra.
    """
    running = await start_ledger(tmp_path / "data", redis_server.url)
    yield running
    await stop_ledger(running)


@dataclass
class RulesUnderTest:
    app: RulesApp
    clock: ManualClock
    stub: rules_pb2_grpc.RulesServiceStub
    channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.port}"


async def start_rules(data_dir: Path, clock: ManualClock | None = None, **overrides: object) -> RulesUnderTest:
    """rules_svc on a free loopback port; no seed program unless `rules_seed_file` is given."""
    clock = clock or ManualClock()
    base: dict[str, object] = {
        "data_dir": data_dir, "rules_addr": "127.0.0.1:0", "rules_metrics_port": 0, "rules_seed_file": "",
        "grace_seconds": 2.0, "gamification_consumer": False,  # tests/gamification turn it on
    }  # fmt: skip
    base.update(overrides)
    app = await build_rules(load_settings({}, **base), clock=clock)
    await app.start()
    channel = client_channel(f"127.0.0.1:{app.port}", default_timeout_seconds=10.0)
    return RulesUnderTest(app, clock, rules_pb2_grpc.RulesServiceStub(channel), channel)


async def stop_rules(rules: RulesUnderTest) -> None:
    await rules.channel.close()
    await rules.app.stop(grace=1.0)


@pytest.fixture
async def rules(tmp_path: Path) -> AsyncIterator[RulesUnderTest]:
    """A fresh rules_svc with an empty version store and a ManualClock at 2026-01-01."""
    running = await start_rules(tmp_path / "rules-data")
    yield running
    await stop_rules(running)


def ledger_process(env: dict[str, str], log_path: Path) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """Runs `pointmesh ledger serve` and makes sure it is gone afterwards, whatever happened."""
    return pointmesh_process(["ledger", "serve"], env, log_path)


@contextlib.contextmanager
def pointmesh_process(args: list[str], env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Runs `pointmesh <args>` as a child process, stopped (or killed) when the block ends."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pointmesh.cli", *args],
            env={**os.environ, **env},
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def pointmesh_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs the real `pointmesh` CLI in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "pointmesh.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def fraud_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fraud and a churn model trained on generated data, shared by the tests that put
    fraud_svc on the accrual path (copy it before a test may reload or replace models)."""
    from fraud_svc.training import train_churn, train_fraud

    root = tmp_path_factory.mktemp("screening-models")
    train_fraud(root, rows=20_000, seed=5)
    train_churn(root, members=2_000, seed=5)
    return root
