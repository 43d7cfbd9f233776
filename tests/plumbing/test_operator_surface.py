"""What an operator meets at the front door, driven through the real `pointmesh` CLI: `up` says
with its exit code when a service died, stops in order when its terminal hangs up, refuses a
second `up` on its data dir; commands report a missing ledger, an unreachable store or bus, a
bad file or a bad setting in a sentence instead of a traceback or a false "OK"."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.keys import MAX_CHANNEL, KeyRequestError, KeyStore
from ledger_svc.domain import is_valid_name
from ledger_svc.store.sqlite import SqliteLedgerStore
from pointmesh.redis_server import RedisServer, free_port
from tests.conftest import REPO, pointmesh_cli, wait_for_port
from tests.ledger.test_up_and_cli import _processes_using

UP_READY = "Ctrl-C stops everything"


def _port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _wait_until(check: Callable[[], bool], what: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Up:
    """A real `pointmesh up` in its own session, on free ports, its data dir under tmp."""

    def __init__(self, data_dir: Path, log_path: Path, **extra: str) -> None:
        self.data_dir, self.log_path = data_dir, log_path
        self.ports = {name: free_port() for name in ("redis", "ledger", "rules", "fraud", "gateway")}
        self.env = {
            **os.environ,
            "POINTMESH_DATA_DIR": str(data_dir),
            "POINTMESH_REDIS_PORT": str(self.ports["redis"]),
            "POINTMESH_LEDGER_ADDR": f"127.0.0.1:{self.ports['ledger']}",
            "POINTMESH_RULES_ADDR": f"127.0.0.1:{self.ports['rules']}",
            "POINTMESH_FRAUD_ADDR": f"127.0.0.1:{self.ports['fraud']}",
            "POINTMESH_GATEWAY_ADDR": f"127.0.0.1:{self.ports['gateway']}",
            "POINTMESH_LEDGER_METRICS_PORT": "0",
            "POINTMESH_RULES_METRICS_PORT": "0",
            "POINTMESH_FRAUD_METRICS_PORT": "0",
            "POINTMESH_DEFAULT_MODEL_ROWS": "5000",
            "POINTMESH_GRACE_SECONDS": "2",
            **extra,
        }
        self.env.pop("POINTMESH_REDIS_URL", None)
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pointmesh.cli", "up"], env=self.env, cwd=REPO, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        _wait_until(lambda: UP_READY in self.log or self.process.poll() is not None, "`up` to start")
        assert self.process.poll() is None, self.log
        for name in ("redis", "ledger", "gateway"):
            wait_for_port(self.ports[name], timeout=60)

    def kill_everything(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def ups(tmp_path: Path) -> Iterator[list[Up]]:
    started: list[Up] = []
    yield started
    for up in started:
        up.kill_everything()
    for up in started:
        for pid in _processes_using(up.data_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# `pointmesh up` ---------------------------------------------------------------------------------


def test_up_exits_non_zero_when_a_service_dies_on_its_own(tmp_path: Path, ups: list[Up]) -> None:
    """The gateway cannot bind its port, exits 3, and `up` stops everything: that run failed."""
    gateway_port = free_port()
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", gateway_port))
        holder.listen()
        up = Up(tmp_path / "data", tmp_path / "up.log", POINTMESH_GATEWAY_ADDR=f"127.0.0.1:{gateway_port}")
        ups.append(up)
        code = up.process.wait(timeout=120)
    assert code == 1, up.log
    assert "gateway exited with" in up.log and "pointmesh up: stopped" in up.log
    assert _port_closed(up.ports["redis"]) and _port_closed(up.ports["ledger"])
    assert not _processes_using(up.data_dir), "children of `up` outlived it"


def test_a_hang_up_stops_everything_redis_server_included(tmp_path: Path, ups: list[Up]) -> None:
    """A closed terminal hangs up `up`'s whole process group. It used to die at once, leaving its
    redis-server (its own session) running, so the next `up` failed on the port."""
    data_dir = tmp_path / "data"
    up = Up(data_dir, tmp_path / "up.log")
    ups.append(up)
    up.wait_ready()
    os.killpg(up.process.pid, signal.SIGHUP)
    assert up.process.wait(timeout=60) == 0, up.log
    assert "pointmesh up: stopped" in up.log
    assert "ledger stopping, grace" in up.log, "the ledger died of the hang-up instead of draining"
    assert all(_port_closed(port) for port in up.ports.values()), up.log
    assert not _processes_using(data_dir), "children of `up` outlived the hang-up"


def test_a_second_up_on_the_same_data_dir_is_refused_and_the_first_keeps_its_demo_key(
    tmp_path: Path, ups: list[Up]
) -> None:
    data_dir = tmp_path / "data"
    first = Up(data_dir, tmp_path / "first.log")
    ups.append(first)
    first.wait_ready()
    demo_key = (data_dir / "gateway" / "demo-key").read_text().strip()
    second = Up(data_dir, tmp_path / "second.log")
    ups.append(second)
    assert second.process.wait(timeout=60) == 1, second.log
    assert f"another `pointmesh up` is using {data_dir} (pid {first.process.pid})" in second.log
    assert _port_closed(second.ports["redis"]) and _port_closed(second.ports["ledger"])
    assert (data_dir / "gateway" / "demo-key").read_text().strip() == demo_key
    store = KeyStore(data_dir / "gateway" / "keys.db")
    try:
        assert store.verify(demo_key) is not None, "the second `up` revoked the first one's demo key"
    finally:
        store.close()
    assert first.process.poll() is None, first.log


def test_up_reports_a_redis_port_answered_by_another_redis_server(tmp_path: Path) -> None:
    with RedisServer(free_port(), tmp_path / "other-redis") as other:
        done = pointmesh_cli("up", env={"POINTMESH_DATA_DIR": str(tmp_path / "data"),
                                        "POINTMESH_REDIS_PORT": str(other.port)}, timeout=60)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"port {other.port} is answered by another redis-server" in done.stderr
    assert "Traceback" not in done.stderr


# The ledger commands ----------------------------------------------------------------------------


def test_reconcile_refuses_a_data_dir_with_no_ledger_instead_of_creating_one(tmp_path: Path) -> None:
    data_dir = tmp_path / "typo-nonexistent"
    done = pointmesh_cli("ledger", "reconcile", env={"POINTMESH_DATA_DIR": str(data_dir)})
    assert done.returncode != 0 and "no ledger in" in done.stderr, done.stdout + done.stderr
    assert "OK" not in done.stdout and "Traceback" not in done.stderr
    assert not (data_dir / "ledger").exists()


def test_a_shard_count_mismatch_is_reported_in_a_sentence(tmp_path: Path) -> None:
    async def make_ledger() -> None:
        await SqliteLedgerStore(tmp_path / "ledger", 4).close()

    asyncio.run(make_ledger())
    done = pointmesh_cli("ledger", "reconcile", env={"POINTMESH_DATA_DIR": str(tmp_path),
                                                     "POINTMESH_LEDGER_SHARDS": "8"})  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "holds a ledger with 4 shards; POINTMESH_LEDGER_SHARDS=8" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "command",
    [
        ("ledger", "migrate"),
        ("ledger", "reconcile"),
        ("ledger", "export", "--from", "2026-01-01", "--to", "2026-02-01"),
    ],
)
def test_an_unreachable_cassandra_exits_75_with_a_message(command: tuple[str, ...], tmp_path: Path) -> None:
    env = {"POINTMESH_DATA_DIR": str(tmp_path), "POINTMESH_STORE": "cassandra",
           "POINTMESH_CASSANDRA_CONTACT_POINTS": f"127.0.0.1:{free_port()}"}  # fmt: skip
    done = pointmesh_cli(*command, env=env, timeout=120)
    assert done.returncode == 75, done.stdout + done.stderr
    assert "unavailable" in done.stderr and "run it again later" in done.stderr
    assert "Traceback" not in done.stderr


# Other commands ---------------------------------------------------------------------------------


def test_demo_with_the_gateway_down_asks_whether_up_is_running(tmp_path: Path) -> None:
    (tmp_path / "gateway").mkdir()
    (tmp_path / "gateway" / "demo-key").write_text("pmk_000000000000_x\n")
    port = free_port()
    done = pointmesh_cli(
        "demo", env={"POINTMESH_DATA_DIR": str(tmp_path), "POINTMESH_GATEWAY_ADDR": f"127.0.0.1:{port}"}
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "is `pointmesh up` running" in done.stderr and f"127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture
def unreadable_files(tmp_path: Path) -> dict[str, Path]:
    latin1 = tmp_path / "program.yaml"
    latin1.write_bytes(b"program: caf\xe9\n")
    return {"missing": tmp_path / "missing.yaml", "directory": tmp_path, "not UTF-8": latin1}


@pytest.mark.parametrize("kind", ["missing", "directory", "not UTF-8"])
@pytest.mark.parametrize("command", [("rules", "validate"), ("rules", "publish")])
def test_rules_commands_report_a_file_they_cannot_read(
    command: tuple[str, ...], kind: str, unreadable_files: dict[str, Path], tmp_path: Path
) -> None:
    path = unreadable_files[kind]
    done = pointmesh_cli(*command, str(path), env={"POINTMESH_DATA_DIR": str(tmp_path),
                                                   "POINTMESH_RULES_ADDR": f"127.0.0.1:{free_port()}"})  # fmt: skip
    assert done.returncode != 0 and str(path) in done.stderr, done.stdout + done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_ingest_produce_reports_a_file_it_cannot_read(
    kind: str, unreadable_files: dict[str, Path], tmp_path: Path
) -> None:
    path = unreadable_files[kind]
    done = pointmesh_cli("ingest", "produce", str(path), env={"POINTMESH_DATA_DIR": str(tmp_path)})
    assert done.returncode == 1 and str(path) in done.stderr, done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_events_commands_report_a_bad_setting_without_a_traceback(tmp_path: Path) -> None:
    done = pointmesh_cli("events", "topics", "create",
                         env={"POINTMESH_DATA_DIR": str(tmp_path), "POINTMESH_LEDGER_SHARDS": "0"})  # fmt: skip
    assert done.returncode != 0 and "POINTMESH_LEDGER_SHARDS" in done.stderr, done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_topics_create_fails_when_redis_is_unreachable(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    done = pointmesh_cli("events", "topics", "create", env={"POINTMESH_DATA_DIR": str(tmp_path),
                                                            "POINTMESH_REDIS_URL": url})  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ready" not in done.stdout and f"cannot reach the event bus at {url}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("model", "rows"), [("fraud", "0"), ("fraud", "-1"), ("churn", "-5"), ("churn", "10")])
def test_training_refuses_too_few_rows(model: str, rows: str, tmp_path: Path) -> None:
    out = tmp_path / "models"
    done = pointmesh_cli(model, "train", "--rows", rows, "--out", str(out), env={"POINTMESH_DATA_DIR": str(tmp_path)})
    assert done.returncode == 2 and "--rows must be at least" in done.stderr, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


# API keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--channel", ""), "channel ''"),
        (("--channel", "po s"), "channel 'po s'"),
        (("--channel", "pos", "--stores", "NOPE-99,x y"), "store ids ['x y']"),
        (("--channel", "pos", "--stores", "HEL-01,.hidden"), "store ids ['.hidden']"),
    ],
)
def test_keys_create_refuses_a_channel_or_store_the_ledger_would_refuse(
    args: tuple[str, ...], says: str, tmp_path: Path
) -> None:
    env = {"POINTMESH_DATA_DIR": str(tmp_path)}
    done = pointmesh_cli("keys", "create", *args, "--scopes", "members:read", env=env)
    assert done.returncode == 2 and says in done.stderr, done.stdout + done.stderr
    assert "pmk_" not in done.stdout
    assert pointmesh_cli("keys", "list", env=env).stdout == ""


def test_key_verification_caches_only_keys_that_exist(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    try:
        plaintext, key = store.create("pos", ["members:read"], ["HEL-01"], "till 1")
        for _ in range(500):
            assert store.verify(f"pmk_{secrets.token_urlsafe(9)}_x") is None  # not the shape of a key id
            assert store.verify(f"pmk_{secrets.token_hex(6)}_{secrets.token_urlsafe(24)}") is None  # no such key
        assert store.verify(f"pmk_{key.key_id}_wrong") is None
        assert len(store._cache) <= 1
        found = store.verify(plaintext)
        assert found is not None and found.key_id == key.key_id
        assert list(store._cache) == [key.key_id]
        store.revoke(key.key_id)
        assert store.verify(plaintext) is None
        with pytest.raises(KeyRequestError, match="not valid names"):
            store.create("pos", ["members:read"], ["bad store"], "till 2")
    finally:
        store.close()


def test_a_channel_too_long_to_name_its_keys_idempotency_namespace_is_refused(tmp_path: Path) -> None:
    """A key's idempotency keys live in "<channel>:<key id>", which the ledger takes only as a
    name of at most 64 characters: a channel leaving no room for it is refused at creation,
    not accepted and then refused on every POST."""
    store = KeyStore(tmp_path / "keys.db")
    try:
        longest = "c" * MAX_CHANNEL
        _plaintext, key = store.create(longest, ["members:write"], [], "longest channel")
        assert is_valid_name(f"{longest}:{key.key_id}")
        with pytest.raises(KeyRequestError, match=f"at most {MAX_CHANNEL}"):
            store.create(longest + "c", ["members:write"], [], "one too long")
        assert [k.channel for k in store.list()] == [longest]
    finally:
        store.close()
