"""POST /v1/purchases through the whole mesh, at fixed open-loop arrival rates; figures only.

`pointmesh up` runs every service in its own process on loopback (gateway -> ledger_svc ->
rules_svc and fraud_svc). This process sends purchases at a fixed rate whatever the answers do
(open loop), with a lean HTTP client (benchmarks/harness.py: httpx saturated the client first),
and measures each latency from the moment the request was due, so a queue building up in any
service shows in p99 instead of hiding in think time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, LeanHttp, wait_port
from pointmesh.redis_server import free_port


def body(member_id: str, n: int, at: datetime) -> dict[str, Any]:
    rnd = random.Random(n)
    lines = [{"sku": f"s{j}", "category": rnd.choice(["outdoor", "socks", "misc"]), "quantity": 1,
              "amount": {"amount_minor": rnd.randint(199, 9999), "currency": "EUR"}} for j in range(5)]  # fmt: skip
    total = sum(ln["amount"]["amount_minor"] for ln in lines)  # type: ignore[index]
    return {"member_id": member_id, "store_id": "HEL-01", "receipt_id": f"bench-{n}",
            "total": {"amount_minor": total, "currency": "EUR"}, "lines": lines, "receipt_time": at.isoformat()}  # fmt: skip


async def open_loop(http: LeanHttp, members: list[str], rate: float, seconds: float, offset: int) -> None:
    count = int(rate * seconds)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    # Receipt times a minute behind the arrivals and as far apart, as tills stamp them (one time
    # for every receipt made each velocity key a pile: docs/fraud.md).
    at = datetime.now(UTC) - timedelta(minutes=1)
    bodies = [json.dumps(body(members[n % len(members)], offset + n, at + timedelta(seconds=n / rate))).encode()
              for n in range(count)]  # fmt: skip

    async def one(n: int, due: float) -> None:
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            status, _ = await http.post("/v1/purchases", bodies[n], {"Idempotency-Key": f"bench-{offset + n}"})
            statuses[status] = statuses.get(status, 0) + 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError) as exc:
            statuses[-1] = statuses.get(-1, 0) + 1
            print("  error:", type(exc).__name__)
        latencies.append(time.perf_counter() - due)

    start = time.perf_counter() + 0.2
    t0 = time.perf_counter()
    await asyncio.gather(*(one(n, start + n / rate) for n in range(count)))
    elapsed = time.perf_counter() - t0
    lat = sorted(latencies)
    p50, p99 = statistics.median(lat) * 1000, lat[int(len(lat) * 0.99) - 1] * 1000
    print(f"offered {rate:6.0f}/s for {seconds:.0f}s: completed {count / elapsed:6.0f}/s   p50 {p50:7.1f} ms   "
          f"p99 {p99:7.1f} ms   statuses {dict(sorted(statuses.items()))}")  # fmt: skip


async def run(port: int, key: str, rates: list[float], seconds: float, members: int) -> None:
    http = LeanHttp("127.0.0.1", port, {"Authorization": f"Bearer {key}"})
    try:
        ids = []
        for i in range(members):
            status, payload = await http.post("/v1/members", b"{}", {"Idempotency-Key": f"bench-member-{i}"})
            if status != 201:
                raise SystemExit(f"creating a member answered {status}: {payload[:200]!r}")
            ids.append(json.loads(payload)["member_id"])
        offset = 0
        for rate in rates:
            await open_loop(http, ids, rate, seconds, offset)
            offset += int(rate * seconds)
    finally:
        await http.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", default="50,100,200", help="comma-separated arrival rates per second")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--members", type=int, default=500)
    args = parser.parse_args()
    print(f"gateway benchmark: {os.cpu_count()} cores; path: client -> gateway -> ledger_svc -> rules_svc, fraud_svc")
    with tempfile.TemporaryDirectory() as tmp:
        gateway = free_port()
        env = {
            **os.environ, "POINTMESH_DATA_DIR": tmp, "POINTMESH_REDIS_PORT": str(free_port()),
            "POINTMESH_LEDGER_ADDR": f"127.0.0.1:{free_port()}", "POINTMESH_LEDGER_METRICS_PORT": "0",
            "POINTMESH_RULES_ADDR": f"127.0.0.1:{free_port()}", "POINTMESH_RULES_METRICS_PORT": "0",
            "POINTMESH_GATEWAY_ADDR": f"127.0.0.1:{gateway}", "POINTMESH_LOG_LEVEL": "WARNING",
        "POINTMESH_FRAUD_ADDR": f"127.0.0.1:{free_port()}", "POINTMESH_FRAUD_METRICS_PORT": "0",
        "POINTMESH_DEFAULT_MODEL_ROWS": "5000",
        }  # fmt: skip
        env.pop("POINTMESH_REDIS_URL", None)
        up = subprocess.Popen([sys.executable, "-m", "pointmesh.cli", "up"], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            wait_port(gateway, timeout=60)
            key_file = Path(tmp) / "gateway" / "demo-key"
            while not key_file.exists():
                time.sleep(0.1)
            rates = [float(r) for r in args.rates.split(",")]
            asyncio.run(run(gateway, key_file.read_text().strip(), rates, args.seconds, args.members))
        finally:
            up.send_signal(signal.SIGINT)
            up.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
