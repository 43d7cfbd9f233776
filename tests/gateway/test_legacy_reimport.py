"""What ops do with a legacy file's refusals: the quarantined lines, with the header, import
once their cause is fixed; and a receipt id a file would strip cannot reach the ledger padded
over another transport, where it would be another natural key and earn twice."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import grpc

from gateway.legacy.importer import import_file
from tests.gateway.test_legacy import member_with_card, rest_purchase
from tests.ledger.helpers import error_field, rpc_error
from tests.mesh import conftest as mesh_fixtures
from tests.mesh.conftest import Mesh
from tests.mesh.helpers import points

mesh = mesh_fixtures.mesh

RETURN_HEADER = (
    "record_type,store_id,receipt_id,line_no,receipt_time,card_number,currency,sku,category,quantity,amount,"
    "original_channel,original_store_id,original_receipt_id,original_line"
)


async def test_a_return_slip_line_the_ledger_refused_can_be_reimported_from_its_quarantine_entry(
    mesh: Mesh, tmp_path: Path
) -> None:
    """RT-1 returns a shirt of R-A (slip line 1) and a hat of R-B (slip line 2). R-B is not in the
    ledger yet, so that return is refused (NOT_FOUND) and the slip quarantined. Once R-B is in,
    the quarantined raw lines with the header import (docs/legacy.md, "To fix"): R-A's return
    replays, R-B's posts (before, only line 2 was kept, and alone it was refused for its line_no)."""
    member = await member_with_card(mesh, "8800-0001")
    await mesh.ledger.stub.RecordPurchase(
        rest_purchase(member, "R-A", "SKU-SHIRT", 1, 3000, "EUR", datetime(2026, 1, 2, 8, tzinfo=UTC))
    )
    drop = tmp_path / "returns.csv"
    drop.write_text(RETURN_HEADER + "\n"
                    "R,HEL-01,RT-1,1,2026-01-03T10:00:00+02:00,8800-0001,EUR,SKU-SHIRT,misc,1,30.00,,,R-A,1\n"
                    "R,HEL-01,RT-1,2,2026-01-03T10:00:00+02:00,8800-0001,EUR,SKU-HAT,misc,1,20.00,,,R-B,1\n")  # fmt: skip
    first = await import_file(drop, "csv", mesh.ledger.address, tmp_path / "q")
    assert first.accepted == 1
    assert [(q.line, q.code) for q in first.quarantined] == [(2, "NOT_FOUND"), (3, "NOT_FOUND")]

    await mesh.ledger.stub.RecordPurchase(
        rest_purchase(member, "R-B", "SKU-HAT", 1, 2000, "EUR", datetime(2026, 1, 2, 9, tzinfo=UTC))
    )
    before = await points(mesh, member)
    assert first.quarantine_file is not None
    entries = [json.loads(line) for line in first.quarantine_file.read_text().splitlines()]
    fix = tmp_path / "returns-fix.csv"
    fix.write_text(RETURN_HEADER + "\n" + "".join(e["raw"] + "\n" for e in entries))

    again = await import_file(fix, "csv", mesh.ledger.address, tmp_path / "q")

    assert (again.accepted, again.duplicates, again.quarantined) == (1, 1, ()), [q.reason for q in again.quarantined]
    assert await points(mesh, member) == before - 20


async def test_a_receipt_id_with_blanks_around_it_is_refused_rather_than_kept_apart_from_its_files_copy(
    mesh: Mesh,
) -> None:
    """Files and webhooks strip their ids, so " W-77" over REST and "W-77" in the vendor's feed
    would be one receipt under two natural keys, earning twice; the padded id is refused."""
    member = await member_with_card(mesh, "8800-0002")
    at = datetime(2026, 1, 2, 8, tzinfo=UTC)
    for padded in (" W-77", "W-77 ", "W-77\t"):
        request = rest_purchase(member, padded, "SKU-1", 1, 1250, "EUR", at, channel="web", store="")
        error = await rpc_error(mesh.ledger.stub.RecordPurchase(request), grpc.StatusCode.INVALID_ARGUMENT)
        assert error_field(error) == "receipt_id"
    assert await points(mesh, member) == 0
