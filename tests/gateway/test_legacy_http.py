"""Legacy feeds over HTTP and the CLI: uploads scoped to the key's stores, signed webhooks."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import httpx

from gateway.app import create_app, key_store, server
from gateway.legacy.webhook import sign
from pointmesh.redis_server import RedisServer, free_port
from tests.conftest import pointmesh_cli, stop_ledger
from tests.gateway.conftest import GatewayUnderTest, gateway_settings
from tests.gateway.test_api import enrol, problem
from tests.mesh.conftest import Mesh

FILES = Path(__file__).with_name("legacy_files")


async def card_member(gw: GatewayUnderTest, card: str) -> str:
    async with gw.client("pos") as pos:
        return await enrol(pos, card)


async def points(gw: GatewayUnderTest, member: str) -> int:
    async with gw.client("reader") as reader:
        return int((await reader.get(f"/v1/members/{member}/balance")).json()["balance_points"])


async def test_an_uploaded_drop_imports_once_and_only_for_the_keys_stores(gw: GatewayUnderTest) -> None:
    aino, bruno = await card_member(gw, "4000-0001"), await card_member(gw, "4000-0002")
    data = (FILES / "franchise_drop.csv").read_bytes()
    async with gw.client("franchise") as franchise:
        reports = []
        for _ in range(2):
            response = await franchise.post("/v1/legacy/imports", params={"adapter": "csv"},
                                            files={"file": ("franchise_drop.csv", data, "text/csv")})  # fmt: skip
            assert response.status_code == 200, response.text
            reports.append(response.json())
    first, second = reports
    assert (first["accepted"], first["duplicates"]) == (2, 1)
    assert (second["accepted"], second["duplicates"]) == (0, 3)
    assert await points(gw, aino) == 12 + 7 + 100 and await points(gw, bruno) == 30 + 100
    lines = {q["line"]: q["reason"] for q in first["quarantined"]}
    # Lisbon lines are refused for a Helsinki-only key, the broken Helsinki lines for their reasons.
    assert "not one this API key may act for" in lines[10] and "decimal amount" in lines[7]
    quarantine = (gw.settings.data_dir / "quarantine" / first["quarantine_file"]).read_text()
    assert quarantine.count("\n") == 2 * len(first["quarantined"])
    async with gw.client("pos") as pos:  # no legacy:write
        problem(await pos.post("/v1/legacy/imports", files={"file": ("x.csv", data, "text/csv")}), 403)


async def test_a_signed_webhook_earns_once_and_a_bad_signature_is_401(gw: GatewayUnderTest) -> None:
    member = await card_member(gw, "4000-0007")
    body = json.dumps({
        "type": "purchase", "id": "evt-9", "card_number": "4000-0007", "receipt_id": "W-9",
        "time": gw.mesh.clock.now().isoformat(), "currency": "EUR", "total": "20.00",
        "lines": [{"sku": "S", "category": "misc", "quantity": 1, "amount": "20.00"}],
    }).encode()  # fmt: skip
    stamp = str(int(gw.mesh.clock.now().timestamp()))
    secret = gw.settings.webhook_secret.encode()
    headers = {"X-Signature": sign(secret, body, timestamp=stamp), "X-Signature-Timestamp": stamp,
               "Content-Type": "application/json"}  # fmt: skip
    async with gw.client() as vendor:
        first = await vendor.post("/v1/legacy/webhooks/acme", content=body, headers=headers)
        again = await vendor.post("/v1/legacy/webhooks/acme", content=body, headers=headers)
        assert (first.status_code, again.status_code) == (202, 200), first.text
        assert again.headers["Idempotent-Replayed"] == "true"
        tampered = await vendor.post(
            "/v1/legacy/webhooks/acme", content=body.replace(b"20.00", b"90.00"), headers=headers
        )
        assert "signature" in problem(tampered, 401)["detail"]
    assert await points(gw, member) == 20 + 100


async def test_the_cli_imports_a_file_and_reports_quarantined_lines(gw: GatewayUnderTest, tmp_path: Path) -> None:
    await card_member(gw, "4000-0001")
    await card_member(gw, "4000-0002")
    env = {**os.environ, "POINTMESH_LEDGER_ADDR": gw.settings.ledger_addr, "POINTMESH_DATA_DIR": str(tmp_path)}
    done = await _cli(["legacy", "import", str(FILES / "franchise_drop.csv"), "--adapter", "csv"], env)
    assert done.returncode == 2, done.stderr
    assert "2 accepted" in done.stdout and "6 lines quarantined" in done.stdout
    assert "franchise_drop.csv:7:" in done.stderr
    assert (tmp_path / "quarantine" / "franchise_drop.csv.quarantine.jsonl").exists()


async def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(pointmesh_cli, *args, env=env)


async def test_an_upload_names_its_quarantine_file_without_the_servers_path(gw: GatewayUnderTest) -> None:
    async with gw.client("franchise") as franchise:
        response = await franchise.post("/v1/legacy/imports", params={"adapter": "csv"},
                                        files={"file": ("../drops/d.csv", (FILES / "franchise_drop.csv").read_bytes(),
                                                        "text/csv")})  # fmt: skip
    name = response.json()["quarantine_file"]
    assert "/" not in name and str(gw.settings.data_dir) not in response.text
    assert name.endswith(".quarantine.jsonl") and (gw.settings.data_dir / "quarantine" / name).exists()


async def test_an_import_the_ledger_stops_is_503_naming_the_service_not_its_address(gw: GatewayUnderTest) -> None:
    await stop_ledger(gw.mesh.ledger)
    drop = (FILES / "franchise_drop.csv").read_bytes()
    async with gw.client("franchise") as franchise:
        upload = await franchise.post("/v1/legacy/imports", params={"adapter": "csv"},
                                      files={"file": ("drop.csv", drop, "text/csv")})  # fmt: skip
    stamp = str(int(gw.mesh.clock.now().timestamp()))
    body = json.dumps({
        "type": "purchase", "id": "evt-1", "card_number": "4000-0001", "receipt_id": "W-1",
        "time": gw.mesh.clock.now().isoformat(), "currency": "EUR",
        "lines": [{"sku": "S", "category": "misc", "quantity": 1, "amount": "20.00"}],
    }).encode()  # fmt: skip
    headers = {"X-Signature": sign(gw.settings.webhook_secret.encode(), body, timestamp=stamp),
               "X-Signature-Timestamp": stamp, "Content-Type": "application/json"}  # fmt: skip
    async with gw.client() as vendor:
        delivery = await vendor.post("/v1/legacy/webhooks/acme", content=body, headers=headers)
    for response in (upload, delivery):
        said = problem(response, 503)
        assert response.headers["Retry-After"] == "1"
        assert said["detail"] == "the points ledger is unavailable; retry shortly"
        assert gw.mesh.ledger.address not in response.text and "UNAVAILABLE" not in response.text


async def test_an_import_stopped_by_a_failure_that_is_not_retryable_is_500_not_503(
    tmp_path: Path, mesh: Mesh, redis_server: RedisServer
) -> None:
    # rules_svc serves no LedgerService: every ledger call is UNIMPLEMENTED, which no retry cures.
    port = free_port()
    settings = replace(gateway_settings(tmp_path, mesh, redis_url=redis_server.url, port=port),
                       ledger_addr=f"127.0.0.1:{mesh.rules_port}")  # fmt: skip
    keys = key_store(settings)
    franchise_key = keys.create("pos", ["legacy:write"], ["HEL-01"], "franchise")[0]
    keys.close()
    srv = server(settings, create_app(settings, clock=mesh.clock))
    task = asyncio.create_task(srv.serve())
    try:
        for _ in range(200):
            if srv.started:
                break
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                     headers={"Authorization": f"Bearer {franchise_key}"}) as franchise:  # fmt: skip
            response = await franchise.post("/v1/legacy/imports", params={"adapter": "csv"},
                                            files={"file": ("drop.csv", (FILES / "franchise_drop.csv").read_bytes(),
                                                            "text/csv")})  # fmt: skip
        said = problem(response, 500)
        assert "Retry-After" not in response.headers
        assert said["detail"] == "the import stopped: the points ledger failed; the error is logged"
        assert "UNIMPLEMENTED" not in response.text and str(mesh.rules_port) not in response.text
    finally:
        srv.should_exit = True
        await task


async def test_an_upload_refused_by_the_gateway_names_the_query_parameter_or_the_body_field(
    gw: GatewayUnderTest,
) -> None:
    """docs/gateway.md: the gateway's own checks name `query.<name>` and `body.<path>`; an
    unknown adapter was reported on a bare `adapter`."""
    data = b"record_type,store_id\n"
    async with gw.client("franchise") as franchise:
        for adapter in ("xml", "webhook"):
            refused = problem(
                await franchise.post(
                    "/v1/legacy/imports", params={"adapter": adapter}, files={"file": ("drop.csv", data, "text/csv")}
                ),
                400,
            )
            assert [e["field"] for e in refused["errors"]] == ["query.adapter"], refused
        missing = problem(await franchise.post("/v1/legacy/imports", params={"adapter": "csv"}, data={"x": "1"}), 400)
        assert [e["field"] for e in missing["errors"]] == ["body.file"], missing
