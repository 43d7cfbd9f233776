"""Settlement reconciliation against the real mesh, on each store: a store's end-of-day file
gets the receipts the ledger never saw posted exactly once, however often it runs, and the
purchases only the ledger has (for the file's stores and days) are reported, not touched.

Figures come from tests/mesh/program.yaml: 1 point per EUR (floored per line) and a 100-point
welcome on a member's first purchase.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.legacy.settlement import SettlementReport, reconcile_file
from pointmesh.redis_server import free_port
from tests.conftest import pointmesh_cli
from tests.gateway.test_legacy import fixed, member_with_card, paid_partly_at_the_till, rest_purchase
from tests.mesh import conftest as mesh_fixtures
from tests.mesh.conftest import Mesh
from tests.mesh.helpers import points

mesh = mesh_fixtures.mesh

HEADER = "record_type,store_id,receipt_id,line_no,receipt_time,card_number,currency,sku,category,quantity,amount\n"
# Friday 2026-01-02, before the mesh clock and outside every weekend or happy-hour rule.
END_OF_DAY = (
    HEADER
    + "P,HEL-01,S-1,1,2026-01-02T10:15:00+02:00,5000-0001,EUR,SKU-COFFEE,misc,2,12.50\n"
    + "P,HEL-01,S-2,1,2026-01-02T11:00:00+02:00,5000-0002,EUR,SKU-BREAD,misc,1,30.00\n"
    + "P,HEL-01,S-3,1,2026-01-02T16:00:00+02:00,5000-0002,EUR,SKU-JAM,misc,1,20.00\n"
)


async def test_missing_receipts_are_posted_once_and_ledger_only_ones_are_reported(mesh: Mesh, tmp_path: Path) -> None:
    aino, bruno = await member_with_card(mesh, "5000-0001"), await member_with_card(mesh, "5000-0002")
    day = datetime(2026, 1, 2, 8, 0, tzinfo=UTC)
    # S-1 reached the ledger live; S-2 and S-3 never did (the till was offline).
    await mesh.ledger.stub.RecordPurchase(rest_purchase(aino, "S-1", "SKU-COFFEE", 2, 1250, "EUR", day + timedelta(
        minutes=15)))  # fmt: skip
    # Live the same day at the same store, but missing from the store's own export.
    stray = await mesh.ledger.stub.RecordPurchase(rest_purchase(aino, "S-9", "SKU-PEN", 1, 500, "EUR", day))
    # Another store and another day: not this file's business.
    await mesh.ledger.stub.RecordPurchase(rest_purchase(aino, "T-1", "SKU-PEN", 1, 500, "EUR", day, store="LIS-01"))
    await mesh.ledger.stub.RecordPurchase(rest_purchase(aino, "S-0", "SKU-PEN", 1, 500, "EUR", day - timedelta(days=1)))
    before = await points(mesh, aino)
    source = tmp_path / "hel-01-2026-01-02.csv"
    source.write_text(END_OF_DAY)

    first = await reconcile_file(source, "csv", mesh.ledger.address, tmp_path / "quarantine")
    assert first.posted is not None
    assert (first.receipts_in_file, first.already_posted, first.posted.accepted) == (3, 1, 2)
    assert [(o.store_id, o.receipt_id, o.purchase_id) for o in first.ledger_only] == [
        ("HEL-01", "S-9", stray.purchase.purchase_id)
    ]
    assert not first.resolved
    assert await points(mesh, bruno) == 100 + 30 + 20
    assert await points(mesh, aino) == before

    again = await reconcile_file(source, "csv", mesh.ledger.address, tmp_path / "quarantine")
    assert again.posted is not None
    assert (again.already_posted, again.posted.accepted, again.posted.duplicates) == (3, 0, 0)
    assert [o.receipt_id for o in again.ledger_only] == ["S-9"]
    assert await points(mesh, bruno) == 100 + 30 + 20


@pytest.mark.parametrize("extra", ["", "P,HEL-01,S-4,1,2026-01-02T17:00:00+02:00,5000-0002,EUR,SKU-TEA,misc,1,4.0X\n"])
async def test_the_cli_exits_nonzero_until_nothing_is_left_for_a_person(mesh: Mesh, tmp_path: Path, extra: str) -> None:
    await member_with_card(mesh, "5000-0001")
    bruno = await member_with_card(mesh, "5000-0002")
    source = tmp_path / "eod.csv"
    source.write_text(END_OF_DAY + extra)
    settings = mesh.ledger.app.settings
    env = {
        "POINTMESH_LEDGER_ADDR": mesh.ledger.address, "POINTMESH_DATA_DIR": str(settings.data_dir),
        "POINTMESH_RULES_ADDR": mesh.rules.address, "POINTMESH_PROGRAM": settings.program,
        "POINTMESH_STORE": settings.store, "POINTMESH_CASSANDRA_CONTACT_POINTS": settings.cassandra_contact_points,
        "POINTMESH_CASSANDRA_KEYSPACE": settings.cassandra_keyspace,
        "POINTMESH_CASSANDRA_LEDGER": settings.cassandra_ledger,
    }  # fmt: skip
    # In a thread: the ledger it talks to runs on this test's event loop.
    done = await asyncio.to_thread(
        pointmesh_cli, "ledger", "reconcile", "--settlement", str(source), "--adapter", "csv", env=env
    )
    # An unreadable line is a difference a person must fix; otherwise everything is resolved.
    assert done.returncode == (1 if extra else 0), done.stdout + done.stderr
    assert "3 receipts in file, 0 already posted, 3 posted now, 0 only in the ledger" in done.stdout
    assert "zero differences" in done.stdout
    assert await points(mesh, bruno) == 100 + 30 + 20


async def settle(mesh: Mesh, tmp_path: Path, name: str, *rows: str) -> SettlementReport:
    """A CSV end-of-day file of `rows` (each one line, without its newline), settled."""
    source = tmp_path / name
    source.write_text(HEADER + "".join(f"{row}\n" for row in rows))
    return await reconcile_file(source, "csv", mesh.ledger.address, tmp_path / "q",
                                rules_target=mesh.rules.address, program=mesh.ledger.app.settings.program)  # fmt: skip


async def test_a_store_open_past_midnight_utc_settles_by_its_own_business_day(mesh: Mesh, tmp_path: Path) -> None:
    """Helsinki is UTC+2: today's file has a receipt at 00:30 local, 22:30 UTC yesterday.
    The listing took UTC days, so yesterday's receipt, settled by yesterday's run, came back as
    LEDGER ONLY and the run never came out resolved."""
    member = await member_with_card(mesh, "7100-0002")
    await mesh.ledger.stub.RecordPurchase(
        rest_purchase(member, "Y-1", "SKU-TEA", 1, 3000, "EUR", datetime(2026, 1, 1, 13, tzinfo=UTC))
    )
    yesterday = await settle(
        mesh, tmp_path, "d1.csv", "P,HEL-01,Y-1,1,2026-01-01T15:00:00+02:00,7100-0002,EUR,SKU-TEA,misc,1,30.00"
    )
    assert yesterday.resolved
    today = ("P,HEL-01,T-1,1,2026-01-02T00:30:00+02:00,7100-0002,EUR,SKU-TEA,misc,1,30.00",
             "P,HEL-01,T-2,1,2026-01-02T12:00:00+02:00,7100-0002,EUR,SKU-TEA,misc,1,30.00")  # fmt: skip
    report = await settle(mesh, tmp_path, "d2.csv", *today)
    assert (report.posted.accepted, report.ledger_only) == (2, []), report.lines()
    assert report.resolved
    # A receipt of the same business day that only the ledger has is still found.
    await mesh.ledger.stub.RecordPurchase(
        rest_purchase(member, "T-9", "SKU-TEA", 1, 3000, "EUR", datetime(2026, 1, 2, 21, 30, tzinfo=UTC))
    )  # 23:30 local
    again = await settle(mesh, tmp_path, "d2.csv", *today)
    assert [o.receipt_id for o in again.ledger_only] == ["T-9"]


@pytest.mark.parametrize("adapter", ["csv", "fixed-width"])
async def test_a_receipt_whose_line_is_unreadable_is_in_the_file_not_the_ledger_s_only(
    mesh: Mesh, tmp_path: Path, adapter: str
) -> None:
    """S-2 reached the ledger over REST; the store's file has it with a typo in the amount. The
    line is quarantined, and the report also called S-2 LEDGER ONLY (a receipt the file lacks,
    to look into in the ledger) when the fix is the typo."""
    member = await member_with_card(mesh, "7100-0001")
    await mesh.ledger.stub.RecordPurchase(
        rest_purchase(member, "S-2", "SKU-BREAD", 1, 3000, "EUR", datetime(2026, 1, 2, 9, tzinfo=UTC))
    )
    source = tmp_path / "eod.txt"
    if adapter == "csv":
        source.write_text(HEADER + (
            "P,HEL-01,S-1,1,2026-01-02T10:15:00+02:00,7100-0001,EUR,SKU-COFFEE,misc,1,12.50\n"
            "P,HEL-01,S-2,1,2026-01-02T11:00:00+02:00,7100-0001,EUR,SKU-BREAD,misc,1,30.0O\n"
        ))  # fmt: skip
        bad_lines = [3]
    else:
        head = {"store_id": "HEL-01", "utc_offset": "+0200", "card_number": "7100-0001", "currency": "EUR",
                "line_count": 1}  # fmt: skip
        source.write_text("\n".join([
            fixed("H", producer="MF", created_at="20260103060000", batch_id="1"),
            fixed("P", receipt_id="S-1", receipt_time="20260102101500", **head),
            fixed("L", sku="SKU-COFFEE", category="misc", quantity=1, amount_minor=1250),
            fixed("P", receipt_id="S-2", receipt_time="20260102110000", **head),
            fixed("L", sku="SKU-BREAD", category="misc", quantity=1, amount_minor=1250).replace("1250", "12X0"),
            fixed("T", record_count=4),
        ]) + "\n")  # fmt: skip
        bad_lines = [4, 5]
    report = await reconcile_file(source, adapter, mesh.ledger.address, tmp_path / "q")
    assert [q.line for q in report.quarantined] == bad_lines, report.lines()
    assert report.ledger_only == [], report.lines()


async def test_a_receipt_paid_partly_with_points_settles_as_the_same_receipt(mesh: Mesh, tmp_path: Path) -> None:
    """The till redeemed points and named the redemption as the receipt's tender; the store's
    file, which has no tender column, lists the same receipt. Its copy was refused as another
    body (DIFFERS FROM THE LEDGER, the run never resolved) for every receipt paid with points."""
    aino = await paid_partly_at_the_till(mesh, "5000-0001", "S-0", "S-1")
    before = await points(mesh, aino)
    report = await settle(mesh, tmp_path, "d.csv",
                          "P,HEL-01,S-0,1,2026-01-02T10:00:00+02:00,5000-0001,EUR,SKU-PEN,misc,1,5.00",
                          "P,HEL-01,S-1,1,2026-01-02T10:15:00+02:00,5000-0001,EUR,SKU-COFFEE,misc,2,12.50")  # fmt: skip
    assert (report.already_posted, report.compared.duplicates) == (2, 2), report.lines()
    assert report.resolved, report.lines()
    assert await points(mesh, aino) == before


async def test_a_receipt_the_file_dates_a_day_off_the_ledgers_is_listed_as_differing(
    mesh: Mesh, tmp_path: Path
) -> None:
    """The listing covers the file's days only, so the ledger's copy was not found: the receipt
    was sent as missing, refused as recorded otherwise, and reported as neither posted nor
    differing."""
    member = await member_with_card(mesh, "9300-0001")
    await mesh.ledger.stub.RecordPurchase(
        rest_purchase(member, "D-1", "SKU", 1, 1000, "EUR", datetime(2026, 1, 1, 10, tzinfo=UTC))
    )
    before = await points(mesh, member)

    report = await settle(
        mesh, tmp_path, "eod.csv", "P,HEL-01,D-1,1,2026-01-02T10:00:00+00:00,9300-0001,EUR,SKU,misc,1,10.00"
    )

    text = "\n".join(report.lines())
    assert await points(mesh, member) == before
    assert [q.code for q in report.quarantined] == ["ALREADY_EXISTS"], text
    assert report.already_posted == 1 and "DIFFERS FROM THE LEDGER" in text, text


async def test_the_day_summer_time_starts_lists_neither_neighbouring_day(mesh: Mesh, tmp_path: Path) -> None:
    """Helsinki goes from +02:00 to +03:00 at 03:00 on Sunday 2026-03-29, a day of 23 hours
    (22:00Z to 21:00Z); each receipt's midnight at its own offset made it 25, one hour of
    Saturday and one of Monday, whose receipts were listed as the ledger's only."""
    mesh.clock.advance(timedelta(days=90))  # 2026-04-05: the receipts below are a week old
    member = await member_with_card(mesh, "9300-0002")
    saturday = datetime.fromisoformat("2026-03-28T23:30:00+02:00")
    monday = datetime.fromisoformat("2026-03-30T00:30:00+03:00")
    for receipt, at in (("SAT-9", saturday), ("MON-1", monday)):
        await mesh.ledger.stub.RecordPurchase(rest_purchase(member, receipt, "SKU", 1, 1000, "EUR", at))

    report = await settle(mesh, tmp_path, "hel-01-2026-03-29.csv",
                          "P,HEL-01,SUN-1,1,2026-03-29T01:00:00+02:00,9300-0002,EUR,SKU,misc,1,10.00",
                          "P,HEL-01,SUN-2,1,2026-03-29T10:00:00+03:00,9300-0002,EUR,SKU,misc,1,10.00")  # fmt: skip

    assert report.posted is not None and report.posted.accepted == 2
    assert report.ledger_only == [] and report.resolved, "\n".join(report.lines())


