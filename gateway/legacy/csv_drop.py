"""Franchise POS CSV drops: one row per receipt line, rows of a receipt next to each other.

The format is documented in docs/legacy.md. Rows are grouped into receipts here and a receipt
is imported or held back as a whole: importing the good lines of a receipt with a bad one
would earn on a wrong total, and the corrected re-send would then conflict with it.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TypeVar

from gateway.legacy import fields as f
from gateway.legacy.base import UTF8_BOM
from gateway.legacy.records import (
    LegacyPurchase,
    LegacyReturn,
    Member,
    Origin,
    Parsed,
    PurchaseLine,
    Quarantined,
    ReturnLine,
    SourceLine,
)

REQUIRED_COLUMNS = (
    "record_type", "store_id", "receipt_id", "line_no", "receipt_time", "card_number", "currency",
    "sku", "category", "quantity", "amount",
)  # fmt: skip
# Needed only by R rows; a file of purchases may leave them out.
RETURN_COLUMNS = ("original_channel", "original_store_id", "original_receipt_id", "original_line")
# Every column the format reads; any other is ignored.
_READ_COLUMNS = frozenset(REQUIRED_COLUMNS + RETURN_COLUMNS)
# Receipt-level columns, repeated on every row of a receipt: they must agree.
RECEIPT_COLUMNS = ("receipt_time", "card_number", "currency")
# A spreadsheet's empty row (separators only) is a blank line.
_BLANK_ROW = re.compile(r"^[\s,]*$")
_NOT_A_START = (
    "a receipt starts at line 1: is this a line of a receipt above, its receipt_id mistyped or its rows apart?"
)
T = TypeVar("T")


@dataclass
class _Row:
    line: SourceLine
    values: dict[str, str]
    errors: list[str] = field(default_factory=list)

    def text(self, column: str) -> str:
        return (self.values.get(column) or "").strip()

    def take(self, parse: Callable[[str | None, str], T], column: str) -> T | None:
        """Parses one column, noting its error on the row instead of raising."""
        if column not in self.values and self.errors:
            return None  # a short row: the missing columns are already named
        try:
            return parse(self.values.get(column), column)
        except f.FieldError as error:
            self.errors.append(f"column {error.field}: {error.message}")
            return None

    def amount(self, column: str, currency: str | None) -> int | None:
        if currency is None:
            return None  # the currency error already explains this row
        return self.take(lambda text, col: f.amount_minor(text, currency, col), column)


@dataclass
class CsvDropAdapter:
    """`default_channel` is the channel of the franchise tills ("pos"), so a receipt that also
    reached the ledger over REST from the same till has the same natural key."""

    name: str = "csv"
    default_channel: str = "pos"

    def parse(self, source: str, data: bytes) -> Iterator[Parsed]:
        lines, undecodable = _physical_lines(data)
        header_at = next((i for i, ln in enumerate(lines) if ln.raw.strip()), None)
        if header_at is None:  # a day without sales still has its header line
            yield Quarantined(source, 1, "the file has no header line (it is empty or blank); the drop may have"
                              " delivered nothing of the export", "", field="header")  # fmt: skip
            return
        header_line, body = lines[header_at], [ln for ln in lines[header_at + 1 :] if ln.raw.strip()]
        header, problem = _header(header_line.raw)
        if problem:
            yield Quarantined(source, header_line.number, f"header: {problem}", header_line.raw, field="header")
            for ln in body:
                reason = f"not read: the header at line {header_line.number} is unusable"
                yield Quarantined(source, ln.number, reason, ln.raw, field="header")
            return
        # Two passes over the rows: a row may put in doubt a receipt above it (one more of its
        # lines, mistyped or apart), and a receipt must not be sent before that is known.
        doubts = _doubts(source, _groups(body, header, undecodable))
        for index, group in enumerate(_groups(body, header, undecodable)):
            yield from _emit(source, group, doubts.why_held(index, group))


@dataclass
class _Doubts:
    """Receipts something elsewhere in the file puts in doubt, with the line numbers that do:
    the receipt just above a row that cannot start one (by group index), every part of a
    receipt that has a bad part anywhere in the file (by key: the bad parts' first lines), and
    copies of a receipt in a row that differ (by group index: every copy's first line)."""

    by_group: dict[int, list[int]] = field(default_factory=dict)
    by_key: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)
    differing: dict[int, list[int]] = field(default_factory=dict)

    def why_held(self, index: int, group: list[_Row]) -> str:
        """Why the receipt of this group is held back although its own rows are fine; empty
        when it is not."""
        own = {row.line.number for row in group}
        doubted_by = sorted(set(self.by_group.get(index, []) + self.by_key.get(_key(group[0]), [])) - own)
        if doubted_by:
            return f"line(s) {_listed(doubted_by)} may be more of its lines; see there"
        if index in self.differing:
            return (
                f"line(s) {_listed(self.differing[index])} each start it (line_no 1) with other contents; "
                "is a line_no mistyped, or are these two versions of it?"
            )
        return ""


def _listed(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers))


