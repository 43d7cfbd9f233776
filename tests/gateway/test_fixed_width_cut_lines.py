"""Fixed-width lines that lost characters at their end: only the blanks of text columns may be
missing. A line cut inside a digit column (an L's amount_minor, an R's refund_minor, a P's
line_count) would be read as a smaller number and posted, so it holds back its receipt whole,
and so does an L record beyond its P's line_count.

Figures come from tests/mesh/program.yaml: 1 point per EUR, 1 per 150 JPY, and a 100-point
welcome on a member's first purchase.
"""

from __future__ import annotations

import re

import pytest

from gateway.legacy.fixed_width import LAYOUTS, Fill, FixedWidthAdapter
from gateway.legacy.importer import import_records
from gateway.legacy.records import LegacyPurchase, LegacyReturn, Parsed, Quarantined
from tests.gateway.test_legacy import DOCS, FILES, fixed, member_with_card
from tests.mesh import conftest as mesh_fixtures
from tests.mesh.conftest import Mesh
from tests.mesh.helpers import points

mesh = mesh_fixtures.mesh

GOOD = (FILES / "mainframe_good.txt").read_bytes().split(b"\n")
HEADER = fixed("H", producer="MFLOYAL1", created_at="20260105060000", batch_id="B000000042")


def parse(lines: list[bytes]) -> list[Parsed]:
    return list(FixedWidthAdapter().parse("export.txt", b"\n".join(lines)))


def cut(line_index: int, keep: int = -1, then: bytes = b"") -> list[bytes]:
    """mainframe_good.txt with one line cut short (and, if given, something put after it)."""
    lines = list(GOOD)
    lines[line_index] = lines[line_index][:keep] + then
    return lines


def posted(parsed: list[Parsed]) -> list[tuple[str, int]]:
    return [
        (r.receipt_id, r.total_minor) if isinstance(r, LegacyPurchase) else (r.return_receipt_id, r.refund_minor)
        for r in parsed
        if isinstance(r, LegacyPurchase | LegacyReturn)
    ]


def quarantined(parsed: list[Parsed]) -> list[tuple[int, str, str]]:
    return [(q.line, q.field, q.reason) for q in parsed if isinstance(q, Quarantined)]


def test_an_l_record_cut_inside_its_amount_holds_back_its_receipt_instead_of_posting_a_smaller_total() -> None:
    parsed = parse(cut(2))  # LSKU-COFFEE ... 0000000001250 -> 000000000125
    reason = "receipt held back: L record is 47 characters, 46 given: column amount_minor is cut (line 3)"
    assert quarantined(parsed) == [
        (2, "amount_minor", reason),
        (3, "amount_minor", reason),
        (4, "amount_minor", reason),
    ]
    assert posted(parsed) == [("M-5002", 3000), ("MR-1", 1000)]


@pytest.mark.parametrize("then", [b" ", b"       "], ids=["one-blank", "blanks"])
def test_a_cut_line_padded_back_with_blanks_by_the_transfer_is_still_cut(then: bytes) -> None:
    parsed = parse(cut(2, then=then))
    assert [line for line, _, _ in quarantined(parsed)] == [2, 3, 4]
    assert "column amount_minor is cut" in quarantined(parsed)[0][2]
    assert ("M-5001", 1250 + 750) not in posted(parsed) and ("M-5001", 125 + 750) not in posted(parsed)


def test_an_r_record_cut_inside_its_refund_is_quarantined_not_a_smaller_refund() -> None:
    parsed = parse(cut(6))  # ... 0000000001000 -> 000000000100
    reason = "R record is 111 characters, 110 given: column refund_minor is cut"
    assert quarantined(parsed) == [(7, "refund_minor", reason)]
    assert posted(parsed) == [("M-5001", 2000), ("M-5002", 3000)]


def test_a_p_record_whose_line_count_was_cut_holds_back_every_line_of_its_receipt() -> None:
    head = {"store_id": "HEL-01", "receipt_time": "20260102103000", "utc_offset": "+0200", "card_number": "4000-0001"}
    items = [fixed("L", sku=f"SKU-{i:02d}", category="misc", quantity=1, amount_minor=100) for i in range(10)]
    records = [fixed("P", receipt_id="M-7001", currency="EUR", line_count=10, **head), *items]
    whole = [HEADER, *records, fixed("T", record_count=len(records))]
    assert posted(parse([line.encode() for line in whole])) == [("M-7001", 1000)]

    whole[1] = whole[1][:-1]  # line_count 010 -> 01: one L would post, nine would be refused alone
    parsed = parse([line.encode() for line in whole])
    assert posted(parsed) == []
    reason = "P record is 73 characters, 72 given: column line_count is cut (line 2)"
    assert quarantined(parsed) == [(line, "line_count", reason) for line in range(2, 13)]