async def test_a_file_of_the_hours_after_summer_time_starts_lists_the_store_s_own_day(
    mesh: Mesh, tmp_path: Path
) -> None:
    """A file from Sunday 2026-03-29 with receipts only after 03:00 (+03:00) started the day at
    midnight by +03:00, 21:00Z, an hour of Saturday, whose receipt came back as the ledger's only.
    The store's zone (from the program) starts it at 22:00Z; Sunday's 00:30 is still found."""
    mesh.clock.advance(timedelta(days=90))
    member = await member_with_card(mesh, "9300-0003")
    saturday = datetime.fromisoformat("2026-03-28T23:30:00+02:00")
    sunday_night = datetime.fromisoformat("2026-03-29T00:30:00+02:00")
    for receipt, at in (("SAT-9", saturday), ("SUN-0", sunday_night)):
        await mesh.ledger.stub.RecordPurchase(rest_purchase(member, receipt, "SKU", 1, 1000, "EUR", at))

    report = await settle(mesh, tmp_path, "hel-01-2026-03-29.csv",
                          "P,HEL-01,SUN-2,1,2026-03-29T10:00:00+03:00,9300-0003,EUR,SKU,misc,1,10.00")  # fmt: skip

    assert report.zones_unknown == "", report.zones_unknown
    assert [o.receipt_id for o in report.ledger_only] == ["SUN-0"], "\n".join(report.lines())


