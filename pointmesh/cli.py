"""The `pointmesh` command: the front door for running, checking and exporting the platform."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar
from urllib.parse import urlsplit

from pointmesh import cli_events, event_loop, heap
from pointmesh.cassandra_server import CassandraServer
from pointmesh.config import MIN_CHURN_TRAIN_MEMBERS, MIN_FRAUD_TRAIN_ROWS, Settings, settings_or_exit
from pointmesh.logs import configure_logging
from pointmesh.redis_server import RedisServer, ensure_redis_binary

if TYPE_CHECKING:
    from ledger_svc.store.base import LedgerStore

T = TypeVar("T")


def _settings() -> Settings:
    return settings_or_exit()


# Exit code of a command that found the ledger (or what it needs) unavailable: run it again later.
UNAVAILABLE = 75


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the Cassandra ledger does not answer now", not a bug."""
    from cassandra import OperationTimedOut
    from cassandra.cluster import NoHostAvailable

    from ledger_svc.domain import Unavailable

    return NoHostAvailable, OperationTimedOut, Unavailable


def _unavailable(label: str, settings: Settings, exc: BaseException) -> int:
    where = f" at {settings.cassandra_contact_points}" if settings.store == "cassandra" else ""
    print(f"{label}: the ledger store{where} is unavailable ({exc}); run it again later", file=sys.stderr)
    return UNAVAILABLE


def _open_store(settings: Settings) -> LedgerStore:
    """open_store, with a ledger written with another shard count reported as the message it is."""
    from ledger_svc.app import open_store
    from ledger_svc.store.cassandra import LayoutMismatch

    try:
        return open_store(settings)
    except LayoutMismatch as exc:
        raise SystemExit(f"ledger: {exc}") from None
    except RuntimeError as exc:
        if "POINTMESH_LEDGER_SHARDS" not in str(exc):
            raise
        raise SystemExit(f"ledger: {exc}") from None


def _no_ledger_guard(settings: Settings, what: str) -> None:
    """Opening the SQLite store where there is no ledger would create an empty one (a typo in
    POINTMESH_DATA_DIR would then "reconcile" or "export" nothing and say so)."""
    from ledger_svc.app import sqlite_dir
    from ledger_svc.store.sqlite import SqliteLedgerStore

    if settings.store == "sqlite" and not SqliteLedgerStore.holds_ledger(sqlite_dir(settings)):
        raise SystemExit(f"no ledger in {settings.data_dir} (POINTMESH_DATA_DIR); {what}")