def _groups(body: list[SourceLine], header: list[str], undecodable: set[int]) -> Iterator[list[_Row]]:
    """The rows of each receipt, in file order; a group is one receipt (or one unreadable row)."""
    group: list[_Row] = []
    for ln in body:
        if _BLANK_ROW.match(ln.raw):
            continue  # a spreadsheet's empty row: a blank line, not a row of any receipt
        row = _split(ln, header)
        if ln.number in undecodable:
            row.errors.insert(0, "line is not valid UTF-8")
        if _names_no_receipt(row):
            # A row that cannot say which receipt it is may be a line of the one before:
            # that receipt is held back with it rather than imported without it.
            if group:
                group.append(row)
            else:
                yield [row]
            continue
        if group and (_key(row) != _key(group[0]) or _starts_receipt(row)):
            yield group
            group = []
        group.append(row)
    if group:
        yield group


def _doubts(source: str, groups: Iterator[list[_Row]]) -> _Doubts:
    """Reads every receipt once to find the ones that must not be sent although their own rows
    are fine. A group whose first row is not line 1 of a named receipt is not a receipt of its
    own: it may be more lines of the receipt above (its receipt_id mistyped or left empty), so
    that one is held back. A bad group holds back every group with its key: a row whose line_no
    was mistyped as 1 starts its receipt again, and a receipt's rows may be apart, so the other
    groups may be the rest of the same receipt. Copies of a receipt in a row (a receipt sent
    twice) that differ are all held back: one is wrong, perhaps a mistyped line_no, and sending
    the first would earn on it and refuse the corrected re-send (ALREADY_EXISTS)."""
    doubts = _Doubts()
    run_key: tuple[str, str, str] = ("", "", "")
    run: list[_Copy] = []
    for index, group in enumerate(groups):
        first, key = group[0], _key(group[0])
        if index > 0 and not (all(key) and _starts_receipt(first)):
            doubts.by_group.setdefault(index - 1, []).append(first.line.number)
        built = _read(source, group)
        bad = any(row.errors for row in group)
        if bad and all(key):
            doubts.by_key.setdefault(key, []).append(first.line.number)
        copy = _Copy(index, first.line.number, None if bad else built)
        if all(key) and key == run_key:
            run.append(copy)
        else:
            _compare_copies(run, doubts)
            run_key, run = key, [copy]
    _compare_copies(run, doubts)
    return doubts


@dataclass(frozen=True, slots=True)
class _Copy:
    """One of the groups in a row that name the same receipt, with its records (None when it is
    bad, which holds back every group of the receipt anyway)."""

    index: int
    first_line: int
    built: list[LegacyPurchase | LegacyReturn] | None


_NOWHERE = Origin("", ())


def _contents(built: list[LegacyPurchase | LegacyReturn]) -> list[LegacyPurchase | LegacyReturn]:
    """What the ledger would be sent, without where in the file it came from."""
    return [replace(record, origin=_NOWHERE) for record in built]


def _compare_copies(run: list[_Copy], doubts: _Doubts) -> None:
    """Notes copies in a row that would not send the same thing (equal ones are a receipt sent
    twice: the ledger counts the second as a duplicate)."""
    contents = [_contents(copy.built) for copy in run if copy.built is not None]
    if len(run) < 2 or len(contents) < len(run):
        return
    first, *others = contents
    if any(other != first for other in others):
        lines = [copy.first_line for copy in run]
        for copy in run:
            doubts.differing[copy.index] = lines


def _starts_receipt(row: _Row) -> bool:
    return row.text("line_no").lstrip("0") == "1"


