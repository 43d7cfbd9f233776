"""Legacy adapters against the real mesh: files and webhooks earn exactly what REST would, once.

The sample files live in tests/gateway/legacy_files/; every figure below is computed from
tests/mesh/program.yaml (1 point per EUR, 1 per 150 JPY, a 100-point welcome on the first
purchase, which stays on partial returns). Receipts are dated Friday 2026-01-02, before the
mesh clock (Monday 2026-01-05 08:00Z) and outside every weekend or happy-hour rule.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.legacy import fields
from gateway.legacy.csv_drop import CsvDropAdapter
from gateway.legacy.fixed_width import LAYOUTS, FixedWidthAdapter
from gateway.legacy.importer import ImportInterrupted, import_file, import_records
from gateway.legacy.records import LegacyPurchase, LegacyReturn, Origin, Quarantined, SourceLine
from gateway.legacy.records import Member as LegacyMember
from gateway.legacy.records import PurchaseLine as LegacyLine
from gateway.legacy.webhook import SignatureError, WebhookAdapter, sign, verify_signature
from pointmesh.clients import closing, ledger_stub
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import common_pb2, ledger_pb2
from tests.conftest import start_ledger, stop_ledger
from tests.ledger.helpers import create_member, redeem, rpc_error, ts
from tests.mesh import conftest as mesh_fixtures
from tests.mesh.conftest import Mesh
from tests.mesh.helpers import points

mesh = mesh_fixtures.mesh  # the mesh fixture, reused outside tests/mesh

FILES = Path(__file__).with_name("legacy_files")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "legacy.md"
SECRET = b"vendor-shared-secret"


async def member_with_card(mesh: Mesh, card: str) -> str:
    ids = [common_pb2.ExternalId(kind="card", value=card)]
    return (await create_member(mesh.ledger.stub, external_ids=ids)).member_id


def parse_file(adapter: CsvDropAdapter | FixedWidthAdapter, name: str) -> list[Any]:
    return list(adapter.parse(name, (FILES / name).read_bytes()))


def money(minor: int, currency: str = "EUR") -> common_pb2.Money:
    return common_pb2.Money(amount_minor=minor, currency=currency)


def rest_purchase(
    member_id: str, receipt: str, sku: str, quantity: int, minor: int, currency: str, at: datetime, **kw: str
) -> ledger_pb2.RecordPurchaseRequest:
    """What the REST gateway would send for a one-line receipt."""
    return ledger_pb2.RecordPurchaseRequest(
        member_id=member_id, channel=kw.get("channel", "pos"), store_id=kw.get("store", "HEL-01"), receipt_id=receipt,
        total=money(minor, currency), receipt_time=ts(at),
        lines=[ledger_pb2.PurchaseLine(sku=sku, category="misc", quantity=quantity, amount=money(minor, currency))],
    )  # fmt: skip


def lines_of(quarantined: tuple[Quarantined, ...]) -> list[tuple[int, str, str]]:
    return [(q.line, q.code, q.field) for q in quarantined]


async def test_a_csv_drop_imported_twice_earns_once_and_quarantines_the_same_lines(mesh: Mesh, tmp_path: Path) -> None:
    aino, bruno = await member_with_card(mesh, "4000-0001"), await member_with_card(mesh, "4000-0002")
    source = FILES / "franchise_drop.csv"
    first = await import_file(source, "csv", mesh.ledger.address, tmp_path / "quarantine")
    second = await import_file(source, "csv", mesh.ledger.address, tmp_path / "quarantine")

    # R-1001 twice in the file, R-1002 once: two receipts earn, the resent copy is a duplicate.
    assert (first.accepted, first.duplicates) == (2, 1)
    assert (second.accepted, second.duplicates) == (0, 3)
    assert await points(mesh, aino) == 12 + 7 + 100  # points are floored per line
    assert await points(mesh, bruno) == 30 + 100
    expected = [
        (7, "PARSE", "amount"), (8, "PARSE", "currency"), (9, "PARSE", ""), (10, "NOT_FOUND", "card_number"),
        (11, "PARSE", ""), (12, "PARSE", "amount"),
    ]  # fmt: skip
    assert lines_of(first.quarantined) == lines_of(second.quarantined) == expected
    reasons = {q.line: q.reason for q in first.quarantined}
    assert reasons[7] == "column amount: '12.5O' is not a decimal amount like 12.50 (digits, one '.', no sign)"
    assert "'XEU' is not an ISO 4217 currency code" in reasons[8]
    assert reasons[9] == "row has 10 fields, header has 11: column(s) amount missing"
    assert reasons[10].startswith("card_number '4000-9999': ledger refused (NOT_FOUND on external_id)")
    assert reasons[11] == "held back with receipt LIS-01/R-2003: see line(s) 12"
    assert reasons[12] == "column amount: '10.005' has 3 decimals but EUR has 2 decimals"

    # Ops get every quarantined line verbatim, once per run, to fix and re-send.
    assert (
        first.quarantine_file == second.quarantine_file == tmp_path / "quarantine/franchise_drop.csv.quarantine.jsonl"
    )
    entries = [json.loads(line) for line in first.quarantine_file.read_text().splitlines()]
    assert [e["line"] for e in entries] == [line for line, _, _ in expected] * 2
    source_lines = source.read_text().splitlines()
    assert all(e["raw"] == source_lines[e["line"] - 1] and e["file"] == str(source) for e in entries)
    assert {e["adapter"] for e in entries} == {"csv"}


async def test_a_receipt_sent_over_rest_and_in_a_file_earns_once_with_exact_amounts(mesh: Mesh) -> None:
    member = await member_with_card(mesh, "4000-0003")
    at = datetime(2026, 1, 2, 9, 0, tzinfo=UTC) - timedelta(hours=2)  # 09:00 in Helsinki
    over_rest = await mesh.ledger.stub.RecordPurchase(
        rest_purchase(member, "E-1", "SKU-PEN", 3, 450, "EUR", at + timedelta(minutes=10))
    )
    assert not over_rest.replayed
    report = await import_records(
        parse_file(CsvDropAdapter(), "exact_amounts.csv"), mesh.ledger.stub, adapter="csv", channel="pos"
    )
    assert (report.accepted, report.duplicates) == (2, 1)  # J-1 and K-1 new; E-1 came over REST first
    assert [(q.line, q.reason) for q in report.quarantined] == [
        (5, "column amount: '1000.5' has 1 decimal but JPY has no decimals"),
        (6, "column amount: '1.2500' has 4 decimals but KWD has 3 decimals"),
    ]
    # 4.50 EUR with the welcome (it came first), 1000 JPY, and 1.250 KWD = 3.76 EUR at 0.332 KWD per EUR.
    earned = await points(mesh, member)
    assert earned == 4 + 100 + 1000 // 150 + 3

    # The file's receipts are exactly what REST would send: the same bodies replay...
    jpy = await mesh.ledger.stub.RecordPurchase(rest_purchase(member, "J-1", "SKU-RAMEN", 1, 1000, "JPY", at))
    kwd = await mesh.ledger.stub.RecordPurchase(
        rest_purchase(member, "K-1", "SKU-DATES", 1, 1250, "KWD", at + timedelta(minutes=5))
    )
    assert jpy.replayed and kwd.replayed
    assert (jpy.purchase.total.amount_minor, kwd.purchase.total.amount_minor) == (1000, 1250)
    # ... and any other amount for the same receipt is refused, never earned twice.
    await rpc_error(
        mesh.ledger.stub.RecordPurchase(rest_purchase(member, "J-1", "SKU-RAMEN", 1, 100000, "JPY", at)),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert await points(mesh, member) == earned


async def paid_partly_at_the_till(mesh: Mesh, card: str, first: str, second: str) -> str:
    """A member with `card` who bought a pen (receipt `first`, 2026-01-02 10:00 Helsinki), then two
    coffees (`second`, 15 minutes later) paid partly with 60 points the till redeemed and named
    as the receipt's tender; the member's id."""
    member = await member_with_card(mesh, card)
    at = datetime(2026, 1, 2, 8, 0, tzinfo=UTC)
    await mesh.ledger.stub.RecordPurchase(rest_purchase(member, first, "SKU-PEN", 1, 500, "EUR", at))
    paid = (await redeem(mesh.ledger.stub, member, 60)).transaction.transaction_id
    till = rest_purchase(member, second, "SKU-COFFEE", 2, 1250, "EUR", at + timedelta(minutes=15))
    till.tender_transaction_id = paid
    await mesh.ledger.stub.RecordPurchase(till)
    return member


async def test_a_file_listing_a_receipt_the_till_paid_partly_with_points_imports_it_as_a_duplicate(
    mesh: Mesh,
) -> None:
    """The till named its redemption as the receipt's tender; the file has no tender column.
    Its copy was quarantined as another body (ALREADY_EXISTS)."""
    member = await paid_partly_at_the_till(mesh, "4000-0009", "T-0", "T-1")
    before = await points(mesh, member)

    report = await import_records(
        csv_of("P,HEL-01,T-1,1,2026-01-02T10:15:00+02:00,4000-0009,EUR,SKU-COFFEE,misc,2,12.50"),
        mesh.ledger.stub, adapter="csv", channel="pos",
    )  # fmt: skip

    assert (report.accepted, report.duplicates, report.quarantined) == (0, 1, ()), report.quarantined
    assert await points(mesh, member) == before


async def test_a_fixed_width_file_with_a_wrong_trailer_count_imports_nothing(mesh: Mesh) -> None:
    aino, bruno = await member_with_card(mesh, "4000-0001"), await member_with_card(mesh, "4000-0002")
    adapter = FixedWidthAdapter()
    held = await import_records(
        parse_file(adapter, "mainframe_bad_trailer.txt"), mesh.ledger.stub, adapter="fixed-width", channel="pos"
    )
    assert (held.accepted, held.duplicates) == (0, 0)
    assert [q.line for q in held.quarantined] == list(range(1, 9))  # every line, header to trailer
    assert held.quarantined[-1].reason == "trailer record_count is 7 but the file has 6 records between H and T"
    assert held.quarantined[0].reason.startswith("file held back: trailer record_count is 7")
    assert (await points(mesh, aino), await points(mesh, bruno)) == (0, 0)

    good = await import_records(
        parse_file(adapter, "mainframe_good.txt"), mesh.ledger.stub, adapter="fixed-width", channel="pos"
    )
    assert (good.accepted, good.duplicates, good.quarantined) == (3, 0, ())
    # 20.00 EUR + welcome, then a 10.00 refund takes back half the base points (the welcome stays).
    assert await points(mesh, aino) == 20 + 100 - 10
    assert await points(mesh, bruno) == 3000 // 150 + 100


async def test_returns_in_a_csv_reverse_points_once(mesh: Mesh) -> None:
    aino = await member_with_card(mesh, "4000-0001")
    bought_online = rest_purchase(
        aino, "WEB-77", "SKU-BOOK", 2, 9000, "EUR", datetime(2026, 1, 2, 8, 0, tzinfo=UTC), channel="web", store=""
    )
    await mesh.ledger.stub.RecordPurchase(bought_online)
    records = parse_file(CsvDropAdapter(), "franchise_returns.csv")
    assert [type(r) for r in records] == [LegacyPurchase] * 2 + [LegacyReturn] * 5

    first = await import_records(records, mesh.ledger.stub, adapter="csv", channel="pos")
    assert (first.accepted, first.duplicates) == (5, 0)
    assert lines_of(first.quarantined) == [
        (7, "NOT_FOUND", "purchase_id"),
        (8, "FAILED_PRECONDITION", "lines[0].quantity"),
    ]
    assert "returns 2 of line 1, but 1 were bought" in first.quarantined[1].reason
    # Earned 100 welcome + 90 + 40 + 50; returned a third of line 1 of R-3001 (10), half of
    # R-3002 by amount (25) and one of the two books bought online (45).
    assert await points(mesh, aino) == 100 + 90 + 40 + 50 - 10 - 25 - 45

    again = await import_records(records, mesh.ledger.stub, adapter="csv", channel="pos")
    assert await points(mesh, aino) == 200
    assert lines_of(again.quarantined) == lines_of(first.quarantined)
    # Purchases and returns alike are reported as duplicates: nothing moved twice.
    assert (again.accepted, again.duplicates) == (0, 5)


def webhook_body(**overrides: Any) -> bytes:
    payload: dict[str, Any] = {
        "type": "purchase", "id": "evt-1", "card_number": "4000-0001", "receipt_id": "W-1001",
        "time": "2026-01-02T10:00:00+02:00", "currency": "EUR", "total": "12.50",
        "lines": [{"sku": "SKU-1", "category": "misc", "quantity": 1, "amount": "12.50"}],
    }  # fmt: skip
    payload.update(overrides)
    return json.dumps(payload).encode()


def test_webhook_signatures_accept_the_vendor_and_refuse_everything_else() -> None:
    body, now = webhook_body(), datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
    stamp = str(int(now.timestamp()))
    header = sign(SECRET, body, timestamp=stamp)
    verify_signature(SECRET, body, header, timestamp=stamp, now=now + timedelta(minutes=4))
    # A vendor rotating its secret sends two signatures; hex digits may come in upper case.
    rotating = f"sha256={'0' * 64}, sha256={header.removeprefix('sha256=').upper()}"
    verify_signature(SECRET, body, rotating, timestamp=stamp, now=now)
    verify_signature(SECRET, body, sign(SECRET, body), tolerance=None)  # a vendor without timestamps

    refusals: dict[str, list[Callable[[], None]]] = {
        "does not match": [
            lambda: verify_signature(SECRET, body.replace(b"12.50", b"99.50"), header, timestamp=stamp, now=now),
            lambda: verify_signature(b"another secret", body, header, timestamp=stamp, now=now),
            # A fresh timestamp on an old signature: the timestamp is signed too.
            lambda: verify_signature(SECRET, body, header, timestamp=str(int(stamp) + 600), now=now),
        ],
        "s old": [lambda: verify_signature(SECRET, body, header, timestamp=stamp, now=now + timedelta(minutes=6))],
        "in the future": [
            lambda: verify_signature(SECRET, body, header, timestamp=stamp, now=now - timedelta(minutes=6))
        ],
        "header is missing": [
            lambda: verify_signature(SECRET, body, None, timestamp=stamp, now=now),
            lambda: verify_signature(SECRET, body, header, timestamp=None, now=now),
        ],
        "no sha256=": [lambda: verify_signature(SECRET, body, "md5=abc", timestamp=stamp, now=now)],
        "not Unix seconds": [lambda: verify_signature(SECRET, body, header, timestamp="yesterday", now=now)],
        "no webhook secret": [lambda: verify_signature(b"", body, header, timestamp=stamp, now=now)],
    }
    for needle, calls in refusals.items():
        for call in calls:
            with pytest.raises(SignatureError, match=needle):
                call()


async def test_webhook_deliveries_earn_once_and_bad_payloads_are_quarantined(mesh: Mesh) -> None:
    aino = await member_with_card(mesh, "4000-0001")
    adapter = WebhookAdapter()
    purchase = webhook_body(channel="web", member_id=aino, card_number=None)
    ret = json.dumps(
        {
            "type": "return", "id": "evt-2", "card_number": "4000-0001", "return_id": "WR-1", "channel": "pos",
            "store_id": "HEL-01", "time": "2026-01-03T10:00:00+02:00", "currency": "EUR",
            "original": {"channel": "web", "receipt_id": "W-1001"}, "refund": "6.25",
        }
    ).encode()  # fmt: skip
    bad = webhook_body(
        id="evt-3", receipt_id="W-1002", lines=[{"sku": "S", "category": "misc", "quantity": 1, "amount": 12.5}]
    )

    async def deliver(body: bytes) -> Any:
        return await import_records(adapter.parse("webhook", body), mesh.ledger.stub, adapter="webhook", channel="web")

    first, again = await deliver(purchase), await deliver(purchase)
    assert (first.accepted, again.duplicates) == (1, 1)
    assert await points(mesh, aino) == 12 + 100
    refunded = await deliver(ret)
    assert refunded.accepted == 1
    assert await points(mesh, aino) == 112 - 6  # half of 12 base points, floored
    refused = await deliver(bad)
    assert [(q.line, q.field) for q in refused.quarantined] == [(1, "$.lines[0].amount")]
    assert "not a JSON number" in refused.quarantined[0].reason and refused.quarantined[0].raw == bad.decode()
    for body, needle in [
        (b"{not json", "not JSON"),
        (b'{"type": "purchase", "type": "return"}', "appear twice"),
        (webhook_body(total="13.00"), "the lines sum to 1250"),
        (webhook_body(time="2026-01-02T10:00:00"), "has no UTC offset"),
        (webhook_body(member_id=aino), "exactly one of card_number or member_id"),
    ]:
        [held] = list(adapter.parse("webhook", body))
        assert isinstance(held, Quarantined) and needle in held.reason, held


async def test_purchases_imported_while_rules_svc_is_down_are_accepted_as_pending(mesh: Mesh) -> None:
    await member_with_card(mesh, "4000-0001"), await member_with_card(mesh, "4000-0002")
    await mesh.stop_rules()
    report = await import_records(
        parse_file(CsvDropAdapter(), "franchise_drop.csv"), mesh.ledger.stub, adapter="csv", channel="pos"
    )
    assert (report.accepted, report.pending_accrual, report.duplicates) == (2, 2, 1)


async def test_an_unreachable_ledger_interrupts_the_import_and_quarantines_nothing(tmp_path: Path) -> None:
    with pytest.raises(ImportInterrupted) as stopped:
        await import_file(FILES / "franchise_drop.csv", "csv", f"127.0.0.1:{free_port()}", tmp_path)
    assert stopped.value.retryable and stopped.value.code == grpc.StatusCode.UNAVAILABLE
    assert stopped.value.partial.accepted == 0
    assert not any(tmp_path.iterdir())  # noqa: ASYNC240


@pytest.mark.parametrize(
    ("text", "currency", "minor"),
    [
        ("12.50", "EUR", 1250), ("12.5", "EUR", 1250), ("0.01", "EUR", 1), ("007.10", "EUR", 710),
        ("0.29", "EUR", 29), ("1.15", "EUR", 115),  # float(text) * 100 would give 28 and 114
        ("1000", "JPY", 1000), ("1.250", "KWD", 1250), ("0.001", "KWD", 1), ("123456789012.34", "EUR", 12345678901234),
    ],
)  # fmt: skip
def test_amounts_are_parsed_exactly_at_the_currency_exponent(text: str, currency: str, minor: int) -> None:
    assert fields.amount_minor(text, currency) == minor


@pytest.mark.parametrize(
    ("text", "currency", "needle"),
    [
        ("1000.5", "JPY", "JPY has no decimals"), ("1.2500", "KWD", "KWD has 3 decimals"),
        ("12.345", "EUR", "EUR has 2 decimals"), ("1e3", "EUR", "not a decimal"), ("-1.00", "EUR", "not a decimal"),
        ("1,00", "EUR", "not a decimal"), ("12.", "EUR", "not a decimal"), (".5", "EUR", "not a decimal"),
        ("", "EUR", "is empty"), ("9" * 19, "JPY", "too large"),
    ],
)  # fmt: skip
def test_amounts_that_are_not_exact_for_the_currency_are_refused(text: str, currency: str, needle: str) -> None:
    with pytest.raises(fields.FieldError, match=needle):
        fields.amount_minor(text, currency)


HEADER = "record_type,store_id,receipt_id,line_no,receipt_time,card_number,currency,sku,category,quantity,amount"


def csv_of(*rows: str, header: str = HEADER) -> list[Any]:
    return list(CsvDropAdapter().parse("drop.csv", "\n".join([header, *rows]).encode()))


def test_a_csv_receipt_with_a_missing_or_inconsistent_line_is_held_back_whole() -> None:
    t = "2026-01-02T10:00:00+02:00"
    parsed = csv_of(
        f"P,HEL-01,A,1,{t},4000-0001,EUR,S1,misc,1,1.00",
        f"P,HEL-01,A,3,{t},4000-0001,EUR,S3,misc,1,1.00",  # line 2 of the receipt is missing
        f"P,HEL-01,B,1,{t},4000-0001,EUR,S1,misc,1,1.00",
        "P,HEL-01,B,2,2026-01-02T11:00:00+02:00,4000-0001,EUR,S2,misc,1,1.00",
        "P,HEL-01,C,1,2026-01-02T10:00:00,4000-0001,EUR,S1,misc,0,1.00",
        f"X,HEL-01,D,1,{t},4000-0001,EUR,S1,misc,1,1.00",
        f"P,HEL-01,E,1,{t},4000-0001,EUR,S1,misc,1,1.00",
    )
    assert [(q.line, q.reason) for q in parsed if isinstance(q, Quarantined)] == [
        (2, "held back with receipt HEL-01/A: see line(s) 3"),
        (3, "column line_no: 3 where 2 was expected (lines of a receipt run 1, 2, 3...)"),
        (4, "held back with receipt HEL-01/B: see line(s) 5"),
        (5, f"column receipt_time: '2026-01-02T11:00:00+02:00' differs from '{t}' on line 4 of the same receipt"),
        (6, "column receipt_time: '2026-01-02T10:00:00' has no UTC offset (add Z or +hh:mm); "
            "column quantity: must be at least 1, got 0"),
        (7, "column record_type: 'X' is not P (purchase) or R (return)"),
    ]  # fmt: skip
    assert [r.receipt_id for r in parsed if isinstance(r, LegacyPurchase)] == ["E"]


def test_a_row_that_cannot_name_its_receipt_holds_back_the_receipt_it_sits_in() -> None:
    t = "2026-01-02T10:00:00+02:00"
    parsed = csv_of(
        f"P,HEL-01,A,1,{t},4000-0001,EUR,S1,misc,1,1.00",
        'P,HEL-01,A,2,"broken',
        f"P,HEL-01,A,3,{t},4000-0001,EUR,S3,misc,1,1.00",
        f"P,HEL-01,B,1,{t},4000-0001,EUR,S1,misc,1,1.00",
    )
    assert [(q.line, q.reason) for q in parsed if isinstance(q, Quarantined)] == [
        (2, "held back with receipt HEL-01/A: see line(s) 3"),
        (3, "not CSV: unexpected end of data"),
        (4, "held back with receipt HEL-01/A: see line(s) 3"),
    ]
    assert [r.receipt_id for r in parsed if isinstance(r, LegacyPurchase)] == ["B"]
    [not_utf8] = CsvDropAdapter().parse(
        "drop.csv", HEADER.encode() + b"\nP,HEL-01,C,1,2026-01-02T10:00:00Z,x,EUR,S\xff,m,1,1"
    )
    assert isinstance(not_utf8, Quarantined) and not_utf8.reason == "line is not valid UTF-8"
    assert not_utf8.raw.endswith("S\\xff,m,1,1")


def test_a_csv_header_without_a_required_column_quarantines_every_row_not_just_the_header() -> None:
    parsed = csv_of("P,HEL-01,A,1,2026-01-02T10:00:00Z,4000-0001,EUR,S1,misc,1", header=HEADER.removesuffix(",amount"))
    assert [(q.line, q.field) for q in parsed] == [(1, "header"), (2, "header")]
    assert parsed[0].reason.startswith("header: required column(s) amount missing")
    assert parsed[1].reason == "not read: the header at line 1 is unusable"


def fixed(kind: str, **values: object) -> str:
    """One fixed-width record: text left-aligned, numbers zero-padded, as the mainframe writes them."""
    out = ""
    for column in LAYOUTS[kind]:
        value = kind if column.name == "record_type" else values.get(column.name, "")
        out += str(value).rjust(column.width, "0") if isinstance(value, int) else str(value).ljust(column.width)
    return out.rstrip()


def test_a_bad_fixed_width_receipt_holds_back_only_itself() -> None:
    head = {"store_id": "HEL-01", "receipt_time": "20260102100000", "utc_offset": "+0200", "card_number": "4000-0001"}
    records = [
        fixed("P", receipt_id="A", currency="EUR", line_count=2, **head),
        fixed("L", sku="S1", category="misc", quantity=1, amount_minor=100),  # one L where two are announced
        fixed("P", receipt_id="B", currency="EUR", line_count=1, **head),
        fixed("L", sku="S1", category="misc", quantity=1, amount_minor="0000000012.50"),
        fixed("P", receipt_id="D", currency="EUR", line_count=1, **head),
        fixed("L", sku="S1", category="misc", quantity=1, amount_minor=100),
        fixed("L", sku="S2", category="misc", quantity=1, amount_minor=100),  # beyond D's line_count
        fixed("P", receipt_id="C", currency="JPY", line_count=1, **head),
        fixed("L", sku="S1", category="misc", quantity=1, amount_minor=1000),
    ]
    text = "\n".join([fixed("H", producer="MF", created_at="20260105060000", batch_id="1"), *records,
                      fixed("T", record_count=len(records))])  # fmt: skip
    parsed = list(FixedWidthAdapter().parse("export.txt", text.encode()))
    assert [(q.line, q.reason) for q in parsed if isinstance(q, Quarantined)] == [
        (2, "column line_count: announces 2 L records but 1 follow"),
        (3, "column line_count: announces 2 L records but 1 follow"),
        (4, "column amount_minor: '0000000012.50' is not a whole number (L record at line 5)"),
        (5, "column amount_minor: '0000000012.50' is not a whole number (L record at line 5)"),
        (6, "column line_count: announces 1 L records but 2 follow"),
        (7, "column line_count: announces 1 L records but 2 follow"),
        (8, "column line_count: announces 1 L records but 2 follow"),
    ]
    [jpy] = [r for r in parsed if isinstance(r, LegacyPurchase)]
    assert (jpy.receipt_id, jpy.total_minor, jpy.receipt_time) == ("C", 1000, datetime(2026, 1, 2, 8, 0, tzinfo=UTC))


def test_the_fixed_width_layout_in_the_docs_is_the_one_the_code_reads() -> None:
    documented: dict[str, list[tuple[str, int, int]]] = {}
    kind = ""
    for line in DOCS.read_text().splitlines():
        if heading := re.match(r"^#### `(\w)` record", line):
            kind = heading[1]
        elif kind and (row := re.match(r"^\| `(\w+)` \| (\d+) \| (\d+) \| (\d+) \|", line)):
            documented.setdefault(kind, []).append((row[1], int(row[2]), int(row[3])))
    assert documented == {k: [(c.name, c.start, c.width) for c in cols] for k, cols in LAYOUTS.items()}


def test_a_header_that_is_not_csv_quarantines_the_file_instead_of_failing() -> None:
    data = b"record_type,store_id\rreceipt_id\nP,HEL-01,R-1\n"
    parsed = list(CsvDropAdapter().parse("odd.csv", data))
    assert [(q.line, q.field) for q in parsed if isinstance(q, Quarantined)] == [(1, "header"), (2, "header")]
    assert "not CSV" in parsed[0].reason  # type: ignore[union-attr]


async def test_a_nightly_file_of_thousands_of_receipts_goes_in_batches_and_earns_exactly(
    mesh: Mesh, tmp_path: Path
) -> None:
    """2,100 receipts, a return in the middle of them (it must find its purchase from earlier in
    the same file), a receipt repeated, one conflicting and one for an unknown card: the
    purchases go in IngestBatch streams (more than one: the run after the return is longer
    than a stream) and every member ends with exactly the points of their receipts."""
    cards = [f"5000-{k:04d}" for k in range(150)]
    members = {card: await member_with_card(mesh, card) for card in cards}
    header = "record_type,store_id,receipt_id,line_no,receipt_time,card_number,currency,sku,category,quantity,amount"
    header += ",original_channel,original_store_id,original_receipt_id,original_line"
    expected = {card: 100 for card in cards}  # every card buys at least once: the welcome

    def receipt(i: int, euros: int) -> str:
        at = datetime(2026, 1, 2, 8, 0, tzinfo=UTC) + timedelta(seconds=10 * i)  # 10:00-15:50 in Helsinki
        return f"P,HEL-01,N-{i},1,{at.isoformat()},{cards[i % len(cards)]},EUR,SKU-{i},misc,2,{euros}.00,,,,"

    lines = [header]
    for i in range(2100):
        if i == 300:
            # One of the two items of N-12 (4.00 EUR, 4 points) comes back.
            lines.append(f"R,HEL-01,NR-1,1,2026-01-03T10:00:00+02:00,{cards[12]},EUR,SKU-12,misc,1,2.00,,,N-12,1")
            expected[cards[12]] -= 2
        if i == 1500:
            lines.append(receipt(20, 20 % 5 + 2))  # the same receipt again: a duplicate
        if i == 1600:
            conflict_line = len(lines) + 1
            lines.append(receipt(30, 99))  # the same receipt with another amount
        if i == 1700:
            unknown_line = len(lines) + 1
            lines.append(receipt(40, 5).replace(cards[40 % len(cards)], "9999-0000"))
        lines.append(receipt(i, i % 5 + 2))
        expected[cards[i % len(cards)]] += i % 5 + 2
    source = tmp_path / "nightly.csv"
    source.write_text("\n".join(lines) + "\n")
    records = list(CsvDropAdapter().parse(str(source), source.read_bytes()))

    first = await import_records(records, mesh.ledger.stub, adapter="csv", channel="pos")

    assert (first.accepted, first.duplicates, first.pending_accrual) == (2101, 1, 0)
    assert lines_of(first.quarantined) == [
        (conflict_line, "ALREADY_EXISTS", "idempotency_key.key"),  # what RecordPurchase says too
        (unknown_line, "NOT_FOUND", "card_number"),
    ]
    reason = first.quarantined[0].reason
    assert reason.startswith("ledger refused (ALREADY_EXISTS on idempotency_key.key): idempotency_key.key: ")
    assert "purchase:meshmart" in reason
    assert {card: await points(mesh, members[card]) for card in cards} == expected

    again = await import_records(records, mesh.ledger.stub, adapter="csv", channel="pos")
    assert (again.accepted, again.duplicates) == (0, 2102)  # 2,100 receipts, the repeat, the return
    assert lines_of(again.quarantined) == lines_of(first.quarantined)
    assert {card: await points(mesh, members[card]) for card in cards} == expected


async def test_a_stream_of_purchases_is_sent_again_when_the_ledger_comes_back(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The client channel retries unary calls only; the importer resends a stream of purchases
    that failed for the moment (here the ledger is down when it first goes), and since every
    purchase is idempotent the second attempt posts each of them once."""
    address = f"127.0.0.1:{free_port()}"
    first = await start_ledger(tmp_path / "ledger", redis_server.url, ledger_addr=address)
    member = (await create_member(first.stub)).member_id
    at = first.clock.now() - timedelta(hours=2)
    await stop_ledger(first)
    records = [
        LegacyPurchase(
            f"rec-{i}", LegacyMember(member_id=member), "", "HEL-01", f"B-{i}", "EUR",
            (LegacyLine("SKU-1", "misc", 1, 1000 + i),), at + timedelta(minutes=i),
            Origin("webhook", (SourceLine(i + 1, f"line {i}"),)),
        )
        for i in range(5)
    ]  # fmt: skip
    async with closing(ledger_stub(address)) as stub:
        importing = asyncio.ensure_future(import_records(records, stub, adapter="webhook", channel="web"))
        await asyncio.sleep(0.2)  # the first attempt has failed by now
        assert not importing.done()
        again = await start_ledger(tmp_path / "ledger", redis_server.url, ledger_addr=address)
        try:
            report = await importing
            # No rules_svc behind this ledger: the purchases wait for accrual, recorded once.
            assert (report.accepted, report.duplicates, report.pending_accrual) == (5, 0, 5)
            listed = await again.stub.ListPurchases(ledger_pb2.ListPurchasesRequest(
                channel="web", receipt_time_from=ts(at), receipt_time_until=ts(at + timedelta(hours=1))
            ))  # fmt: skip
            assert sorted(p.receipt_id for p in listed.purchases) == [f"B-{i}" for i in range(5)]
        finally:
            await stop_ledger(again)