def _read_text(path: str, label: str) -> str:
    """A UTF-8 file a command was given, or SystemExit with why it cannot be read."""
    try:
        with open(path, encoding="utf-8") as source:
            return source.read()
    except OSError as exc:
        raise SystemExit(f"{label}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SystemExit(f"{label}: {path} is not UTF-8 text (byte {exc.start + 1})") from None


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _date(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not an ISO date or datetime") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _zone(value: str) -> tzinfo:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not an IANA time zone such as Europe/Helsinki") from None


def _naive_or_aware(value: str) -> datetime:
    """An ISO date or datetime, left without a zone if it has none (the caller says which)."""
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not an ISO date or datetime") from exc


def cmd_serve(args: argparse.Namespace) -> int:
    """`pointmesh <service> serve`: one bootstrap for every service (logging, telemetry, run)."""
    import importlib

    from pointmesh.telemetry import setup_telemetry

    settings = _settings()
    name = args.service
    configure_logging(name, settings.log_level, settings.log_format)
    port = {"ledger": settings.ledger_metrics_port, "rules": settings.rules_metrics_port,
            "fraud": settings.fraud_metrics_port}.get(name)  # fmt: skip
    setup_telemetry(name, port)
    heap.tune_service_process()
    module = importlib.import_module({"ledger": "ledger_svc.app", "rules": "rules_svc.app", "fraud": "fraud_svc.app",
                                      "gateway": "gateway.app"}[name])  # fmt: skip
    if name == "gateway":
        module.serve(settings)  # runs its own event loop (uvicorn)
    else:
        event_loop.run(module.serve(settings), settings.event_loop)
    return 0


def cmd_ledger_reconcile(args: argparse.Namespace) -> int:
    """Exit 0: zero differences; 1: differences left for a person; 75: ledger unavailable."""
    from ledger_svc.reconcile import SAGA_GRACE, reconcile

    settings = _settings()
    _no_ledger_guard(settings, "nothing reconciled")
    settled = True
    if args.settlement:
        code = _settle(args, settings)
        if code == 75:
            return code
        settled = code == 0

    async def run() -> int:
        store = _open_store(settings)
        try:
            grace = SAGA_GRACE if args.saga_grace_seconds is None else timedelta(seconds=args.saga_grace_seconds)
            report = await reconcile(store, saga_grace=grace)
        finally:
            await store.close()
        print(f"shards: {report.shards}  accounts: {report.accounts}")
        for name, total in report.totals_by_account_class.items():
            print(f"  {name:40s} {total:>16d}")
        for diff in report.differences:
            print("DIFFERENCE", diff.describe())
        for note in report.unchecked:
            print("UNCHECKED", note)
        if not report.ok:
            print(f"reconcile: {len(report.differences)} differences")
        elif report.unchecked:
            print(f"reconcile: zero differences, {len(report.unchecked)} checks not made (UNCHECKED above)")
        else:
            print("reconcile: OK, zero differences")
        return 0 if report.ok and settled else 1

    try:
        return asyncio.run(run())
    except _unavailable_errors() as exc:
        return _unavailable("reconcile", settings, exc)


def _legacy_file(
    label: str, args: argparse.Namespace, settings: Settings, run: Callable[[Path], Coroutine[Any, Any, T]]
) -> T | int:
    """Runs a command over a legacy file; an int is the exit code of a failure it reported
    (75: the ledger is unavailable, run it again later)."""
    from gateway.legacy.importer import ImportInterrupted

    quarantine = Path(args.quarantine_dir) if args.quarantine_dir else settings.data_dir / "quarantine"
    try:
        return asyncio.run(run(quarantine))
    except ImportInterrupted as exc:
        print(f"{label}: {exc}", file=sys.stderr)
        return 75 if exc.retryable else 1
    except (OSError, ValueError) as exc:
        print(f"{label}: {exc}", file=sys.stderr)
        return 1


def _settle(args: argparse.Namespace, settings: Settings) -> int:
    """A store's settlement file against the running ledger: missing receipts are posted."""
    from gateway.legacy.settlement import reconcile_file

    report = _legacy_file(
        "settlement", args, settings,
        lambda quarantine: reconcile_file(args.settlement, args.adapter, settings.ledger_addr, quarantine, args.channel,
                                          rules_target=settings.rules_addr, program=settings.program),
    )  # fmt: skip
    if isinstance(report, int):
        return report
    for line in report.lines():
        print(line)
    return 0 if report.resolved else 1


def cmd_experiments_report(args: argparse.Namespace) -> int:
    """An experiment's results from the running rules_svc, one line per arm."""
    import grpc

    from pointmesh.clients import closing, rules_stub
    from pointmesh.v1 import rules_pb2

    settings = _settings()

    async def fetch() -> rules_pb2.GetExperimentReportResponse:
        async with closing(rules_stub(settings.rules_addr, default_timeout_seconds=10.0)) as stub:
            found: rules_pb2.GetExperimentReportResponse = await stub.GetExperimentReport(
                rules_pb2.GetExperimentReportRequest(program=args.program or settings.program, experiment_id=args.id)
            )
        return found

    try:
        found = asyncio.run(fetch())
    except grpc.RpcError as exc:
        print(f"experiments report: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    print(f"experiment {found.experiment_id} ({found.name}), alpha {found.alpha}")
    print(f"{'arm':16s} {'members':>8s} {'purch/member (95% CI)':>26s} {'repeat rate (95% CI)':>26s}"
          f" {'lift vs control (95% CI)':>28s} {'p':>8s} {'pts/extra purchase':>19s}")  # fmt: skip
    for a in found.arms:
        per = f"{a.purchases_per_member:.3f} ({a.purchases_per_member_ci.low:.3f}-{a.purchases_per_member_ci.high:.3f})"
        rate = f"{a.repeat_rate:.3f} ({a.repeat_rate_ci.low:.3f}-{a.repeat_rate_ci.high:.3f})"
        if a.control:
            lift, p, cost = "control", "", ""
        else:
            lift = f"{a.repeat_lift:+.3f} ({a.repeat_lift_ci.low:+.3f}..{a.repeat_lift_ci.high:+.3f})"
            p = f"{a.p_value_repeat:.4f}" + (" *" if a.significant else "")
            cost = f"{a.points_per_incremental_purchase:.1f}" if a.points_per_incremental_purchase else "-"
        print(f"{a.arm:16s} {a.members:8d} {per:>26s} {rate:>26s} {lift:>28s} {p:>8s} {cost:>19s}")
    return 0


def cmd_loadgen(args: argparse.Namespace) -> int:
    """Purchases through the whole accrual path, then exact per-member reconciliation."""
    from loadtests.loadgen import main as loadgen

    settings = _settings()
    return loadgen(settings.ledger_addr, settings.rules_addr, args.program or settings.program, args.purchases,
                   args.members or max(1_000, args.purchases // 4), args.seed, args.concurrency, args.batch,
                   args.unary)  # fmt: skip


def cmd_ledger_migrate(_: argparse.Namespace) -> int:
    """Creates the Cassandra keyspace if missing and applies the schema migrations it lacks."""
    from ledger_svc.store.cassandra_schema import LATEST, migrate
    from pointmesh.cassandra_client import connect

    settings = _settings()
    try:
        cluster, session = connect(settings)
        try:
            applied = migrate(session, settings.cassandra_keyspace, settings.cassandra_replication)
        finally:
            cluster.shutdown()
    except _unavailable_errors() as exc:
        print(f"migrate: Cassandra at {settings.cassandra_contact_points} is unavailable ({exc}); run it again later",
              file=sys.stderr)  # fmt: skip
        return UNAVAILABLE
    done = ", ".join(map(str, applied)) if applied else "none needed"
    print(f"migrate: keyspace {settings.cassandra_keyspace} at schema version {LATEST} (applied: {done})")
    return 0


def cmd_ledger_backfill(_: argparse.Namespace) -> int:
    """After upgrading a Cassandra ledger from a release before 2026-12-05 (docs/cassandra.md)."""
    from ledger_svc.store.cassandra import CassandraLedgerStore

    async def run() -> int:
        store = _open_store(_settings())
        try:
            if not isinstance(store, CassandraLedgerStore):
                print("backfill: nothing to do on SQLite (a shard file is upgraded when it is opened)")
                return 0
            for shard in range(store.shard_count):
                done = await asyncio.get_running_loop().run_in_executor(None, store.backfill, shard)
                print(f"backfill: shard {shard}: " + ", ".join(f"{k} {v}" for k, v in done.items()), flush=True)
            return 0
        finally:
            await store.close()

    return asyncio.run(run())


def cmd_ledger_export(args: argparse.Namespace) -> int:
    from ledger_svc.export import export_csv

    settings = _settings()
    # A bare date is midnight where finance counts the day (--timezone), not in UTC: a posting
    # at 00:30 on 1 February in Helsinki belongs to February's export there.
    start, end = (t if t.tzinfo else t.replace(tzinfo=args.timezone) for t in (args.start, args.end))
    if end <= start:
        raise SystemExit(f"--to ({end.isoformat()}) must be later than --from ({start.isoformat()})")
    # Opening the store would create an empty ledger there and report nothing outstanding.
    _no_ledger_guard(settings, "nothing exported")

    async def run(out: TextIO) -> int:
        store = _open_store(settings)
        try:
            return await export_csv(store, start, end, out)
        finally:
            await store.close()

    try:
        if args.out == "-":
            asyncio.run(run(sys.stdout))
            return 0
        try:
            out = open(args.out, "w", newline="")  # noqa: SIM115 (closed below; opened first to fail early)
        except OSError as exc:
            raise SystemExit(f"cannot write {args.out}: {exc.strerror}") from None
        with out:
            rows = asyncio.run(run(out))
    except _unavailable_errors() as exc:
        return _unavailable("export", settings, exc)
    print(f"wrote {rows} rows to {args.out}", file=sys.stderr)
    return 0


def cmd_demo(_: argparse.Namespace) -> int:
    from pointmesh.demo import run_demo

    settings = _settings()
    path = demo_key_path(settings)
    if not path.exists():
        raise SystemExit(f"demo: no demo key at {path}; start the platform with `make up` first")
    import httpx

    url = f"http://{settings.gateway_addr}"
    try:
        asyncio.run(run_demo(url, path.read_text().strip()))
    except httpx.TransportError as exc:
        print(f"demo: no answer from the gateway at {url} ({exc or type(exc).__name__}); "
              "is `pointmesh up` running at that address?", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def cmd_rules_validate(args: argparse.Namespace) -> int:
    """Checks a program file offline, printing every problem with its field path."""
    from rules_svc.program import ProgramInvalid, load_program

    text = _read_text(args.file, "rules validate")
    try:
        program = load_program(text, fmt="json" if args.file.endswith(".json") else "yaml")
    except ProgramInvalid as exc:
        for path, message in exc.errors:
            print(f"{args.file}: {path or '(document)'}: {message}", file=sys.stderr)
        return 1
    print(f"{args.file}: program {program.program} OK ({len(program.rules)} rules)")
    return 0


def cmd_rules_publish(args: argparse.Namespace) -> int:
    """Publishes a program file to the running rules_svc, effective now or at --effective-from."""
    from rules_svc.client import publish_file

    settings = _settings()
    _read_text(args.file, "rules publish")  # fails here, with the reason, before any call
    return asyncio.run(publish_file(settings.rules_addr, args.file, args.effective_from, args.key, args.by))


def cmd_train(args: argparse.Namespace) -> int:
    """`pointmesh fraud train` / `pointmesh churn train`: a versioned artifact from generated data."""
    from fraud_svc.app import models_dir
    from fraud_svc.training import train_churn, train_fraud

    least = MIN_FRAUD_TRAIN_ROWS if args.model == "fraud" else MIN_CHURN_TRAIN_MEMBERS
    if args.rows < least:
        print(f"{args.model} train: --rows must be at least {least} (got {args.rows}): fewer leave too little "
              "held-out data to evaluate the model on", file=sys.stderr)  # fmt: skip
        return 2
    if args.seed < 0:  # numpy's generator would refuse it with a traceback
        print(f"{args.model} train: --seed must be 0 or more (got {args.seed})", file=sys.stderr)
        return 2
    settings = _settings()
    out = Path(args.out) if args.out else models_dir(settings)
    try:  # now, not at the write after minutes of generating and training
        out.mkdir(parents=True, exist_ok=True)
        why = "" if os.access(out, os.W_OK | os.X_OK) else "Permission denied"
    except OSError as exc:
        why = exc.strerror or str(exc)
    if why:
        print(f"{args.model} train: cannot write models to {out}: {why}", file=sys.stderr)
        return 1
    if args.model == "fraud":
        path = train_fraud(out, rows=args.rows, seed=args.seed)
    else:
        path = train_churn(out, members=args.rows, seed=args.seed)
    metadata = (path / "metadata.json").read_text()
    import json

    print(f"{args.model} model written to {path}")
    print(json.dumps(json.loads(metadata).get("metrics", {}), indent=2))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """API keys for channels: create (printed once), list, revoke; and member tokens."""
    from redis.exceptions import RedisError

    from gateway.app import key_store
    from gateway.keys import KeyRequestError

    settings = _settings()
    store = key_store(settings)
    try:
        if args.keys_command == "create":
            plaintext, key = store.create(args.channel, _csv(args.scopes), _csv(args.stores), args.label)
            print(f"key {key.key_id} for channel {key.channel}, scopes {','.join(key.scopes)}, "
                  f"stores {','.join(key.stores) or 'any'}:\n{plaintext}")  # fmt: skip
        elif args.keys_command == "list":
            for key in store.list():
                state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
                print(f"{key.key_id}  {key.channel:12s} {','.join(key.scopes):60s} {','.join(key.stores) or '*':20s} "
                      f"{state:18s} {key.label}")  # fmt: skip
        elif args.keys_command == "revoke":
            store.revoke(args.key_id)
            print(f"revoked {args.key_id}")
        else:
            from datetime import timedelta

            from gateway.auth import MemberTokens, member_token_secret
            from pointmesh.clock import SystemClock

            tokens = MemberTokens(member_token_secret(settings), timedelta(seconds=settings.member_token_ttl_seconds),
                                  SystemClock().now)  # fmt: skip
            token, expires = tokens.issue(args.member_id)
            print(f"member token for {args.member_id}, expires {expires.isoformat()}:\n{token}")
    except KeyRequestError as exc:
        print(f"keys: {exc}", file=sys.stderr)
        return 2
    except (RedisError, OSError) as exc:  # Redis refused the connection, reset it or did not answer
        if settings.gateway_key_store != "redis":
            raise
        where = urlsplit(settings.redis_url).netloc.rpartition("@")[2]  # no password on the terminal
        print(f"keys: the API key store (Redis at {where}) is unavailable: {exc}; run it again later", file=sys.stderr)
        return UNAVAILABLE
    finally:
        store.close()
    return 0


def cmd_legacy_import(args: argparse.Namespace) -> int:
    """Exit 0: all imported; 2: some lines quarantined; 75: ledger unavailable, re-run later."""
    from gateway.legacy.importer import import_file

    settings = _settings()
    report = _legacy_file(
        "legacy import", args, settings,
        lambda quarantine: import_file(args.file, args.adapter, settings.ledger_addr, quarantine, args.channel),
    )  # fmt: skip
    if isinstance(report, int):
        return report
    print(report.summary())
    for q in report.quarantined:
        print(f"  {q.source}:{q.line}: {q.reason}", file=sys.stderr)
    return 2 if report.quarantined else 0


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


DEMO_SCOPES = (
    "members:read,members:write,purchases:write,redemptions:write,transfers:write,program:read,ops:read,legacy:write"
)


def _demo_key(settings: Settings) -> str:
    """A fresh demo key per `up` (earlier demo keys are revoked), printed for the newcomer."""
    from gateway.app import key_store

    store = key_store(settings)
    try:
        for key in store.list():
            if key.label == "demo (pointmesh up)" and key.revoked_at is None:
                store.revoke(key.key_id)
        plaintext, _ = store.create("pos", _csv(DEMO_SCOPES), [], "demo (pointmesh up)")
    finally:
        store.close()
    # `pointmesh demo` reads it from here; only this user may.
    path = demo_key_path(settings)
    path.write_text(plaintext + "\n")
    path.chmod(0o600)
    return plaintext


def demo_key_path(settings: Settings) -> Path:
    return settings.data_dir / "gateway" / "demo-key"


SERVICES: dict[str, list[str]] = {
    "ledger": ["ledger", "serve"],
    "rules": ["rules", "serve"],
    "fraud": ["fraud", "serve"],
    "gateway": ["gateway", "serve"],
}


def _local_cassandra(settings: Settings) -> CassandraServer | None:
    """`up --store cassandra`: a local node from the Maven jars (unless one runs already, which
    is then left running), migrated before the ledger starts; returns the node it started."""
    from ledger_svc.store.cassandra_schema import migrate
    from pointmesh.cassandra_client import connect, contact_points

    hosts, port = contact_points(settings.cassandra_contact_points)
    node = CassandraServer(settings.data_dir / "cassandra", port, port + 1, port + 2, address=hosts[0])
    started = not node.running()
    if started:
        print(f"pointmesh up: starting Cassandra on {node.contact_point} (tens of seconds the first time)", flush=True)
        node.start()
    cluster, session = connect(settings)
    try:
        migrate(session, settings.cassandra_keyspace, settings.cassandra_replication)
    finally:
        cluster.shutdown()
    return node if started else None


def _lock_data_dir(settings: Settings) -> int | None:
    """An exclusive lock on DATA_DIR/up.lock for as long as this `up` runs (the kernel drops it
    when the process ends, however it ends); None when another `up` holds it. Two `up`s on one
    data dir would share the Redis append-only file and the SQLite shards, and the second would
    revoke the first one's demo key."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = settings.data_dir / "up.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by the children (PEP 446)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        print(f"pointmesh up: another `pointmesh up` is using {settings.data_dir} (pid {holder})", file=sys.stderr)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def cmd_up(args: argparse.Namespace) -> int:
    """Starts a private redis-server and every service as child processes; Ctrl-C stops all.

    Exit 0 once stopped on request (Ctrl-C, SIGTERM, SIGHUP); 1 when a service exited on its own
    or the platform could not start."""
    settings = _settings()
    lock = _lock_data_dir(settings)
    if lock is None:
        return 1
    try:
        return _up(args, settings)
    finally:
        os.close(lock)


def _up(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging("up", settings.log_level, "text")
    store = getattr(args, "store", None) or settings.store
    node = None
    redis = RedisServer(settings.redis_port, settings.data_dir / "redis")
    try:
        ensure_redis_binary()
        node = _local_cassandra(settings) if store == "cassandra" else None
        redis.start()
    except (RuntimeError, TimeoutError) as exc:
        # Another redis-server answering our port, a redis-server that would not start, none installed.
        print(f"pointmesh up: {exc}", file=sys.stderr)
        if node is not None:
            node.stop()
        return 1
    env = {**os.environ, "POINTMESH_REDIS_URL": redis.url, "POINTMESH_STORE": store}
    children: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False
    failed = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    # A closed terminal hangs up `up` and its process group. The services inherit SIGHUP ignored
    # (an ignored signal stays ignored across exec) so that they are stopped here, in order and
    # drained, like on SIGTERM; redis-server runs in its own session and is stopped last.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        for name, argv in SERVICES.items():
            children[name] = subprocess.Popen([sys.executable, "-m", "pointmesh.cli", *argv], env=env)
        signal.signal(signal.SIGHUP, request_stop)
        demo_key = _demo_key(settings)
        url = f"http://{settings.gateway_addr}"
        _say(
            f"pointmesh up: redis on {redis.url}, ledger on {settings.ledger_addr}, rules on {settings.rules_addr}, "
            f"fraud on {settings.fraud_addr}\n"
            f"  gateway   {url}   (API docs: {url}/docs)\n"
            f"  demo key  {demo_key}\n"
            f"  try:      curl -H 'Authorization: Bearer {demo_key}' {url}/v1/program\n"
            "Ctrl-C stops everything"
        )
        while not stopping:
            for name, child in children.items():
                if child.poll() is not None and not stopping:
                    _say(f"pointmesh up: {name} exited with {child.returncode}; stopping", sys.stderr)
                    stopping = failed = True
            time.sleep(0.2)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children.values():
            try:
                child.wait(timeout=settings.grace_seconds + 5)
            except subprocess.TimeoutExpired:
                child.kill()
        redis.stop()
        if node is not None:
            node.stop()
    _say("pointmesh up: stopped" + (" (a service failed)" if failed else ""))
    return 1 if failed else 0


def _say(text: str, stream: TextIO | None = None) -> None:
    """Prints, surviving a terminal that is gone (after a hang-up a write fails with EIO)."""
    with contextlib.suppress(OSError):
        print(text, file=stream or sys.stdout, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pointmesh", description="pointmesh loyalty platform")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run redis and every service locally")
    up.add_argument(
        "--store",
        choices=["sqlite", "cassandra"],
        default=None,
        help="ledger store (default POINTMESH_STORE, sqlite); cassandra starts a local node first",
    )
    up.set_defaults(func=cmd_up)
    sub.add_parser("demo", help="scripted multichannel tour against a running ledger").set_defaults(func=cmd_demo)
    ledger = sub.add_parser("ledger", help="ledger service commands").add_subparsers(
        dest="ledger_command", required=True
    )
    ledger.add_parser("serve", help="run ledger_svc").set_defaults(func=cmd_serve, service="ledger")
    rec = ledger.add_parser("reconcile", help="prove the journal, balances, lots and sagas agree")
    rec.add_argument("--settlement", default="", help="a store's end-of-day receipts file to compare and post")
    rec.add_argument("--adapter", default="csv", choices=["csv", "fixed-width", "webhook"])
    rec.add_argument("--channel", default=None, help="channel for receipts that name none (default: the adapter's)")
    rec.add_argument("--quarantine-dir", default="", help="where unreadable lines go (default: DATA_DIR/quarantine)")
    rec.add_argument("--saga-grace-seconds", type=float, default=None,
                     help="report sagas open longer than this (default 60; 0 with the ledger stopped: any open"
                          " one is stuck)")  # fmt: skip
    rec.set_defaults(func=cmd_ledger_reconcile)
    ledger.add_parser("migrate", help="create or upgrade the Cassandra keyspace (POINTMESH_CASSANDRA_*)").set_defaults(
        func=cmd_ledger_migrate
    )
    ledger.add_parser(
        "backfill", help="once, after upgrading a Cassandra ledger from before 2026-12-06: tiers, listings and TTLs"
    ).set_defaults(func=cmd_ledger_backfill)
    gen = sub.add_parser("loadgen", help="purchases through the full accrual path, then exact reconciliation")
    gen.add_argument("--purchases", type=_positive, default=20_000)
    gen.add_argument("--members", type=int, default=0, help="default: a quarter of the purchases, at least 1000")
    gen.add_argument("--seed", type=int, default=1)
    gen.add_argument(
        "--concurrency", type=_positive, default=4, help="IngestBatch streams (or unary callers) at a time"
    )
    gen.add_argument("--batch", type=_positive, default=2_000, help="purchases per IngestBatch stream")
    gen.add_argument("--unary", action="store_true", help="RecordPurchase one by one instead of IngestBatch")
    gen.add_argument("--program", default="", help="default POINTMESH_PROGRAM; base rates only (loadgen models it)")
    gen.set_defaults(func=cmd_loadgen)
    experiments = sub.add_parser("experiments", help="A/B experiments").add_subparsers(
        dest="experiments_command", required=True
    )
    exp_report = experiments.add_parser("report", help="an experiment's results per arm from the running rules_svc")
    exp_report.add_argument("id")
    exp_report.add_argument("--program", default="", help="program id (default POINTMESH_PROGRAM)")
    exp_report.set_defaults(func=cmd_experiments_report)
    rules = sub.add_parser("rules", help="rules service commands").add_subparsers(dest="rules_command", required=True)
    rules.add_parser("serve", help="run rules_svc").set_defaults(func=cmd_serve, service="rules")
    validate = rules.add_parser("validate", help="check a program file offline")
    validate.add_argument("file")
    validate.set_defaults(func=cmd_rules_validate)
    publish = rules.add_parser("publish", help="publish a program file to the running rules_svc")
    publish.add_argument("file")
    publish.add_argument("--effective-from", type=_date, default=None, help="ISO datetime; default now")
    publish.add_argument("--key", default="", help="idempotency key; default: the file's SHA-256")
    publish.add_argument("--by", default=os.environ.get("USER", "cli"), help="who publishes (audit)")
    publish.set_defaults(func=cmd_rules_publish)
    for model, rows in (("fraud", 200_000), ("churn", 20_000)):
        group = sub.add_parser(model, help=f"{model} model commands").add_subparsers(
            dest=f"{model}_command", required=True
        )
        train = group.add_parser("train", help=f"train a {model} model on generated data")
        train.add_argument("--rows", type=int, default=rows, help="events (fraud) or members (churn) to generate")
        train.add_argument("--seed", type=int, default=0)
        train.add_argument("--out", default="", help="artifact root (default: the models directory)")
        train.set_defaults(func=cmd_train, model=model)
        if model == "fraud":
            group.add_parser("serve", help="run fraud_svc").set_defaults(func=cmd_serve, service="fraud")
    gateway = sub.add_parser("gateway", help="gateway commands").add_subparsers(dest="gateway_command", required=True)
    gateway.add_parser("serve", help="run the REST/websocket gateway").set_defaults(func=cmd_serve, service="gateway")
    keys = sub.add_parser("keys", help="API keys and member tokens").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create an API key (printed once)")
    create.set_defaults(func=cmd_keys)
    create.add_argument("--channel", required=True, help="the channel the key acts for, e.g. pos, web, app")
    create.add_argument("--scopes", required=True, help="comma-separated, e.g. purchases:write,members:read")
    create.add_argument("--stores", default="", help="comma-separated store ids the key may act for; empty: any")
    create.add_argument("--label", default="", help="who holds the key")
    keys.add_parser("list", help="list keys (never their secrets)").set_defaults(func=cmd_keys)
    revoke = keys.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=cmd_keys)
    token = keys.add_parser("member-token", help="issue a member token (for testing an app)")
    token.add_argument("member_id")
    token.set_defaults(func=cmd_keys)
    legacy = sub.add_parser("legacy", help="legacy feeds").add_subparsers(dest="legacy_command", required=True)
    imp = legacy.add_parser("import", help="import a legacy file into the running ledger")
    imp.add_argument("file")
    imp.add_argument("--adapter", required=True, choices=["csv", "fixed-width", "webhook"])
    imp.add_argument("--channel", default=None, help="channel for records that name none (default: the adapter's)")
    imp.add_argument("--quarantine-dir", default="", help="where bad lines go (default: DATA_DIR/quarantine)")
    imp.set_defaults(func=cmd_legacy_import)
    export = ledger.add_parser("export", help="period liability and movements as CSV")
    export.add_argument("--from", dest="start", type=_naive_or_aware, required=True,
                        help="period start (inclusive), ISO date or datetime")  # fmt: skip
    export.add_argument("--to", dest="end", type=_naive_or_aware, required=True,
                        help="period end (exclusive), ISO date or datetime")  # fmt: skip
    export.add_argument("--timezone", type=_zone, default=UTC,
                        help="where a date without an offset starts (IANA name, e.g. Europe/Helsinki); default UTC")  # fmt: skip
    export.add_argument("--out", default="-", help="file to write, or - for stdout")
    export.set_defaults(func=cmd_ledger_export)
    cli_events.add_commands(sub, _date)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