def _physical_lines(data: bytes) -> tuple[list[SourceLine], set[int]]:
    """Lines as the file has them, numbered from 1, and the numbers of lines that are not UTF-8
    (kept with the bad bytes escaped, so the quarantine shows them)."""
    data = data.removeprefix(UTF8_BOM)
    lines, undecodable = [], set()
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        try:
            lines.append(SourceLine(number, raw.decode("utf-8")))
        except UnicodeDecodeError:
            lines.append(SourceLine(number, raw.decode("utf-8", errors="backslashreplace")))
            undecodable.add(number)
    return lines, undecodable


def _header(raw: str) -> tuple[list[str], str]:
    try:
        names = [name.strip() for name in next(csv.reader([raw], strict=True))]
    except csv.Error as error:  # e.g. a stray carriage return inside the header line
        return [], f"not CSV: {error}"
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        return names, f"required column(s) {', '.join(missing)} missing (found: {', '.join(names)})"
    # Only a column the format reads may not come twice (which copy would it be?); the others
    # are ignored, repeated or not, like a spreadsheet's empty trailing columns or two notes.
    twice = sorted({n for n in names if n in _READ_COLUMNS and names.count(n) > 1})
    if twice:
        return names, f"column(s) {', '.join(twice)} appear more than once"
    return names, ""


def _split(line: SourceLine, header: list[str]) -> _Row:
    try:
        values = next(csv.reader([line.raw], strict=True))
    except csv.Error as error:
        return _Row(line, {}, [f"not CSV: {error}"])
    row = _Row(line, dict(zip(header, values, strict=False)))
    if len(values) < len(header):
        absent = ", ".join(header[len(values) :])
        row.errors.append(f"row has {len(values)} fields, header has {len(header)}: column(s) {absent} missing")
    elif len(values) > len(header):
        row.errors.append(f"row has {len(values)} fields, header has {len(header)}")
    return row


def _key(row: _Row) -> tuple[str, str, str]:
    return row.text("record_type"), row.text("store_id"), row.text("receipt_id")


def _names_no_receipt(row: _Row) -> bool:
    return bool(row.errors) and not (row.text("record_type") and row.text("receipt_id"))


def _read(source: str, group: list[_Row]) -> list[LegacyPurchase | LegacyReturn]:
    """One receipt's record(s), noting what is wrong on its rows instead: none when a row is bad."""
    first = group[0]
    if _names_no_receipt(first):
        return []
    record_type = first.text("record_type")
    if record_type not in ("P", "R"):
        first.errors.append(f"column record_type: {record_type!r} is not P (purchase) or R (return)")
        return []
    _check_receipt(group)
    return _purchase(source, group) if record_type == "P" else _returns(source, group)


def _emit(source: str, group: list[_Row], held_because: str) -> Iterator[Parsed]:
    """One receipt: its record(s), or every one of its lines quarantined (when one of them is
    bad, or `held_because` says what elsewhere in the file puts it in doubt)."""
    first = group[0]
    if _names_no_receipt(first):
        for row in group:  # unreadable rows that name no receipt, quarantined as they are
            yield Quarantined(source, row.line.number, "; ".join(row.errors), row.line.raw)
        return
    built = _read(source, group)
    bad = [r.line.number for r in group if r.errors]
    if not bad and not held_because:
        yield from built
        return
    store, receipt = first.text("store_id"), first.text("receipt_id")
    why = f"see line(s) {_listed(bad)}" if bad else held_because
    named = (store, receipt) if store and receipt and first.text("record_type") == "P" else None
    for row in group:
        reason = "; ".join(row.errors) or f"held back with receipt {store}/{receipt}: {why}"
        yield Quarantined(source, row.line.number, reason, row.line.raw, field=_first_column(row.errors),
                          receipt=named)  # fmt: skip


def _first_column(errors: list[str]) -> str:
    for error in errors:
        if error.startswith("column "):
            return error.removeprefix("column ").split(":", 1)[0]
    return ""


def _check_receipt(group: list[_Row]) -> None:
    """Every row names its store and receipt; line numbers run 1, 2, 3...; receipt-level
    columns agree with the receipt's first row."""
    first = group[0]
    for expected, row in enumerate(group, start=1):
        if row.errors:
            continue  # unreadable already; more complaints about it would only hide the first
        row.take(f.required, "store_id"), row.take(f.required, "receipt_id")
        line_no = row.take(f.positive, "line_no")
        if line_no is not None and line_no != expected:
            why = "lines of a receipt run 1, 2, 3..." if row is not first else _NOT_A_START
            row.errors.append(f"column line_no: {line_no} where {expected} was expected ({why})")
        if row is first:
            continue
        for column in RECEIPT_COLUMNS:
            if row.text(column) != first.text(column):
                row.errors.append(
                    f"column {column}: {row.text(column)!r} differs from {first.text(column)!r} "
                    f"on line {first.line.number} of the same receipt"
                )


