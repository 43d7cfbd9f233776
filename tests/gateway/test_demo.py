"""`pointmesh demo` tours the real mesh through the gateway and leaves the books balanced."""

from __future__ import annotations

import pytest

from gateway.app import key_store
from ledger_svc.reconcile import reconcile
from pointmesh.cli import DEMO_SCOPES, _csv
from pointmesh.demo import run_demo
from tests.gateway.conftest import GatewayUnderTest


async def test_demo_tour_explains_streams_dedupes_a_file_and_leaves_books_balanced(
    gw: GatewayUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    store = key_store(gw.settings)
    key, _ = store.create("pos", _csv(DEMO_SCOPES), [], "demo")
    store.close()
    await run_demo(gw.url, key, now=gw.mesh.clock.now())
    out = capsys.readouterr().out
    assert "[app, live] purchase_recorded" in out
    assert "franchise POS file: 1 accepted, 1 duplicate, 1 quarantined" in out
    assert "line 4:" in out
    assert "alice pools 50 points to bob" in out
    report = await reconcile(gw.mesh.ledger.app.store, gw.mesh.ledger.clock.now())
    assert report.ok, report.differences