async def test_a_file_of_the_hours_after_summer_time_ends_lists_the_hour_before_them(
    mesh: Mesh, tmp_path: Path
) -> None:
    """Helsinki goes from +03:00 back to +02:00 at 04:00 on Sunday 2026-10-25. A file with only
    later receipts started the day at midnight by +02:00, 22:00Z: the ledger's receipt at 00:30
    (+03:00, 21:30Z), missing from the file, went unreported."""
    mesh.clock.advance(timedelta(days=300))
    member = await member_with_card(mesh, "9300-0004")
    await mesh.ledger.stub.RecordPurchase(
        rest_purchase(member, "SUN-0", "SKU", 1, 1000, "EUR", datetime.fromisoformat("2026-10-25T00:30:00+03:00"))
    )

    report = await settle(mesh, tmp_path, "hel-01-2026-10-25.csv",
                          "P,HEL-01,SUN-2,1,2026-10-25T10:00:00+02:00,9300-0004,EUR,SKU,misc,1,10.00")  # fmt: skip

    assert [o.receipt_id for o in report.ledger_only] == ["SUN-0"], "\n".join(report.lines())
    assert not report.resolved


async def test_without_rules_svc_the_days_come_from_the_file_and_the_report_says_so(mesh: Mesh, tmp_path: Path) -> None:
    await member_with_card(mesh, "9300-0005")
    source = tmp_path / "hel-01.csv"
    source.write_text(HEADER + "P,HEL-01,N-1,1,2026-01-02T10:00:00+02:00,9300-0005,EUR,SKU,misc,1,10.00\n")

    report = await reconcile_file(source, "csv", mesh.ledger.address, tmp_path / "q",
                                  rules_target=f"127.0.0.1:{free_port()}", program="aurora")  # fmt: skip

    assert report.posted is not None and report.posted.accepted == 1
    assert "UNAVAILABLE" in report.zones_unknown
    assert any(line.startswith("STORE TIME ZONES UNKNOWN (rules_svc at 127.0.0.1:") for line in report.lines())