def _receipt_level(group: list[_Row]) -> tuple[datetime | None, str | None, str | None]:
    first = group[0]
    when = first.take(f.aware_time, "receipt_time")
    card = first.take(f.required, "card_number")
    currency = first.take(f.currency, "currency")
    return when, card, currency


def _origin(source: str, group: list[_Row]) -> Origin:
    return Origin(source, tuple(row.line for row in group))


def _purchase(source: str, group: list[_Row]) -> list[LegacyPurchase | LegacyReturn]:
    when, card, currency = _receipt_level(group)
    lines = []
    for row in group:
        for column in RETURN_COLUMNS:
            if row.text(column):
                row.errors.append(f"column {column}: must be empty on a purchase (P) row")
        sku, category = row.take(f.required, "sku"), row.take(f.required, "category")
        quantity, amount = row.take(f.positive, "quantity"), row.amount("amount", currency)
        if sku is not None and category is not None and quantity is not None and amount is not None:
            lines.append(PurchaseLine(sku, category, quantity, amount))
            _within_total(row, [line.amount_minor for line in lines])
    if any(r.errors for r in group) or when is None or card is None or currency is None:
        return []
    store, receipt = group[0].text("store_id"), group[0].text("receipt_id")
    return [
        LegacyPurchase(
            f"{store}/{receipt}", Member(card_number=card), "", store, receipt, currency, tuple(lines), when,
            _origin(source, group),
        )
    ]  # fmt: skip


def _within_total(row: _Row, amounts: list[int]) -> None:
    """Notes on the row that takes a receipt's amounts past what the ledger holds."""
    try:
        f.total_minor(amounts, "amount")
    except f.FieldError as error:
        row.errors.append(f"column {error.field}: {error.message}")


def _returns(source: str, group: list[_Row]) -> list[LegacyPurchase | LegacyReturn]:
    """One return per original receipt named on the slip, in the order they first appear."""
    when, card, currency = _receipt_level(group)
    store, slip = group[0].text("store_id"), group[0].text("receipt_id")
    by_original: dict[tuple[str, str, str], list[tuple[_Row, ReturnLine | int]]] = {}
    for row in group:
        original = row.take(f.required, "original_receipt_id")
        if original is None:
            continue
        # Bought at another channel (e.g. online): its store id is as given, often none.
        other_channel = row.text("original_channel")
        target = (other_channel, row.text("original_store_id") or ("" if other_channel else store), original)
        if row.text("original_line"):
            number, quantity = row.take(f.line_number, "original_line"), row.take(f.positive, "quantity")
            if number is not None and quantity is not None:
                by_original.setdefault(target, []).append((row, ReturnLine(number - 1, quantity)))
        else:
            refund = row.amount("amount", currency)
            if refund is not None:
                by_original.setdefault(target, []).append((row, refund))
                _within_total(row, [item for _, item in by_original[target] if isinstance(item, int)])
    out: list[LegacyPurchase | LegacyReturn] = []
    for (original_channel, original_store, original_receipt), items in by_original.items():
        lines = tuple(item for _, item in items if isinstance(item, ReturnLine))
        refunds = [item for _, item in items if isinstance(item, int)]
        if lines and refunds:
            for row, _ in items:
                row.errors.append(
                    f"return of {original_store}/{original_receipt} mixes line returns (original_line set) "
                    "and amount refunds (original_line empty)"
                )
            continue
        if when is None or card is None or currency is None:
            continue
        out.append(
            LegacyReturn(
                f"{store}/{slip}/{original_store}/{original_receipt}", Member(card_number=card), original_channel,
                original_store, original_receipt, slip, "", store, lines, sum(refunds) if refunds else None, currency,
                # The whole slip: a refused return is fixed and re-imported as the slip it came
                # in (its line numbers start at 1); the returns that went through replay.
                when, _origin(source, group),
            )
        )  # fmt: skip
    return [] if any(r.errors for r in group) else out
