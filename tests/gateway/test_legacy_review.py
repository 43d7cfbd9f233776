"""Legacy feeds against what a review found: a receipt posted without some of its lines, rows
without a store or receipt id, inputs that crashed the readers instead of being quarantined,
settlement trusting a receipt's key alone, a webhook body read whole before its size was
checked, unpadded fixed-width times, and the published webhook secret taken without a word.

Figures come from tests/mesh/program.yaml: 1 point per EUR (floored per line), and a 100-point
welcome on a member's first purchase.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.legacy import fields
from gateway.legacy.csv_drop import CsvDropAdapter
from gateway.legacy.fixed_width import FixedWidthAdapter
from gateway.legacy.importer import ADAPTERS, ImportReport, import_file, import_records
from gateway.legacy.records import LegacyPurchase, Parsed, Quarantined
from gateway.legacy.settlement import reconcile_file
from gateway.legacy.webhook import SignatureError, WebhookAdapter, sign, verify_signature
from pointmesh.redis_server import RedisServer, free_port
from tests.conftest import pointmesh_cli
from tests.gateway.conftest import GatewayUnderTest, start_gateway
from tests.gateway.test_legacy import fixed, member_with_card, rest_purchase
from tests.mesh import conftest as mesh_fixtures
from tests.mesh.conftest import Mesh
from tests.mesh.helpers import points

mesh = mesh_fixtures.mesh

HEADER = "record_type,store_id,receipt_id,line_no,receipt_time,card_number,currency,sku,category,quantity,amount\n"
T = "2026-01-02T10:00:00+02:00"


def csv_rows(*rows: str) -> list[Any]:
    return list(CsvDropAdapter().parse("drop.csv", (HEADER + "\n".join(rows) + "\n").encode()))


def receipts(parsed: list[Any]) -> list[tuple[str, int]]:
    return [(r.receipt_id, r.total_minor) for r in parsed if isinstance(r, LegacyPurchase)]


def held(parsed: list[Any] | tuple[Quarantined, ...]) -> dict[int, str]:
    return {q.line: q.reason for q in parsed if isinstance(q, Quarantined)}


async def imported(mesh: Mesh, text: str) -> ImportReport:
    parsed = CsvDropAdapter().parse("drop.csv", text.encode())
    return await import_records(parsed, mesh.ledger.stub, adapter="csv", channel="pos")


@pytest.mark.parametrize("second_id", ["R-l", "", "  "])
def test_a_line_whose_receipt_id_is_mistyped_or_empty_holds_back_the_receipt_above(second_id: str) -> None:
    parsed = csv_rows(
        f"P,HEL-01,R-1,1,{T},4000-0001,EUR,S1,misc,1,10.00",
        f"P,HEL-01,{second_id},2,{T},4000-0001,EUR,S2,misc,1,50.00",
        f"P,HEL-01,R-2,1,{T},4000-0001,EUR,S1,misc,1,5.00",
    )
    assert receipts(parsed) == [("R-2", 500)]
    reasons = held(parsed)
    assert reasons[2] == "held back with receipt HEL-01/R-1: line(s) 3 may be more of its lines; see there"
    assert "column line_no: 2 where 1 was expected (a receipt starts at line 1" in reasons[3]
    if not second_id.strip():
        assert reasons[3].startswith("column receipt_id: is empty")


def test_rows_of_a_receipt_apart_in_the_file_hold_back_every_part_of_it() -> None:
    parsed = csv_rows(
        f"P,HEL-01,R-1,1,{T},4000-0001,EUR,S1,misc,1,10.00",
        f"P,HEL-01,R-2,1,{T},4000-0002,EUR,S1,misc,1,20.00",
        f"P,HEL-01,R-1,2,{T},4000-0001,EUR,S2,misc,1,50.00",
        f"P,HEL-01,R-3,1,{T},4000-0002,EUR,S1,misc,1,30.00",
        # A whole second copy of a receipt is still a copy: the ledger decides if it is the same.
        f"P,HEL-01,R-3,1,{T},4000-0002,EUR,S1,misc,1,30.00",
    )
    assert receipts(parsed) == [("R-3", 3000), ("R-3", 3000)]
    reasons = held(parsed)
    assert reasons[2] == "held back with receipt HEL-01/R-1: line(s) 4 may be more of its lines; see there"
    assert reasons[3] == "held back with receipt HEL-01/R-2: line(s) 4 may be more of its lines; see there"
    assert reasons[4].startswith("column line_no: 2 where 1 was expected")


def test_a_spreadsheet_empty_row_inside_a_receipt_is_a_blank_line_not_the_end_of_it() -> None:
    parsed = csv_rows(
        f"P,HEL-01,R-1,1,{T},4000-0001,EUR,S1,misc,1,10.00",
        ",,,,,,,,,,",
        f"P,HEL-01,R-1,2,{T},4000-0001,EUR,S2,misc,1,50.00",
        " , ,,",
    )
    assert receipts(parsed) == [("R-1", 6000)] and not held(parsed)


async def test_a_mistyped_line_earns_nothing_and_the_corrected_receipt_earns_its_whole_total(mesh: Mesh) -> None:
    member = await member_with_card(mesh, "9100-0001")
    first = await imported(mesh, HEADER + (
        f"P,HEL-01,R-1,1,{T},9100-0001,EUR,S1,misc,1,10.00\n"
        f"P,HEL-01,R-l,2,{T},9100-0001,EUR,S2,misc,1,50.00\n"
    ))  # fmt: skip
    assert (first.accepted, [q.line for q in first.quarantined]) == (0, [2, 3])
    assert await points(mesh, member) == 0
    corrected = await imported(mesh, HEADER + (
        f"P,HEL-01,R-1,1,{T},9100-0001,EUR,S1,misc,1,10.00\n"
        f"P,HEL-01,R-1,2,{T},9100-0001,EUR,S2,misc,1,50.00\n"
    ))  # fmt: skip
    assert (corrected.accepted, corrected.quarantined) == (1, ())
    assert await points(mesh, member) == 10 + 50 + 100


async def test_a_csv_row_without_a_store_or_receipt_id_is_quarantined_naming_the_column(mesh: Mesh) -> None:
    member = await member_with_card(mesh, "9100-0002")
    report = await imported(mesh, HEADER + (
        f"P,,E-1,1,{T},9100-0002,EUR,S1,misc,1,40.00\n"
        f"P,HEL-01,,1,{T},9100-0002,EUR,S1,misc,1,40.00\n"
        f"R, ,RT-1,1,{T},9100-0002,EUR,S1,misc,1,40.00\n"
    ))  # fmt: skip
    assert report.accepted == 0
    assert [(q.line, q.field, q.reason) for q in report.quarantined] == [
        (2, "store_id", "column store_id: is empty"),
        (3, "receipt_id", "column receipt_id: is empty"),
        (4, "store_id", "column store_id: is empty"),
    ]
    # The corrected re-send is the receipt's only earn.
    fixed_store = await imported(mesh, HEADER + f"P,HEL-01,E-1,1,{T},9100-0002,EUR,S1,misc,1,40.00\n")
    assert fixed_store.accepted == 1 and await points(mesh, member) == 40 + 100


def test_a_fixed_width_purchase_record_too_long_or_not_ascii_holds_back_its_receipt() -> None:
    head = {"store_id": "HEL-01", "receipt_time": "20260102100000", "utc_offset": "+0200", "card_number": "4000-0001"}
    item = fixed("L", sku="S1", category="misc", quantity=1, amount_minor=100)
    records = [
        fixed("P", receipt_id="A", currency="EUR", line_count=1, **head) + "XYZ", item,
        fixed("P", receipt_id="Ä", currency="EUR", line_count=1, **head), item,
        fixed("P", receipt_id="C", currency="EUR", line_count=1, **head), item,
    ]  # fmt: skip
    text = "\n".join([fixed("H", producer="MF", created_at="20260105060000", batch_id="1"), *records,
                      fixed("T", record_count=len(records))])  # fmt: skip
    parsed = list(FixedWidthAdapter().parse("export.txt", text.encode()))
    assert held(parsed) == {
        2: "P record is 73 characters; more follow at 74 (line 2)",
        3: "P record is 73 characters; more follow at 74 (line 2)",
        4: "line is not ASCII (line 4)",
        5: "line is not ASCII (line 4)",
    }
    assert receipts(parsed) == [("C", 100)]


@pytest.mark.parametrize(
    ("receipt_time", "utc_offset", "field"),
    [("202612100000", "+0200", "receipt_time"), ("2026121000000", "+0200", "receipt_time"),
     ("20261210 00000", "+0200", "receipt_time"), ("20261210000000", "+020", "utc_offset"),
     ("20261210000000", "0200", "utc_offset")],
)  # fmt: skip
def test_a_fixed_width_time_or_offset_not_fully_padded_is_refused_naming_its_field(
    receipt_time: str, utc_offset: str, field: str
) -> None:
    head = {"store_id": "HEL-01", "card_number": "4000-0001", "currency": "EUR", "line_count": 1}
    records = [
        fixed("P", receipt_id="A", receipt_time=receipt_time, utc_offset=utc_offset, **head),
        fixed("L", sku="S1", category="misc", quantity=1, amount_minor=100),
    ]
    text = "\n".join([fixed("H", producer="MF", created_at="20260105060000", batch_id="1"), *records,
                      fixed("T", record_count=len(records))])  # fmt: skip
    parsed = list(FixedWidthAdapter().parse("export.txt", text.encode()))
    assert receipts(parsed) == []
    assert [(q.line, q.field) for q in parsed] == [(2, field), (3, field)]
    assert parsed[0].reason.startswith(f"column {field}: ")


def test_counts_padded_with_thousands_of_zeros_are_read_by_value_not_a_crash() -> None:
    zeros = "0" * 5000
    assert fields.positive(zeros + "7", "quantity") == 7
    with pytest.raises(fields.FieldError, match="too large"):
        fields.positive(zeros + "1" * 19, "quantity")
    header = HEADER.rstrip("\n") + ",original_receipt_id,original_line\n"
    rows = (
        f"P,HEL-01,Q-1,{zeros}1,{T},4000-0001,EUR,S,misc,{zeros}2,10.00,,\n"
        f"R,HEL-01,QR-1,1,{T},4000-0001,EUR,S,misc,1,,Q-1,{zeros}1\n"
        f"P,HEL-01,Q-2,1,{T},4000-0001,EUR,S,misc,{zeros}{'9' * 19},10.00,,\n"
    )
    parsed = list(CsvDropAdapter().parse("drop.csv", (header + rows).encode()))
    [purchase, ret, too_large] = parsed
    assert isinstance(purchase, LegacyPurchase) and purchase.lines[0].quantity == 2
    assert [(line.line_index, line.quantity) for line in ret.lines] == [(0, 1)]
    assert isinstance(too_large, Quarantined) and too_large.field == "quantity" and "too large" in too_large.reason


def test_webhook_bodies_the_json_reader_cannot_take_are_quarantined_naming_why() -> None:
    cases = [
        (b'{"type": "purchase", "n": 1' + b"0" * 5000 + b"}", "$: a number of 5001 digits"),
        (b"[" * 50_000 + b"]" * 50_000, "$: arrays or objects nested too deeply to read"),
    ]
    for body, reason in cases:
        [refused] = list(WebhookAdapter().parse("webhook", body))
        assert isinstance(refused, Quarantined) and refused.field == "$" and refused.reason.startswith(reason)
    line = {"sku": "S", "category": "misc", "quantity": [[[[1]]]], "amount": "1.00"}
    nested = json.dumps({"type": "purchase", "currency": "EUR", "lines": [line]}).encode()
    [refused] = list(WebhookAdapter().parse("webhook", nested))
    assert isinstance(refused, Quarantined) and refused.reason.endswith("got a list")


def test_a_webhook_timestamp_no_date_can_hold_is_a_signature_refusal() -> None:
    body, secret = b"{}", b"s"
    for stamp in ("999999999999", "9" * 400):
        with pytest.raises(SignatureError, match="not Unix seconds"):
            verify_signature(secret, body, sign(secret, body, timestamp=stamp), timestamp=stamp)


async def test_signed_webhooks_the_reader_cannot_take_are_refused_not_a_server_error(gw: GatewayUnderTest) -> None:
    secret, stamp = gw.settings.webhook_secret.encode(), str(int(gw.mesh.clock.now().timestamp()))
    async with gw.client() as vendor:
        for body, ts, status in [
            (b'{"type":"purchase","n":1' + b"0" * 5000 + b"}", stamp, 422),
            (b"[" * 50_000 + b"]" * 50_000, stamp, 422),
            (b"{}", "999999999999", 401),
        ]:
            headers = {"X-Signature": sign(secret, body, timestamp=ts), "X-Signature-Timestamp": ts}
            response = await vendor.post("/v1/legacy/webhooks/acme", content=body, headers=headers)
            assert response.status_code == status, response.text
            if status == 422:
                assert [q["field"] for q in response.json()["quarantined"]] == ["$"]


async def test_the_cli_reports_a_file_that_used_to_crash_the_reader(mesh: Mesh, tmp_path: Path) -> None:
    head = {"store_id": "HEL-01", "receipt_time": "20260102100000", "utc_offset": "+0200", "card_number": "4000-0001"}
    records = [fixed("P", receipt_id="A", currency="EUR", line_count=1, **head) + "  EXTRA",
               fixed("L", sku="S1", category="misc", quantity=1, amount_minor=100)]  # fmt: skip
    source = tmp_path / "export.txt"
    source.write_text("\n".join([fixed("H", producer="MF", created_at="20260105060000", batch_id="1"), *records,
                                 fixed("T", record_count=2)]) + "\n")  # fmt: skip
    env = {**os.environ, "POINTMESH_LEDGER_ADDR": mesh.ledger.address, "POINTMESH_DATA_DIR": str(tmp_path)}
    done = await asyncio.to_thread(pointmesh_cli, "legacy", "import", str(source), "--adapter", "fixed-width", env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "0 accepted" in done.stdout and "2 lines quarantined" in done.stdout
    assert "Traceback" not in done.stderr and "export.txt:2: P record is 73 characters" in done.stderr


class _FailingReader:
    """An adapter with a bug: it raises where it should have quarantined."""

    name = "failing"
    default_channel = "pos"

    def parse(self, source: str, data: bytes) -> Iterator[Parsed]:
        yield from CsvDropAdapter().parse(source, data)
        raise KeyError("line_count")


async def test_a_reader_that_fails_on_a_file_is_reported_by_file_and_nothing_is_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(ADAPTERS, "failing", _FailingReader())
    source = tmp_path / "drop.csv"
    source.write_text(HEADER + f"P,HEL-01,R-1,1,{T},4000-0001,EUR,S1,misc,1,10.00\n")
    # No ledger listens there: the file is refused before anything would be sent.
    with pytest.raises(ValueError, match=r"drop.csv: the failing reader failed \(KeyError: 'line_count'\); nothing"):
        await import_file(source, "failing", "127.0.0.1:9", tmp_path / "quarantine")
    assert not (tmp_path / "quarantine").exists()


async def test_settlement_compares_receipts_the_ledger_has_and_reports_returns(mesh: Mesh, tmp_path: Path) -> None:
    member = await member_with_card(mesh, "9100-0003")
    await mesh.ledger.stub.RecordPurchase(
        rest_purchase(member, "S-1", "SKU", 1, 1000, "EUR", datetime(2026, 1, 2, 8, tzinfo=UTC))
    )
    before = await points(mesh, member)
    source = tmp_path / "eod.csv"
    source.write_text(
        HEADER.rstrip("\n") + ",original_receipt_id,original_line\n"
        "P,HEL-01,S-1,1,2026-01-02T10:00:00+02:00,9100-0003,EUR,SKU,misc,1,99.00,,\n"
        "R,HEL-01,RT-1,1,2026-01-02T12:00:00+02:00,9100-0003,EUR,SKU,misc,1,5.00,S-1,\n"
    )
    report = await reconcile_file(source, "csv", mesh.ledger.address, tmp_path / "q")
    assert not report.resolved
    assert report.already_posted == 1 and report.compared is not None and report.compared.duplicates == 0
    [differs] = report.quarantined
    assert (differs.line, differs.code) == (2, "ALREADY_EXISTS")
    assert [(r.return_id, r.original_receipt_id, r.lines) for r in report.returns] == [("RT-1", "S-1", (3,))]
    text = "\n".join(report.lines())
    assert "DIFFERS FROM THE LEDGER" in text and "RETURN NOT SETTLED pos/HEL-01/RT-1 of pos/HEL-01/S-1" in text
    assert await points(mesh, member) == before  # nothing posted or taken back on the file's word

    # The same receipt with the ledger's own contents is settled.
    source.write_text(HEADER + "P,HEL-01,S-1,1,2026-01-02T10:00:00+02:00,9100-0003,EUR,SKU,misc,1,10.00\n")
    same = await reconcile_file(source, "csv", mesh.ledger.address, tmp_path / "q")
    assert same.resolved and same.compared is not None and same.compared.duplicates == 1


async def test_settlement_of_a_receipt_on_the_last_day_a_timestamp_holds_is_a_refusal_not_a_crash(
    mesh: Mesh, tmp_path: Path
) -> None:
    member = await member_with_card(mesh, "9100-0004")
    source = tmp_path / "eod.csv"
    source.write_text(HEADER + (
        "P,HEL-01,Z-1,1,9999-12-31T12:00:00+00:00,9100-0004,EUR,SKU,misc,1,10.00\n"
        "P,HEL-01,Z-2,1,2026-01-02T10:00:00+02:00,9100-0004,EUR,SKU,misc,1,20.00\n"
    ))  # fmt: skip
    for run in range(2):
        report = await reconcile_file(source, "csv", mesh.ledger.address, tmp_path / "q")
        assert report.posted is not None and report.already_posted == run
        assert (report.posted.accepted, report.posted.duplicates) == (1 - run, 0)
        # The ledger takes no receipt from the future; it says so for the line, and the rest settles.
        assert [(q.line, q.code, q.field) for q in report.quarantined] == [(2, "INVALID_ARGUMENT", "receipt_time")]
        assert not report.resolved
    assert await points(mesh, member) == 20 + 100


async def _raw_request(gw: GatewayUnderTest, head: bytes, body_chunks: int) -> bytes:
    """Sends a request head and up to `body_chunks` chunks of 64 KiB without ending the body,
    and returns the first line of the answer (empty if none came within 10 s)."""
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        sending = asyncio.ensure_future(_chunks(writer, body_chunks))
        try:
            return await asyncio.wait_for(reader.readline(), timeout=10)
        except TimeoutError:
            return b""
        finally:
            sending.cancel()
    finally:
        writer.close()


async def _chunks(writer: asyncio.StreamWriter, count: int) -> None:
    chunk = b"x" * 65536
    with contextlib.suppress(ConnectionError):  # the gateway may answer and close meanwhile
        for _ in range(count):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()


async def test_an_oversized_webhook_is_refused_before_it_is_read_whole(gw: GatewayUnderTest) -> None:
    start = b"POST /v1/legacy/webhooks/acme HTTP/1.1\r\nHost: gateway\r\n"
    # 200 MiB announced: refused on the announcement, before a byte of the body arrives.
    announced = await _raw_request(gw, start + b"Content-Length: 209715200\r\n\r\n", 0)
    assert announced.startswith(b"HTTP/1.1 400"), announced
    # No length announced: refused once 256 KiB have arrived, while the sender is still sending.
    streamed = await _raw_request(gw, start + b"Transfer-Encoding: chunked\r\n\r\n", 16)
    assert streamed.startswith(b"HTTP/1.1 400"), streamed
    async with gw.client() as vendor:
        response = await vendor.post("/v1/legacy/webhooks/acme", content=b"x" * (256 * 1024 + 1))
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "body"


async def test_the_gateway_warns_at_start_when_webhooks_use_the_published_secret(
    mesh: Mesh, redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.routes.legacy")
    for name, overrides, warned in [("dev", {}, True), ("set", {"webhook_secret": "a-real-secret"}, False)]:
        caplog.clear()
        running = await start_gateway(tmp_path / name, mesh, redis_server.url, **overrides)
        running.uvicorn.should_exit = True
        await running.task
        messages = [r.getMessage() for r in caplog.records if r.name == "gateway.routes.legacy"]
        assert any("POINTMESH_WEBHOOK_SECRET is not set" in m for m in messages) == warned, messages


async def test_settlement_reports_a_ledger_only_receipt_on_a_day_the_file_lacks(mesh: Mesh, tmp_path: Path) -> None:
    """A file cut short loses whole days: the store's span from its first day in the file to
    its last is compared, not only the days that still have receipts."""
    member = await member_with_card(mesh, "9100-0099")
    await mesh.ledger.stub.RecordPurchase(
        rest_purchase(member, "L-3", "SKU", 1, 1000, "EUR", datetime(2026, 1, 3, 9, tzinfo=UTC))
    )
    source = tmp_path / "month.csv"
    source.write_text(HEADER + (
        "P,HEL-01,F-2,1,2026-01-02T10:00:00+00:00,9100-0099,EUR,SKU,misc,1,10.00\n"
        "P,HEL-01,F-4,1,2026-01-04T10:00:00+00:00,9100-0099,EUR,SKU,misc,1,10.00\n"
    ))  # fmt: skip
    report = await reconcile_file(source, "csv", mesh.ledger.address, tmp_path / "q")
    assert [o.receipt_id for o in report.ledger_only] == ["L-3"] and not report.resolved


@pytest.mark.parametrize("data", [b"", b"\r\n\r\n  \n"], ids=["zero-bytes", "blank-lines"])
@pytest.mark.parametrize(("adapter", "field"), [("fixed-width", "record_count"), ("csv", "header")])
async def test_an_export_that_arrived_empty_is_held_back_not_imported_as_a_day_without_sales(
    tmp_path: Path, data: bytes, adapter: str, field: str
) -> None:
    """A transfer that delivered nothing: a mainframe night has its H and T even without sales,
    and a drop its header line. It was read as a clean import of nothing (exit 0, nothing
    quarantined), so the night's receipts never earned and nobody was told."""
    parsed = list(ADAPTERS[adapter].parse("night.txt", data))
    assert [(type(p), p.field, p.line) for p in parsed] == [(Quarantined, field, 1)]
    source = tmp_path / "night.txt"
    source.write_bytes(data)
    # No ledger listens there: nothing is sent.
    env = {**os.environ, "POINTMESH_LEDGER_ADDR": f"127.0.0.1:{free_port()}", "POINTMESH_DATA_DIR": str(tmp_path)}
    done = await asyncio.to_thread(pointmesh_cli, "legacy", "import", str(source), "--adapter", adapter, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "0 accepted" in done.stdout and "1 lines quarantined" in done.stdout
