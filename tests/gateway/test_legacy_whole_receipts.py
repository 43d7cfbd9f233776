"""A receipt whose rows fall into more than one part of a file is imported or held back whole.

A CSV row whose line_no was mistyped as 1 starts its receipt again, so the receipt's rows come
in two parts with the same key; a file may also carry a receipt twice, in CSV or fixed width.
When any part is bad, or two parts in a row differ, posting the other part would earn on a
partial receipt and the corrected re-send would meet ALREADY_EXISTS on the receipt's natural
key. So nothing of such a receipt is posted, and its correction earns the whole of it.

Figures come from tests/mesh/program.yaml: 1 point per EUR, and a 100-point welcome on a
member's first purchase.
"""

from __future__ import annotations

import pytest

from gateway.legacy.fixed_width import FixedWidthAdapter
from gateway.legacy.importer import ImportReport, import_records
from gateway.legacy.records import LegacyPurchase, LegacyReturn
from tests.gateway.test_legacy import fixed, member_with_card
from tests.gateway.test_legacy_review import HEADER, T, csv_rows, held, imported, receipts
from tests.mesh import conftest as mesh_fixtures
from tests.mesh.conftest import Mesh
from tests.mesh.helpers import points

mesh = mesh_fixtures.mesh


def rows(card: str, *lines: tuple[int, str, str]) -> str:
    """Rows of receipt HEL-01/R-1 for `card`: (line_no, sku, amount) each."""
    return HEADER + "".join(f"P,HEL-01,R-1,{n},{T},{card},EUR,{sku},misc,1,{amount}\n" for n, sku, amount in lines)


SPLIT_RECEIPTS = {
    # (as first sent, as corrected, the corrected receipt's EUR)
    "line 2 of three typed as line 1": (
        [(1, "A", "10.00"), (1, "B", "20.00"), (3, "C", "30.00")],
        [(1, "A", "10.00"), (2, "B", "20.00"), (3, "C", "30.00")], 60,
    ),
    "a bad amount in the part that starts again": (
        [(1, "A", "10.00"), (1, "B", "20.0X"), (2, "C", "30.00")],
        [(1, "A", "10.00"), (2, "B", "20.00"), (3, "C", "30.00")], 60,
    ),
    "line 2 of two typed as line 1": (
        [(1, "A", "10.00"), (1, "B", "20.00")],
        [(1, "A", "10.00"), (2, "B", "20.00")], 30,
    ),
}  # fmt: skip


@pytest.mark.parametrize(("sent", "corrected", "euros"), SPLIT_RECEIPTS.values(), ids=SPLIT_RECEIPTS.keys())
async def test_a_csv_receipt_split_by_a_mistyped_row_posts_nothing_and_its_correction_earns_it_whole(
    mesh: Mesh, sent: list[tuple[int, str, str]], corrected: list[tuple[int, str, str]], euros: int
) -> None:
    member = await member_with_card(mesh, "9400-0001")
    first = await imported(mesh, rows("9400-0001", *sent))
    assert first.accepted == 0
    assert [(q.line, q.code) for q in first.quarantined] == [(2 + i, "PARSE") for i in range(len(sent))]
    assert await points(mesh, member) == 0
    again = await imported(mesh, rows("9400-0001", *corrected))
    assert (again.accepted, again.duplicates, again.quarantined) == (1, 0, ())
    assert await points(mesh, member) == euros + 100


def test_every_part_of_a_split_csv_receipt_says_which_line_holds_it_back() -> None:
    parsed = csv_rows(
        f"P,HEL-01,R-1,1,{T},4000-0001,EUR,A,misc,1,10.00",
        f"P,HEL-01,R-1,1,{T},4000-0001,EUR,B,misc,1,20.00",
        f"P,HEL-01,R-1,3,{T},4000-0001,EUR,C,misc,1,30.00",
        f"P,HEL-01,R-2,1,{T},4000-0001,EUR,A,misc,1,5.00",
    )
    assert receipts(parsed) == [("R-2", 500)]
    assert held(parsed) == {
        2: "held back with receipt HEL-01/R-1: line(s) 3 may be more of its lines; see there",
        3: "held back with receipt HEL-01/R-1: see line(s) 4",
        4: "column line_no: 3 where 2 was expected (lines of a receipt run 1, 2, 3...)",
    }


def test_two_copies_of_a_csv_receipt_in_a_row_are_held_back_when_they_differ_and_sent_when_equal() -> None:
    parsed = csv_rows(
        f"P,HEL-01,R-1,1,{T},4000-0001,EUR,A,misc,1,10.00",
        f"P,HEL-01,R-1,1,{T},4000-0001,EUR,B,misc,1,20.00",
        f"P,HEL-01,R-2,1,{T},4000-0001,EUR,A,misc,1,5.00",
        f"P,HEL-01,R-2,1,{T},4000-0001,EUR,A,misc,1,5.0",  # the same amount written otherwise
    )
    # Equal copies go to the ledger, which counts the second as a duplicate.
    assert receipts(parsed) == [("R-2", 500), ("R-2", 500)]
    why = (
        "held back with receipt HEL-01/R-1: line(s) 2, 3 each start it (line_no 1) with other contents; "
        "is a line_no mistyped, or are these two versions of it?"
    )
    assert held(parsed) == {2: why, 3: why}


