"""Odd input to the legacy adapters, each held back alone instead of failing more than itself: a
webhook card number no UTF-8 message can carry, a settlement file with a store id the ledger
refuses, a CSV header that repeats a column the format ignores, a byte order mark."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.legacy.csv_drop import CsvDropAdapter
from gateway.legacy.fixed_width import FixedWidthAdapter
from gateway.legacy.importer import import_records
from gateway.legacy.records import LegacyPurchase, Member, Origin, PurchaseLine, Quarantined, SourceLine
from gateway.legacy.settlement import reconcile_file
from gateway.legacy.webhook import WebhookAdapter, sign
from tests.gateway.conftest import GatewayUnderTest
from tests.gateway.test_legacy import HEADER, member_with_card, webhook_body
from tests.mesh.conftest import Mesh
from tests.mesh.helpers import points

LONE = "\ud800"  # an unpaired surrogate: JSON can spell it ("\ud800"), UTF-8 cannot carry it


async def _deliver(gw: GatewayUnderTest, body: bytes) -> Any:
    stamp = str(int(gw.mesh.clock.now().timestamp()))
    headers = {"X-Signature": sign(gw.settings.webhook_secret.encode(), body, timestamp=stamp),
               "X-Signature-Timestamp": stamp, "Content-Type": "application/json"}  # fmt: skip
    async with gw.client() as vendor:
        return await vendor.post("/v1/legacy/webhooks/acme", content=body, headers=headers)


async def test_a_webhook_value_utf8_cannot_carry_is_quarantined_by_its_path_wherever_it_is(
    gw: GatewayUnderTest,
) -> None:
    member = await member_with_card(gw.mesh, "4000-0001")
    line = {"sku": "SKU-1", "category": "misc", "quantity": 1, "amount": "12.50"}
    cases = [
        ({"card_number": f"4000-{LONE}"}, "$.card_number"),
        ({"card_number": None, "member_id": f"{member}{LONE}"}, "$.member_id"),
        ({"lines": [{**line, "sku": f"SKU-{LONE}"}]}, "$.lines[0].sku"),
        ({"receipt_id": f"W-{LONE}"}, "$.receipt_id"),
    ]
    for n, (overrides, path) in enumerate(cases):
        body = webhook_body(**{"id": f"evt-odd-{n}", "receipt_id": f"W-ODD-{n}", **overrides})
        assert b"\\ud800" in body  # json.dumps escapes it: the body itself is valid UTF-8
        response = await _deliver(gw, body)
        assert response.status_code == 422, (path, response.status_code, response.text)
        [held] = response.json()["quarantined"]
        assert (held["line"], held["field"]) == (1, path)
        assert "not valid Unicode" in held["reason"]
    assert await points(gw.mesh, member) == 0

    fine = await _deliver(gw, webhook_body(id="evt-fine", receipt_id="W-FINE"))
    assert fine.status_code == 202, fine.text
    assert await points(gw.mesh, member) == 12 + 100


async def test_a_card_number_no_lookup_can_carry_is_quarantined_and_the_import_goes_on(mesh: Mesh) -> None:
    """The importer's own net, for records built past an adapter's checks."""
    member = await member_with_card(mesh, "4000-0002")

    def receipt(card: str, receipt_id: str, line: int) -> LegacyPurchase:
        return LegacyPurchase(
            receipt_id, Member(card_number=card), "", "HEL-01", receipt_id, "EUR",
            (PurchaseLine("S", "misc", 1, 1000),), datetime(2026, 1, 2, 8, tzinfo=UTC),
            Origin("made.csv", (SourceLine(line, "raw"),)),
        )  # fmt: skip

    records = [receipt(f"4000-{LONE}", "N-1", 2), receipt("4000-0002", "N-2", 3)]
    report = await import_records(records, mesh.ledger.stub, adapter="csv", channel="pos")
    assert [(q.line, q.code, q.field) for q in report.quarantined] == [(2, "PARSE", "card_number")]
    assert "cannot be sent to the ledger" in report.quarantined[0].reason
    assert report.accepted == 1 and await points(mesh, member) == 10 + 100


async def test_a_settlement_file_with_a_store_id_the_ledger_refuses_posts_the_other_stores(
    mesh: Mesh, tmp_path: Path
) -> None:
    """As `legacy import` does: the refused store's receipts are quarantined with the ledger's
    reason, the run goes on and posts the rest."""
    aino, bruno = await member_with_card(mesh, "5000-0001"), await member_with_card(mesh, "5000-0002")
    source = tmp_path / "eod.csv"
    source.write_text(
        HEADER + "\n"
        + "P,HEL-01,S-1,1,2026-01-02T10:15:00+02:00,5000-0001,EUR,SKU-COFFEE,misc,2,12.50\n"
        + "P,HEL 02,X-1,1,2026-01-02T11:00:00+02:00,5000-0002,EUR,SKU-BREAD,misc,1,30.00\n"
        + "P,HEL 02,X-1,2,2026-01-02T11:00:00+02:00,5000-0002,EUR,SKU-JAM,misc,1,20.00\n"
        + "P,LIS-01,S-2,1,2026-01-02T12:00:00+02:00,5000-0002,EUR,SKU-TEA,misc,1,4.00\n"
    )  # fmt: skip

    report = await reconcile_file(source, "csv", mesh.ledger.address, tmp_path / "quarantine")

    assert report.posted is not None
    assert (report.receipts_in_file, report.already_posted, report.posted.accepted) == (3, 0, 2)
    assert [(q.line, q.code, q.field) for q in report.quarantined] == [
        (3, "INVALID_ARGUMENT", "store_id"), (4, "INVALID_ARGUMENT", "store_id"),
    ]  # fmt: skip
    assert all(q.reason.startswith("ledger refused (INVALID_ARGUMENT on store_id)") for q in report.quarantined)
    assert not report.resolved and report.quarantine_file is not None and report.quarantine_file.exists()
    assert await points(mesh, aino) == 12 + 100 and await points(mesh, bruno) == 4 + 100

    again = await reconcile_file(source, "csv", mesh.ledger.address, tmp_path / "quarantine")
    assert again.posted is not None
    assert (again.already_posted, again.posted.accepted, len(again.quarantined)) == (2, 0, 2)


ROW = "P,HEL-01,R-1,1,2026-01-02T10:00:00+02:00,4000-0001,EUR,SKU-1,misc,1,12.50"


@pytest.mark.parametrize(
    ("header", "row"),
    [
        (HEADER + ",,", ROW + ",,"),  # a spreadsheet's trailing empty columns
        (HEADER + ",note,note", ROW + ",first,second"),
        ("note," + HEADER + ", note ", "x," + ROW + ",y"),
    ],
)
def test_a_repeated_column_the_format_ignores_is_ignored(header: str, row: str) -> None:
    [record] = CsvDropAdapter().parse("drop.csv", f"{header}\n{row}\n".encode())
    assert isinstance(record, LegacyPurchase), record
    assert (record.receipt_id, record.total_minor) == ("R-1", 1250)


@pytest.mark.parametrize(
    ("column", "extra"), [("sku", "sku"), ("amount", "amount"), ("original_line", "original_line,original_line")]
)
def test_a_repeated_column_the_format_reads_still_refuses_the_file(column: str, extra: str) -> None:
    header, row = f"{HEADER},{extra},note,note", ROW + ",1" * (extra.count(",") + 1) + ",a,b"
    parsed = list(CsvDropAdapter().parse("drop.csv", f"{header}\n{row}\n".encode()))
    assert all(isinstance(p, Quarantined) and p.field == "header" for p in parsed)
    assert f"column(s) {column} appear more than once" in parsed[0].reason


def test_the_odd_webhook_body_is_valid_json() -> None:
    """The bodies above are what a vendor's JSON encoder sends: plain ASCII escapes."""
    assert json.loads(webhook_body(card_number=f"4000-{LONE}"))["card_number"] == f"4000-{LONE}"


BOM = b"\xef\xbb\xbf"  # what a Windows tool puts before UTF-8 text it saves


def test_a_byte_order_mark_before_a_fixed_width_export_or_a_webhook_body_is_read_past() -> None:
    """The CSV drop reads past one already; the other two formats read the same file, or the
    same body, as without it (the webhook's signature still covers the bytes as sent)."""
    export = (Path(__file__).parent / "legacy_files" / "mainframe_good.txt").read_bytes()
    assert list(FixedWidthAdapter().parse("export.txt", BOM + export)) == list(
        FixedWidthAdapter().parse("export.txt", export)
    )
    [plain] = WebhookAdapter().parse("acme", webhook_body())
    [marked] = WebhookAdapter().parse("acme", BOM + webhook_body())
    assert isinstance(marked, LegacyPurchase), marked
    assert marked == replace(plain, origin=marked.origin)
