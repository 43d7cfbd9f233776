"""`pointmesh demo` tours a real ledger and leaves the books balanced."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger_svc.reconcile import reconcile
from pointmesh.clock import ManualClock
from pointmesh.demo import run_demo
from pointmesh.redis_server import RedisServer, free_port
from tests.conftest import start_ledger, start_rules, stop_ledger, stop_rules


async def test_demo_tour_retries_once_explains_a_purchase_and_leaves_books_balanced(
    tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    clock, port = ManualClock(), free_port()
    rules = await start_rules(
        tmp_path / "rules", clock, rules_addr=f"127.0.0.1:{port}", rules_seed_file="builtin:aurora"
    )
    ledger = await start_ledger(tmp_path / "ledger", redis_server.url, clock, rules_addr=f"127.0.0.1:{port}")
    try:
        await run_demo(ledger.address, now=clock.now())
        out = capsys.readouterr().out
        report = await reconcile(ledger.app.store)
    finally:
        await stop_ledger(ledger)
        await stop_rules(rules)
    assert "same tx: True" in out
    assert "alice pools 250 to bob" in out
    assert "replayed: True" in out
    assert report.ok, report.differences
    # Earlier steps: 1200 + 300 - 400 - 300 reversed - 250 pooled to bob (who keeps his 250).
    # The purchase: 128 base + 200 welcome + 20 socks (10 a pair); returning the socks takes back
    # their 29 base and 20 socks points; the welcome bonus stays (fixed bonus, partial return).
    assert "first-store-purchase" in out and "socks-per-item" in out
    assert report.totals_by_account_class["member:points"] == 1200 + 300 - 400 - 300 + (99 + 29 + 200 + 20) - (29 + 20)
