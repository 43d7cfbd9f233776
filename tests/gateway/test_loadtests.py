"""The Locust scenarios run, bounded, against the real gateway and ledger on 127.0.0.1, and
refuse any other target."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime

from tests.conftest import REPO
from tests.gateway.conftest import GatewayUnderTest


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    # Short think time: enough actions in a few seconds that every kind of request shows up
    # (with the default 1-3 s a 6-second run of 5 users sometimes made no balance read).
    env = {**os.environ, "LOADTEST_WAIT_MIN": "0.05", "LOADTEST_WAIT_MAX": "0.2"}
    return subprocess.run([sys.executable, "-m", "loadtests.run", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env=env)  # fmt: skip


async def test_a_bounded_rest_and_grpc_run_completes_with_a_summary(gw: GatewayUnderTest) -> None:
    offset = (gw.mesh.clock.now() - datetime.now(UTC)).total_seconds()  # the mesh runs on a test clock
    done = await asyncio.to_thread(
        _run, "--target", gw.url, "--ledger", gw.mesh.ledger.address, "--pos-key", gw.keys["pos"],
        "--web-key", gw.keys["web"], "--users", "5", "--spawn-rate", "5", "--run-time", "6s", "--members", "20", "--grpc", "--receipt-time-offset", str(offset),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout + done.stderr
    for name in ("POST /v1/purchases (pos)", "GET /v1/members/{id}/balance", "grpc     GetBalance"):
        assert name in summary, summary[-3000:]
    aggregated = next(line for line in summary.splitlines() if line.strip().startswith("Aggregated"))
    requests, failures = aggregated.split()[1], aggregated.split()[2]
    assert int(requests) > 10 and failures.startswith("0("), aggregated


def test_only_loopback_targets_are_accepted() -> None:
    done = _run("--target", "http://example.com:8080", "--run-time", "1s")
    assert done.returncode != 0 and "127.0.0.1 only" in done.stderr