def test_a_bad_copy_of_a_csv_receipt_elsewhere_in_the_file_holds_back_the_good_one() -> None:
    parsed = csv_rows(
        f"P,HEL-01,R-1,1,{T},4000-0001,EUR,A,misc,1,10.00",
        f"P,HEL-01,R-2,1,{T},4000-0001,EUR,A,misc,1,5.00",
        f"P,HEL-01,R-1,1,{T},4000-0001,EUR,A,misc,1,10.0O",
    )
    assert receipts(parsed) == [("R-2", 500)]
    reasons = held(parsed)
    assert reasons[2] == "held back with receipt HEL-01/R-1: line(s) 4 may be more of its lines; see there"
    assert reasons[4].startswith("column amount: '10.0O' is not a decimal amount")


def mainframe(*records: str) -> str:
    return "\n".join([fixed("H", producer="MF", created_at="20260105060000", batch_id="1"), *records,
                      fixed("T", record_count=len(records))])  # fmt: skip


def receipt(card: str, *amounts: int | str) -> list[str]:
    """Fixed-width receipt HEL-01/R-1 of `card`: its P and one L per amount (minor units, or text
    as written)."""
    head = fixed("P", store_id="HEL-01", receipt_id="R-1", receipt_time="20260102100000", utc_offset="+0200",
                 card_number=card, currency="EUR", line_count=len(amounts))  # fmt: skip
    return [head, *(fixed("L", sku=f"S{i}", category="misc", quantity=1, amount_minor=amount)
                    for i, amount in enumerate(amounts, start=1))]  # fmt: skip


async def mainframe_import(mesh: Mesh, text: str) -> ImportReport:
    parsed = FixedWidthAdapter().parse("export.txt", text.encode())
    return await import_records(parsed, mesh.ledger.stub, adapter="fixed-width", channel="pos")


async def test_a_fixed_width_receipt_with_a_bad_copy_in_the_file_posts_nothing_and_its_correction_earns_it_whole(
    mesh: Mesh,
) -> None:
    member = await member_with_card(mesh, "9400-0100")
    first = await mainframe_import(mesh, mainframe(
        *receipt("9400-0100", 1000),
        *receipt("9400-0100", 1000, "0000000002O00"),  # the same receipt again, one amount unreadable
    ))  # fmt: skip
    assert first.accepted == 0 and [q.line for q in first.quarantined] == [2, 3, 4, 5, 6]
    assert first.quarantined[0].reason == (
        "receipt held back: line(s) 4 hold another copy of it that is held back; see there"
    )
    assert await points(mesh, member) == 0
    again = await mainframe_import(mesh, mainframe(*receipt("9400-0100", 1000, 2000)))
    assert (again.accepted, again.quarantined) == (1, ())
    assert await points(mesh, member) == 30 + 100


def test_a_fixed_width_refund_with_a_bad_copy_in_the_file_is_held_back_and_other_refunds_are_not() -> None:
    def refund(slip: str, original: str, refund_minor: int | str) -> str:
        return fixed("R", store_id="HEL-01", refund_id=slip, refund_time="20260103100000", utc_offset="+0200",
                     card_number="4000-0001", currency="EUR", original_store_id="HEL-01",
                     original_receipt_id=original, refund_minor=refund_minor)  # fmt: skip

    parsed = list(FixedWidthAdapter().parse("export.txt", mainframe(
        refund("RF-1", "R-1", 500), refund("RF-1", "R-2", 700), refund("RF-1", "R-1", "00000000005X0"),
    ).encode()))  # fmt: skip
    assert [(r.original_receipt_id, r.refund_minor) for r in parsed if isinstance(r, LegacyReturn)] == [("R-2", 700)]
    assert held(parsed)[2] == "refund held back: line(s) 4 hold another copy of it that is held back; see there"
    assert held(parsed)[4].startswith("column refund_minor: ")


def test_a_fixed_width_copy_whose_head_is_cut_short_still_holds_back_the_other_copy() -> None:
    """Its P record lost its last characters in transfer (line_count cut): the record is bad,
    but its store and receipt columns are whole, so it still names the receipt."""
    good = receipt("9400-0100", 1000)
    cut_head, *cut_lines = receipt("9400-0100", 1000, 2000)
    parsed = list(FixedWidthAdapter().parse("export.txt", mainframe(*good, cut_head[:-2], *cut_lines).encode()))
    assert [r for r in parsed if isinstance(r, LegacyPurchase)] == []
    assert held(parsed)[2] == "receipt held back: line(s) 4 hold another copy of it that is held back; see there"
    assert "column line_count is cut" in held(parsed)[4]
