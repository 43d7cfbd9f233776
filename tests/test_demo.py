"""`pointmesh demo` tours a real ledger and leaves the books balanced."""

from __future__ import annotations

import pytest

from ledger_svc.reconcile import reconcile
from pointmesh.demo import run_demo
from tests.conftest import LedgerUnderTest


async def test_demo_tour_retries_once_and_leaves_books_balanced(
    ledger: LedgerUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    await run_demo(ledger.address)
    out = capsys.readouterr().out
    assert "same tx: True" in out
    assert "alice pools 250 to bob" in out
    report = await reconcile(ledger.app.store)
    assert report.ok, report.differences
    assert report.totals_by_account_class["member:points"] == 1200 + 300 - 400 - 300