async def test_a_store_the_program_does_not_list_settles_by_the_file_s_offsets_and_says_so(
    mesh: Mesh, tmp_path: Path
) -> None:
    await member_with_card(mesh, "9300-0006")

    report = await settle(mesh, tmp_path, "pop-up.csv",
                          "P,POP-UP,N-1,1,2026-01-02T10:00:00+02:00,9300-0006,EUR,SKU,misc,1,10.00")  # fmt: skip

    assert report.zones_unknown == "the program lists no store 'POP-UP'"
    assert "STORE TIME ZONES UNKNOWN (the program lists no store 'POP-UP')" in "\n".join(report.lines())


async def test_a_ledger_only_receipt_is_reported_in_its_currency_not_in_minor_units(mesh: Mesh, tmp_path: Path) -> None:
    """The report is read by a person: S-9 (5.00 EUR) and K-9 (1.250 KWD), live but not in the
    store's file, are said at what they were worth, not as '500 EUR' and '1250 KWD'."""
    member = await member_with_card(mesh, "7300-0001")
    at = datetime(2026, 1, 2, 9, tzinfo=UTC)
    await mesh.ledger.stub.RecordPurchase(rest_purchase(member, "S-9", "SKU-PEN", 1, 500, "EUR", at))
    await mesh.ledger.stub.RecordPurchase(rest_purchase(member, "K-9", "SKU-DATES", 1, 1250, "KWD", at))
    source = tmp_path / "hel-01-2026-01-02.csv"
    source.write_text(HEADER + "P,HEL-01,S-1,1,2026-01-02T12:00:00+02:00,7300-0001,EUR,SKU-TEA,misc,1,3.00\n")

    report = await reconcile_file(source, "csv", mesh.ledger.address, tmp_path / "q")

    listed = sorted(line.split(" total ")[1] for line in report.lines() if line.startswith("LEDGER ONLY"))
    assert listed == ["1.250 KWD", "5.00 EUR"], report.lines()
