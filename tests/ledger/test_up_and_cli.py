"""The `pointmesh` front door: `up` runs Redis and the ledger and stops them cleanly on Ctrl-C;
`ledger reconcile` catches a tampered balance; `ledger export` writes the period's liability.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from ledger_svc.app import open_store
from ledger_svc.domain import bucket_of
from ledger_svc.store.base import ShardTx
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.timestamps import to_timestamp as ts
from pointmesh.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc
from tests.conftest import (
    REPO,
    LedgerUnderTest,
    pointmesh_cli,
    start_ledger,
    stop_ledger,
    store_settings,
    wait_for_port,
)

LEDGER_SERVICE = "pointmesh.v1.LedgerService"
RULES_SERVICE = "pointmesh.v1.RulesService"
SHARDS = 4
# A ledger stop that hangs (outbox relay ignoring its cancellation) fails its test, not the run.
STOP_TIMEOUT_SECONDS = 20.0


def _key(name: str) -> common_pb2.IdempotencyKey:
    return common_pb2.IdempotencyKey(namespace="cli-test", key=name)


def _port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _processes_using(data_dir: Path) -> set[int]:
    """Pids of `up` and its children: their environment names this test's data dir, or (redis-server,
    which rewrites its title and environment) they run inside it."""
    marker = str(data_dir.resolve())
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker.encode() in (entry / "environ").read_bytes() or os.readlink(entry / "cwd").startswith(marker):
                found.add(int(entry.name))
    return found


def _metric_value(text: str, name: str, labels: dict[str, str]) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def _post(port: int, path: str, body: dict[str, object], headers: dict[str, str]) -> dict[str, object]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers=headers, method="POST")  # fmt: skip
    with urllib.request.urlopen(request, timeout=15) as response:
        found: dict[str, object] = json.loads(response.read())
        return found


def _until_trace(path: Path, root: str, services: set[str], timeout: float = 15) -> list[dict[str, str]]:
    """The spans of the trace whose root is `root`, once spans from every service arrived."""
    deadline = time.monotonic() + timeout
    while True:
        spans = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        roots = [s for s in spans if s["name"] == root and not s["parent_id"]]
        if roots:
            trace = [s for s in spans if s["trace_id"] == roots[0]["trace_id"]]
            if {s["service"] for s in trace} >= services:
                return trace
        assert time.monotonic() < deadline, f"no complete trace for {root}: {spans[-20:]}"
        time.sleep(0.2)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def _until_metric(port: int, name: str, labels: dict[str, str], value: float, timeout: float = 15) -> None:
    """Counters the outbox relay moves lag the call that caused them by a poll interval."""
    deadline = time.monotonic() + timeout
    while _metric_value(_scrape(port), name, labels) != value:
        assert time.monotonic() < deadline, f"{name}{labels} never reached {value}"
        time.sleep(0.1)


def test_up_serves_health_reflection_and_metrics_then_stops_everything_on_sigint(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    ledger_port, redis_port, metrics_port, rules_port, gateway_port, fraud_port = (free_port() for _ in range(6))
    rules_metrics, fraud_metrics = free_port(), free_port()
    env = {
        **os.environ,
        "POINTMESH_DATA_DIR": str(data_dir),
        "POINTMESH_REDIS_PORT": str(redis_port),
        "POINTMESH_LEDGER_ADDR": f"127.0.0.1:{ledger_port}",
        "POINTMESH_LEDGER_METRICS_PORT": str(metrics_port),
        "POINTMESH_RULES_ADDR": f"127.0.0.1:{rules_port}",
        "POINTMESH_RULES_METRICS_PORT": str(rules_metrics),
        "POINTMESH_GATEWAY_ADDR": f"127.0.0.1:{gateway_port}",
        "POINTMESH_FRAUD_ADDR": f"127.0.0.1:{fraud_port}",
        "POINTMESH_FRAUD_METRICS_PORT": str(fraud_metrics),
        "POINTMESH_DEFAULT_MODEL_ROWS": "5000",
        "POINTMESH_TRACE_FILE": str(tmp_path / "spans.jsonl"),
    }
    env.pop("POINTMESH_REDIS_URL", None)
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "pointmesh.cli", "up"],
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_port(redis_port)
        wait_for_port(ledger_port)
        wait_for_port(metrics_port)
        wait_for_port(rules_port)
        wait_for_port(gateway_port)
        wait_for_port(fraud_port, timeout=60)  # trains its default model first
        demo_key = (data_dir / "gateway" / "demo-key").read_text().strip()
        assert demo_key in log_path.read_text() and f"http://127.0.0.1:{gateway_port}/docs" in log_path.read_text()
        request = urllib.request.Request(
            f"http://127.0.0.1:{gateway_port}/v1/program", headers={"Authorization": f"Bearer {demo_key}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["program"] == "aurora"
        with grpc.insecure_channel(f"127.0.0.1:{rules_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=RULES_SERVICE), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(f"127.0.0.1:{ledger_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=LEDGER_SERVICE), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING

            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = list(
                reflection.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
                )
            )
            services = {s.name for r in replies for s in r.list_services_response.service}
            assert LEDGER_SERVICE in services

            member = ledger_pb2_grpc.LedgerServiceStub(channel).CreateMember(
                ledger_pb2.CreateMemberRequest(idempotency_key=_key("up-member")), timeout=10
            )
            assert member.member.member_id
            # The sample program is in place: a purchase earns through the ledger -> rules_svc hop.
            bought = ledger_pb2_grpc.LedgerServiceStub(channel).RecordPurchase(
                ledger_pb2.RecordPurchaseRequest(
                    member_id=member.member.member_id, channel="pos", store_id="HEL-01", receipt_id="up-1",
                    total=common_pb2.Money(amount_minor=2500, currency="EUR"),
                    lines=[ledger_pb2.PurchaseLine(sku="tent", category="outdoor", quantity=1,
                                                   amount=common_pb2.Money(amount_minor=2500, currency="EUR"))],
                    receipt_time=ts(datetime.now(UTC) - timedelta(minutes=1)),
                ),
                timeout=10,
            )  # fmt: skip
            assert bought.purchase.status == ledger_pb2.PURCHASE_STATUS_EARNED
            assert {u.unit: u.points for u in bought.purchase.earned}["tier_credits"] == 25
        # One purchase through the gateway is one trace across every hop.
        headers = {"Authorization": f"Bearer {demo_key}", "Content-Type": "application/json"}
        posted = _post(gateway_port, "/v1/purchases", {
            "member_id": member.member.member_id, "store_id": "HEL-01", "receipt_id": "up-2",
            "total": {"amount_minor": 1500, "currency": "EUR"},
            "lines": [{"sku": "socks", "category": "apparel", "quantity": 1,
                       "amount": {"amount_minor": 1500, "currency": "EUR"}}],
            "receipt_time": (datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
        }, {**headers, "Idempotency-Key": "up-trace-1"})  # fmt: skip
        assert posted["status"] == "EARNED"
        trace = _until_trace(tmp_path / "spans.jsonl", "POST /v1/purchases",
                             {"gateway", "ledger", "rules", "fraud"})  # fmt: skip
        assert {s["service"] for s in trace} >= {"gateway", "ledger", "rules", "fraud"}
        # Each hop's span carries its times, inside the request's (one clock on one machine).
        root = next(s for s in trace if not s["parent_id"])
        assert all(root["start_ns"] <= s["start_ns"] <= s["end_ns"] <= root["end_ns"] for s in trace)
        # Every service's /metrics moved by exactly what the scenario did: one member, two
        # purchases (two Evaluates, two fraud decisions, 25 + 15 tier credits), one gateway GET
        # and one gateway POST.
        created = {"service": LEDGER_SERVICE, "method": "CreateMember", "code": "OK"}
        assert _metric_value(_scrape(metrics_port), "pointmesh_rpc_requests_total", created) == 1.0
        _until_metric(metrics_port, "pointmesh_purchases_total", {"channel": "pos"}, 2.0)
        ledger_metrics = _scrape(metrics_port)
        tier_credits = {"channel": "pos", "unit": "tier_credits"}
        assert _metric_value(ledger_metrics, "pointmesh_purchase_points_total", tier_credits) == 40.0
        recorded = {"type": "purchase_recorded"}
        assert _metric_value(ledger_metrics, "pointmesh_ledger_events_published_total", recorded) == 2.0
        evaluated = {"service": RULES_SERVICE, "method": "Evaluate", "code": "OK"}
        assert _metric_value(_scrape(rules_metrics), "pointmesh_rpc_requests_total", evaluated) == 2.0
        fraud = _scrape(fraud_metrics)
        decisions = sum(_metric_value(fraud, "pointmesh_fraud_decisions_total", {"verdict": v, "call": "single"})
                        for v in ("allow", "review", "deny"))  # fmt: skip
        assert decisions == 2.0
        program_gets = {"route": "/v1/program", "method": "GET", "status": "200"}
        purchases_posted = {"route": "/v1/purchases", "method": "POST", "status": "201"}
        assert _metric_value(_scrape(gateway_port), "pointmesh_http_requests_total", purchases_posted) == 1.0
        assert _metric_value(_scrape(gateway_port), "pointmesh_http_requests_total", program_gets) == 1.0

        running = _processes_using(data_dir)
        assert up.pid in running
        assert len(running) >= 6, "expected `up`, redis-server, the ledger, rules, fraud and gateway children"

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=20) == 0, log_path.read_text()
        assert _port_closed(ledger_port)
        assert _port_closed(redis_port)
        assert _port_closed(metrics_port)
        assert _port_closed(rules_port)
        assert _port_closed(gateway_port)
        assert _port_closed(fraud_port)
        assert not _processes_using(data_dir), "children of `up` outlived it"
        assert "pointmesh up: stopped" in log_path.read_text()
    finally:
        if up.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        for pid in _processes_using(data_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def _member_with_points(ledger: LedgerUnderTest, name: str, points: list[int]) -> tuple[str, int]:
    member_id = (
        await ledger.stub.CreateMember(ledger_pb2.CreateMemberRequest(idempotency_key=_key(name)))
    ).member.member_id
    for i, p in enumerate(points):
        await ledger.stub.Earn(
            ledger_pb2.EarnRequest(idempotency_key=_key(f"{name}-earn-{i}"), member_id=member_id, points=p)
        )
    balance = (await ledger.stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=member_id))).balance
    return member_id, balance.balance_points


async def _stop(ledger: LedgerUnderTest) -> None:
    await asyncio.wait_for(stop_ledger(ledger), STOP_TIMEOUT_SECONDS)


async def _cli(*args: str, data_dir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(pointmesh_cli, *args, env={"POINTMESH_DATA_DIR": str(data_dir), **(env or {})})


@pytest.mark.parametrize("store", ["sqlite", "cassandra"])
async def test_reconcile_passes_then_names_the_account_whose_stored_balance_was_tampered(
    store: str, tmp_path: Path, redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    data_dir = tmp_path / "data"
    overrides = store_settings(request, store)
    env = {f"POINTMESH_{k.upper()}": str(v) for k, v in overrides.items()}
    ledger = await start_ledger(data_dir, redis_server.url, **overrides)
    settings = ledger.app.settings
    try:
        member_id, _ = await _member_with_points(ledger, "tamper", [30, 12])
        await _member_with_points(ledger, "bystander", [5])
    finally:
        await _stop(ledger)

    clean = await _cli("ledger", "reconcile", data_dir=data_dir, env=env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "zero differences" in clean.stdout
    assert "DIFFERENCE" not in clean.stdout

    # Behind the ledger's back: the stored balance row changes, its journal does not.
    account = f"member:{member_id}:points"

    def tamper(tx: ShardTx) -> None:
        row = tx.get_accounts([account])[0]
        assert row.balance == 42
        tx.put_account(replace(row, balance=row.balance + 1))

    opened = open_store(settings)
    try:
        await opened.write(bucket_of(member_id) % SHARDS, tamper)
    finally:
        await opened.close()

    tampered = await _cli("ledger", "reconcile", data_dir=data_dir, env=env)
    assert tampered.returncode == 1, tampered.stdout + tampered.stderr
    differences = [line for line in tampered.stdout.splitlines() if line.startswith("DIFFERENCE")]
    assert any(
        "stored balance differs from its entries" in line and account in line and "expected 42, found 43" in line
        for line in differences
    ), tampered.stdout
    assert all(member_id in line or "all shards" in line for line in differences), tampered.stdout
    assert "zero differences" not in tampered.stdout


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {row["account"]: row for row in csv.DictReader(f)}


async def test_export_closing_liability_equals_member_balances_funded_by_the_program(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    data_dir = tmp_path / "data"
    ledger = await start_ledger(data_dir, redis_server.url)
    try:
        balances = [
            (await _member_with_points(ledger, "export-a", [40, 2]))[1],
            (await _member_with_points(ledger, "export-b", [100]))[1],
            (await _member_with_points(ledger, "export-c", [7, 7, 7]))[1],
        ]
    finally:
        await _stop(ledger)
    total = sum(balances)
    assert total == 163

    # The fixture ledger's ManualClock records everything at 2026-01-01T00:00:00Z.
    out = tmp_path / "liability.csv"
    done = await _cli(
        "ledger", "export", "--from", "2025-12-01", "--to", "2026-02-01", "--out", str(out), data_dir=data_dir
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _rows(out)
    assert "earn_points" in next(iter(rows.values()))
    member, funding = rows["member:points"], rows["funding:program:points"]
    assert (int(member["opening_points"]), int(member["earn_points"]), int(member["closing_points"])) == (
        0,
        total,
        total,
    )
    assert (int(funding["opening_points"]), int(funding["earn_points"]), int(funding["closing_points"])) == (
        0,
        -total,
        -total,
    )
    assert sum(int(row["closing_points"]) for row in rows.values()) == 0
    assert f"wrote {len(rows)} rows" in done.stderr

    later = tmp_path / "later.csv"
    done = await _cli(
        "ledger", "export", "--from", "2026-01-02", "--to", "2026-02-01", "--out", str(later), data_dir=data_dir
    )
    assert done.returncode == 0, done.stdout + done.stderr
    member = _rows(later)["member:points"]
    assert (int(member["opening_points"]), int(member["earn_points"]), int(member["closing_points"])) == (
        total,
        0,
        total,
    )

    # Midnight UTC on 1 January is still 31 December in New York, already 1 January in Helsinki:
    # bare dates start the day where finance counts it (--timezone), not in UTC.
    for zone, opening, earned in (("America/New_York", total, 0), ("Europe/Helsinki", 0, total)):
        local = tmp_path / f"{zone.replace('/', '-')}.csv"
        done = await _cli("ledger", "export", "--from", "2026-01-01", "--to", "2026-02-01", "--timezone", zone,
                          "--out", str(local), data_dir=data_dir)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        member = _rows(local)["member:points"]
        assert (int(member["opening_points"]), int(member["earn_points"])) == (opening, earned), zone


@pytest.mark.parametrize(
    "command", [("ledger", "reconcile"), ("ledger", "export", "--from", "2026-01-01", "--to", "x")]
)
def test_cli_rejects_bad_input_without_a_traceback(command: tuple[str, ...], tmp_path: Path) -> None:
    done = pointmesh_cli(*command, env={"POINTMESH_DATA_DIR": str(tmp_path), "POINTMESH_LEDGER_SHARDS": "0"})
    assert done.returncode != 0
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--from", "2026-02-01", "--to", "2026-01-01"), "must be later than --from"),
        (("--from", "2026-01-01", "--to", "2026-02-01"), "no ledger in"),
    ],
)
def test_export_refuses_a_reversed_period_and_a_directory_with_no_ledger(
    args: tuple[str, ...], says: str, tmp_path: Path
) -> None:
    """Both used to write a CSV and exit 0: finance would have read "nothing outstanding"."""
    out = tmp_path / "liability.csv"
    done = pointmesh_cli("ledger", "export", *args, "--out", str(out), env={"POINTMESH_DATA_DIR": str(tmp_path)})
    assert done.returncode != 0 and says in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and not (tmp_path / "ledger").exists()


@pytest.mark.parametrize("flag", ["--concurrency", "--batch", "--purchases"])
def test_loadgen_refuses_a_count_below_one(flag: str, tmp_path: Path) -> None:
    done = pointmesh_cli("loadgen", flag, "0", env={"POINTMESH_DATA_DIR": str(tmp_path)})
    assert done.returncode == 2 and "must be at least 1" in done.stderr
