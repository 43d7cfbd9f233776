"""Legacy records past what the ledger can carry: a time outside years 1..9999 in UTC, a line
number no receipt has, amounts past int64, a quantity past int64. Each is quarantined with its
line number and field like any other bad record, and the rest of the file is imported."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx

from gateway.legacy.fixed_width import FixedWidthAdapter
from gateway.legacy.importer import import_records
from gateway.legacy.records import LegacyPurchase, Member, Origin, PurchaseLine, Quarantined, SourceLine
from gateway.legacy.webhook import WebhookAdapter, sign
from tests.gateway.conftest import GatewayUnderTest
from tests.gateway.test_legacy import fixed
from tests.gateway.test_legacy_http import card_member, points

HEADER = (
    "record_type,store_id,receipt_id,line_no,receipt_time,card_number,currency,sku,category,quantity,amount,"
    "original_channel,original_store_id,original_receipt_id,original_line\n"
)
T = "2026-01-02T10:00:00+02:00"


async def upload(gw: GatewayUnderTest, name: str, text: str) -> dict[str, Any]:
    async with gw.client("franchise") as franchise:
        response = await franchise.post("/v1/legacy/imports", params={"adapter": "csv"},
                                        files={"file": (name, text.encode(), "text/csv")})  # fmt: skip
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def held(report: dict[str, Any]) -> list[tuple[int, str]]:
    return [(q["line"], q["field"]) for q in report["quarantined"]]


async def test_a_csv_receipt_time_outside_utc_years_is_quarantined_and_the_rest_imported(gw: GatewayUnderTest) -> None:
    member = await card_member(gw, "5000-0001")
    report = await upload(gw, "years.csv", HEADER + (
        f"P,HEL-01,Y-1,1,{T},5000-0001,EUR,S,misc,1,10.00,,,,\n"
        "R,HEL-01,YR-1,1,2026-01-03T10:00:00+02:00,5000-0001,EUR,S,misc,1,5.00,,,Y-1,\n"
        "P,HEL-01,Y-2,1,0001-01-01T00:30:00+01:00,5000-0001,EUR,S,misc,1,10.00,,,,\n"
        "P,HEL-01,Y-3,1,9999-12-31T23:30:00-01:00,5000-0001,EUR,S,misc,1,10.00,,,,\n"
        f"P,HEL-01,Y-4,1,{T},5000-0001,EUR,S,misc,1,20.00,,,,\n"
    ))  # fmt: skip
    assert held(report) == [(4, "receipt_time"), (5, "receipt_time")]
    assert "outside years 1..9999" in report["quarantined"][0]["reason"]
    assert report["accepted"] == 3
    assert await points(gw, member) == 10 + 100 - 5 + 20


async def test_a_csv_return_of_a_line_no_receipt_can_have_is_quarantined(gw: GatewayUnderTest) -> None:
    member = await card_member(gw, "5000-0002")
    report = await upload(gw, "lines.csv", HEADER + (
        f"P,HEL-01,Z-1,1,{T},5000-0002,EUR,S,misc,1,10.00,,,,\n"
        f"R,HEL-01,ZR-1,1,{T},5000-0002,EUR,S,misc,1,10.00,,,Z-1,99999999999\n"
        f"R,HEL-01,ZR-2,1,{T},5000-0002,EUR,S,misc,1,10.00,,,Z-1,501\n"
    ))  # fmt: skip
    assert held(report) == [(3, "original_line"), (4, "original_line")]
    assert "at most 500 lines" in report["quarantined"][0]["reason"]
    assert report["accepted"] == 1 and await points(gw, member) == 10 + 100


async def test_csv_amounts_summing_past_int64_hold_back_their_receipt(gw: GatewayUnderTest) -> None:
    member = await card_member(gw, "5000-0003")
    big = "9999999999999999.99"  # 18 digits of minor units: each line alone is readable
    rows = "".join(f"P,HEL-01,O-1,{i},{T},5000-0003,EUR,S,misc,1,{big},,,,\n" for i in range(1, 11))
    report = await upload(gw, "sum.csv", HEADER + f"P,HEL-01,O-0,1,{T},5000-0003,EUR,S,misc,1,10.00,,,,\n" + rows)
    assert [line for line, _ in held(report)] == list(range(3, 13))
    [culprit] = [q for q in report["quarantined"] if q["field"]]
    assert culprit["field"] == "amount" and "more than the ledger holds" in culprit["reason"]
    assert report["accepted"] == 1 and await points(gw, member) == 10 + 100


async def test_a_webhook_quantity_past_int64_is_422_naming_the_field(gw: GatewayUnderTest) -> None:
    await card_member(gw, "5000-0004")
    secret = gw.settings.webhook_secret.encode()
    for number, quantity in enumerate((2**63, 10**30)):
        body = json.dumps({
            "type": "purchase", "id": f"q-{number}", "card_number": "5000-0004", "receipt_id": f"WQ-{number}",
            "time": gw.mesh.clock.now().isoformat(), "currency": "EUR",
            "lines": [{"sku": "S", "category": "misc", "quantity": quantity, "amount": "20.00"}],
        }).encode()  # fmt: skip
        stamp = str(int(gw.mesh.clock.now().timestamp()))
        headers = {"X-Signature": sign(secret, body, timestamp=stamp), "X-Signature-Timestamp": stamp,
                   "Content-Type": "application/json"}  # fmt: skip
        async with httpx.AsyncClient(base_url=gw.url) as vendor:
            response = await vendor.post("/v1/legacy/webhooks/acme", content=body, headers=headers)
        assert response.status_code == 422, response.text
        assert held(response.json()) == [(1, "$.lines[0].quantity")]


def test_a_webhook_return_of_a_line_no_receipt_can_have_is_quarantined() -> None:
    body = json.dumps({
        "type": "return", "id": "r-1", "card_number": "5000-0005", "return_id": "WR-1", "time": T,
        "currency": "EUR", "original": {"receipt_id": "W-1"}, "lines": [{"line": 2**31, "quantity": 1}],
    }).encode()  # fmt: skip
    [refused] = list(WebhookAdapter().parse("webhook", body))
    assert isinstance(refused, Quarantined) and refused.field == "$.lines[0].line"


def test_a_fixed_width_time_outside_utc_years_is_quarantined_by_field() -> None:
    head = {"store_id": "HEL-01", "card_number": "4000-0001", "currency": "EUR", "line_count": 1}
    records = [
        fixed("P", receipt_id="A", receipt_time="00010101003000", utc_offset="+0100", **head),
        fixed("L", sku="S1", category="misc", quantity=1, amount_minor=100),
        fixed("P", receipt_id="B", receipt_time="20260102100000", utc_offset="+0200", **head),
        fixed("L", sku="S1", category="misc", quantity=1, amount_minor=100),
    ]
    text = "\n".join([fixed("H", producer="MF", created_at="20260105060000", batch_id="1"), *records,
                      fixed("T", record_count=len(records))])  # fmt: skip
    parsed = list(FixedWidthAdapter().parse("export.txt", text.encode()))
    assert [(q.line, q.field) for q in parsed if isinstance(q, Quarantined)] == [
        (2, "receipt_time/utc_offset"),
        (3, "receipt_time/utc_offset"),
    ]
    assert [r.receipt_id for r in parsed if isinstance(r, LegacyPurchase)] == ["B"]


async def test_a_record_no_ledger_request_can_carry_is_quarantined_not_a_crash(gw: GatewayUnderTest) -> None:
    """The net behind the adapters' own checks: a record built past them is refused whole."""
    member = await card_member(gw, "5000-0006")
    origin = Origin("made.csv", (SourceLine(7, "raw"),))
    overflowing = LegacyPurchase(
        "x", Member(member_id=member), "", "HEL-01", "N-1", "EUR", (PurchaseLine("S", "misc", 2**63, 100),),
        datetime(2026, 1, 2, 8, tzinfo=UTC), origin,
    )  # fmt: skip
    fine = LegacyPurchase(
        "y", Member(member_id=member), "", "HEL-01", "N-2", "EUR", (PurchaseLine("S", "misc", 1, 1000),),
        datetime(2026, 1, 2, 8, tzinfo=UTC), Origin("made.csv", (SourceLine(8, "raw"),)),
    )  # fmt: skip
    report = await import_records([overflowing, fine], gw.mesh.ledger.stub, adapter="csv", channel="pos")
    assert [(q.line, q.code) for q in report.quarantined] == [(7, "PARSE")]
    assert "cannot be sent to the ledger" in report.quarantined[0].reason
    assert report.accepted == 1 and await points(gw, member) == 10 + 100


async def test_a_file_is_parsed_off_the_event_loop_a_chunk_at_a_time(gw: GatewayUnderTest) -> None:
    """Reading a large file is seconds of CPU: on the gateway's loop it would hold every till's
    request meanwhile. The adapter's records are pulled on worker threads; the report is the
    same, in file order."""
    loop_thread = threading.get_ident()
    parsed_on: set[int] = set()

    def parse() -> Iterator[Quarantined]:
        for line in range(1, 1001):
            parsed_on.add(threading.get_ident())
            yield Quarantined("big.csv", line, "unreadable", f"row {line}")

    report = await import_records(parse(), gw.mesh.ledger.stub, adapter="csv", channel="pos")

    assert parsed_on and loop_thread not in parsed_on
    assert [q.line for q in report.quarantined] == list(range(1, 1001))