def test_l_records_beyond_their_p_line_count_hold_back_the_whole_receipt() -> None:
    head = {"store_id": "HEL-01", "receipt_time": "20260102103000", "utc_offset": "+0200", "card_number": "4000-0001"}
    refund = {**head, "currency": "EUR", "original_store_id": "HEL-01", "refund_minor": 100}
    records = [
        fixed("P", receipt_id="M-7002", currency="EUR", line_count=1, **head),
        fixed("L", sku="S1", category="misc", quantity=1, amount_minor=100),
        fixed("L", sku="S2", category="misc", quantity=1, amount_minor=900),
        fixed("R", refund_id="MR-9", refund_time="20260103100000", original_receipt_id="M-1", **refund),
        fixed("L", sku="S3", category="misc", quantity=1, amount_minor=100),  # after an R: no P of its own
    ]
    parsed = parse([line.encode() for line in [HEADER, *records, fixed("T", record_count=len(records))]])
    reason = "column line_count: announces 1 L records but 2 follow"
    assert quarantined(parsed) == [
        (2, "line_count", reason), (3, "line_count", reason), (4, "line_count", reason),
        (6, "", "L record without a P record before it"),
    ]  # fmt: skip
    assert posted(parsed) == [("MR-9", 100)]


def test_a_trailer_cut_inside_its_count_holds_back_the_file_naming_why() -> None:
    parsed = parse(cut(7))  # T000000006 -> T00000000
    assert posted(parsed) == []
    assert quarantined(parsed)[-1] == (
        8, "record_count",
        "the trailer is unreadable: T record is 10 characters, 9 given: column record_count is cut; "
        "the file may be truncated",
    )  # fmt: skip
    assert len(quarantined(parsed)) == 8


def test_a_line_missing_only_the_trailing_blanks_of_a_text_column_is_padded_back() -> None:
    header = HEADER[: HEADER.index("B000000042")] + "B42"  # batch_id is text: its blanks were stripped
    parsed = parse([header.encode(), *GOOD[1:]])
    assert posted(parsed) == [("M-5001", 2000), ("M-5002", 3000), ("MR-1", 1000)]


def test_the_docs_call_text_exactly_the_columns_a_short_line_may_stop_in() -> None:
    documented: dict[str, list[tuple[str, bool]]] = {}
    kind = ""
    for line in DOCS.read_text().splitlines():
        if heading := re.match(r"^#### `(\w)` record", line):
            kind = heading[1]
        elif kind and (row := re.match(r"^\| `(\w+)` \| \d+ \| \d+ \| \d+ \| (.*) \|$", line)):
            documented.setdefault(kind, []).append((row[1], bool(re.search(r"\btext\b", row[2]))))
    assert documented == {k: [(c.name, c.fill is Fill.BLANKS) for c in cols] for k, cols in LAYOUTS.items()}


async def test_a_file_with_a_cut_amount_earns_nothing_for_that_receipt_and_its_resend_earns_the_whole(
    mesh: Mesh,
) -> None:
    aino, bruno = await member_with_card(mesh, "4000-0001"), await member_with_card(mesh, "4000-0002")
    first = await import_records(parse(cut(2)), mesh.ledger.stub, adapter="fixed-width", channel="pos")
    assert first.accepted == 1  # M-5002; MR-1 finds no M-5001 to refund and is quarantined too
    assert [q.line for q in first.quarantined] == [2, 3, 4, 7]
    assert (await points(mesh, aino), await points(mesh, bruno)) == (0, 3000 // 150 + 100)

    again = await import_records(parse(GOOD), mesh.ledger.stub, adapter="fixed-width", channel="pos")
    assert (again.accepted, again.duplicates, again.quarantined) == (2, 1, ())
    # 20.00 EUR + welcome, then the 10.00 refund takes back half the base points.
    assert await points(mesh, aino) == 20 + 100 - 10
