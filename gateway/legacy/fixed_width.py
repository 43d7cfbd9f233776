"""Mainframe fixed-width exports: a header, receipts and refunds, and a trailer with a count.

The trailer's record count is the only proof that the transfer delivered the file the
mainframe wrote. When it (or the header/trailer framing) is wrong the file is truncated or
spliced, so nothing of it is imported: every line is quarantined with the reason, and ops
asks for the file again. Within a well-framed file a bad record holds back only its own
receipt (and any other copy of it in the file), and a receipt is read whole (its P and every
L after it) or not at all. Layout tables: LAYOUTS below, mirrored in docs/legacy.md (a test
keeps them equal).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

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
    SourceLine,
    quarantine_all,
)


class Fill(StrEnum):
    """Whether a line may stop before a column's end. Transfers strip trailing blanks, so a
    line that stops inside (or before) a text column lost only blanks and is padded back; a
    column written in full (digits, times, offsets, codes) that the line does not reach was
    cut, and padding it back would read another value (0000000001250 cut to 000000000125)."""

    BLANKS = "blanks"  # text, left-aligned and blank-padded
    FULL = "full"  # every character written: digits right-aligned and zero-padded, times, codes


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    start: int  # 1-based, as mainframe layouts are written
    width: int
    meaning: str
    fill: Fill

    @property
    def end(self) -> int:
        return self.start + self.width - 1

    def cut(self, line: str) -> str:
        return line[self.start - 1 : self.end]


def _columns(*spec: tuple[str, int, str, Fill]) -> tuple[Column, ...]:
    """Columns laid end to end from position 1, so a layout cannot overlap or leave gaps."""
    out, start = [], 1
    for name, width, meaning, fill in spec:
        out.append(Column(name, start, width, meaning, fill))
        start += width
    return tuple(out)


_TEXT, _FULL = Fill.BLANKS, Fill.FULL
_TIME = "YYYYMMDDHHMMSS, the store's local time"
_OFFSET = "+HHMM or -HHMM: the local time's UTC offset"
LAYOUTS: dict[str, tuple[Column, ...]] = {
    "H": _columns(
        ("record_type", 1, "H", _FULL),
        ("producer", 8, "exporting system, text", _TEXT),
        ("created_at", 14, "YYYYMMDDHHMMSS UTC", _FULL),
        ("batch_id", 10, "text", _TEXT),
    ),
    "P": _columns(
        ("record_type", 1, "P: a purchase; its L records follow", _FULL),
        ("store_id", 8, "text", _TEXT),
        ("receipt_id", 20, "text", _TEXT),
        ("receipt_time", 14, _TIME, _FULL),
        ("utc_offset", 5, _OFFSET, _FULL),
        ("card_number", 19, "text", _TEXT),
        ("currency", 3, "ISO 4217 code", _FULL),
        ("line_count", 3, "digits, 001-500: the L records that follow", _FULL),
    ),
    "L": _columns(
        ("record_type", 1, "L: a line of the P record above", _FULL),
        ("sku", 16, "text", _TEXT),
        ("category", 12, "text", _TEXT),
        ("quantity", 5, "digits, at least 1", _FULL),
        ("amount_minor", 13, "digits: line total in minor units of the P record's currency", _FULL),
    ),
    "R": _columns(
        ("record_type", 1, "R: a refund by amount against an earlier receipt", _FULL),
        ("store_id", 8, "text: where the refund happened", _TEXT),
        ("refund_id", 20, "text: the refund slip's id", _TEXT),
        ("refund_time", 14, _TIME, _FULL),
        ("utc_offset", 5, _OFFSET, _FULL),
        ("card_number", 19, "text", _TEXT),
        ("currency", 3, "ISO 4217 code, as the original receipt's", _FULL),
        ("original_store_id", 8, "text", _TEXT),
        ("original_receipt_id", 20, "text", _TEXT),
        ("refund_minor", 13, "digits: refunded amount in minor units", _FULL),
    ),
    "T": _columns(
        ("record_type", 1, "T", _FULL),
        ("record_count", 9, "digits: P, L and R records between H and T", _FULL),
    ),
}


@dataclass(frozen=True, slots=True)
class _Record:
    line: SourceLine
    kind: str
    fields: dict[str, str]
    problem: str  # empty when the record's shape is fine
    field: str = ""  # the column the problem is in, when it is in one


@dataclass
class FixedWidthAdapter:
    name: str = "fixed-width"
    default_channel: str = "pos"

    def parse(self, source: str, data: bytes) -> Iterator[Parsed]:
        records = [_record(line, ascii_ok) for line, ascii_ok in _lines(data)]
        if not records:  # a night without sales is still H and T000000000
            yield Quarantined(source, 1, "the file has no records (no header H, no trailer T); the transfer may"
                              " have delivered nothing", "", field="record_count")  # fmt: skip
            return
        framing = _framing(records)
        if framing is not None:
            at, reason = framing
            for rec in records:
                why = reason if rec.line.number == at else f"file held back: {reason} (line {at})"
                yield Quarantined(source, rec.line.number, why, rec.line.raw, field="record_count")
            return
        # Two passes: a file may carry a receipt (or a refund) twice, and a bad copy holds back
        # the good one, which may be the wrong one and would make the corrected re-send conflict.
        units = list(_units(records[1:-1]))
        bad_copies = _bad_copies(source, units)
        for unit in units:
            yield from _unless_a_copy_is_bad(source, unit, bad_copies)


def _units(body: list[_Record]) -> Iterator[list[_Record]]:
    """Receipts (a P with every L up to the next other record, however many its P announces: a
    receipt with an L left over is held back, not posted without it), refunds, and records
    that are neither, in file order."""
    i = 0
    while i < len(body):
        unit = [body[i]]
        i += 1
        if unit[0].kind == "P":
            while i < len(body) and body[i].kind == "L":
                unit.append(body[i])
                i += 1
        yield unit


def _read(source: str, unit: list[_Record]) -> list[Parsed]:
    head = unit[0]
    if head.kind == "P":
        return list(_purchase(source, unit))
    if head.kind == "R":
        return list(_refund(source, head))
    problem = head.problem or "L record without a P record before it"
    return [Quarantined(source, head.line.number, problem, head.line.raw, field=head.field)]


def _identity(unit: list[_Record]) -> tuple[str, ...] | None:
    """What the ledger knows a receipt or refund by (its natural or idempotency key, less the
    channel every record of the file shares); None when the file does not say."""
    head = unit[0]
    if head.kind not in ("P", "R"):
        return None
    get = head.fields if not head.problem else _readable_columns(head)
    if not get:
        return None
    if head.kind == "P":
        key: tuple[str, ...] = ("P", get.get("store_id", ""), get.get("receipt_id", ""))
    else:
        key = ("R", *(get.get(name, "") for name in ("store_id", "refund_id", "original_store_id",
                                                    "original_receipt_id")))  # fmt: skip
    return key if all(key) else None


def _readable_columns(head: _Record) -> dict[str, str]:
    """The columns of a misshapen P or R record that lie whole in its line (a record cut short
    or running long keeps its key where the layout puts it), so a broken copy of a receipt
    still names it and holds back its other copies. Nothing for a line not in ASCII, whose
    positions cannot be trusted."""
    if not head.line.raw.isascii():
        return {}
    given = len(head.line.raw.rstrip())
    return {c.name: c.cut(head.line.raw).strip() for c in LAYOUTS[head.kind] if c.end <= given}


def _bad_copies(source: str, units: list[list[_Record]]) -> dict[tuple[str, ...], list[int]]:
    """The first lines of every receipt or refund that is held back, by what the ledger knows it by."""
    bad: dict[tuple[str, ...], list[int]] = {}
    for unit in units:
        key = _identity(unit)
        if key is not None and any(isinstance(item, Quarantined) for item in _read(source, unit)):
            bad.setdefault(key, []).append(unit[0].line.number)
    return bad


def _unless_a_copy_is_bad(
    source: str, unit: list[_Record], bad_copies: dict[tuple[str, ...], list[int]]
) -> Iterator[Parsed]:
    """The unit as read or, when another copy of it in the file is held back, held back too."""
    parsed = _read(source, unit)
    key = _identity(unit)
    named = (key[1], key[2]) if key and key[0] == "P" else None
    others = [line for line in bad_copies.get(key, []) if line != unit[0].line.number] if key else []
    if not others or any(isinstance(item, Quarantined) for item in parsed):
        yield from (replace(item, receipt=named) if isinstance(item, Quarantined) else item for item in parsed)
        return
    what = "receipt" if unit[0].kind == "P" else "refund"
    reason = (
        f"{what} held back: line(s) {', '.join(map(str, others))} hold another copy of it that is held back; see there"
    )
    held = quarantine_all(Origin(source, tuple(rec.line for rec in unit)), reason)
    yield from (replace(item, receipt=named) for item in held)


def _lines(data: bytes) -> list[tuple[SourceLine, bool]]:
    """Non-blank lines numbered as in the file, each with whether it is plain ASCII; blank lines
    are neither records nor counted."""
    out = []
    for number, raw in enumerate(data.removeprefix(UTF8_BOM).split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if raw.strip():
            out.append((SourceLine(number, raw.decode("ascii", errors="backslashreplace")), raw.isascii()))
    return out


def _record(line: SourceLine, ascii_ok: bool) -> _Record:
    kind = line.raw[:1]
    layout = LAYOUTS.get(kind)
    if layout is None:
        return _Record(line, kind, {}, f"record type {kind!r} is not one of {', '.join(LAYOUTS)}")
    if not ascii_ok:
        return _Record(line, kind, {}, "line is not ASCII")
    length = layout[-1].end
    if line.raw[length:].strip():
        return _Record(line, kind, {}, f"{kind} record is {length} characters; more follow at {length + 1}")
    # Trailing blanks (stripped by a transfer, or padded on by one) are not counted: a column
    # written in full that ends past the last other character was cut.
    given = len(line.raw.rstrip())
    cut = next((c for c in layout if c.fill is Fill.FULL and c.end > given), None)
    if cut is not None:
        problem = f"{kind} record is {length} characters, {given} given: column {cut.name} is cut"
        return _Record(line, kind, {}, problem, field=cut.name)
    padded = line.raw.ljust(length)  # only blanks of text columns are missing
    return _Record(line, kind, {c.name: c.cut(padded).strip() for c in layout}, "")


def _framing(records: list[_Record]) -> tuple[int, str] | None:
    """(line, reason) when the file (with records) is not exactly H, records, T with the right count."""
    first, last = records[0], records[-1]
    if first.kind == "H" and first.problem:
        return first.line.number, f"the header is unreadable: {first.problem}"
    if last.kind == "T" and last.problem:
        return last.line.number, f"the trailer is unreadable: {last.problem}; the file may be truncated"
    if first.kind != "H" or first.problem:
        return first.line.number, "the first record must be a header (H)"
    if last.kind != "T" or last.problem:
        return last.line.number, "the last record must be a trailer (T); the file may be truncated"
    for rec in records[1:-1]:
        if rec.kind in ("H", "T"):
            return rec.line.number, f"a second {rec.kind} record inside the file; files may be concatenated"
    try:
        count = f.digits(last.fields["record_count"], "record_count")
    except f.FieldError as error:
        return last.line.number, f"column {error.field}: {error.message}"
    found = len(records) - 2
    if count != found:
        return last.line.number, f"trailer record_count is {count} but the file has {found} records between H and T"
    return None


_DIGITS_14 = re.compile(r"^[0-9]{14}$")
_OFFSET_RE = re.compile(r"^[+-][0-9]{4}$")


def _local_time(rec: _Record, time_col: str) -> datetime:
    # strptime alone would read "202612100000" (two digits short) as 2026-12-10 00:00:00.
    if not _DIGITS_14.match(rec.fields[time_col]):
        raise f.FieldError(time_col, f"{rec.fields[time_col]!r} is not YYYYMMDDHHMMSS (14 digits)")
    if not _OFFSET_RE.match(rec.fields["utc_offset"]):
        raise f.FieldError("utc_offset", f"{rec.fields['utc_offset']!r} is not +HHMM or -HHMM")
    text = rec.fields[time_col] + rec.fields["utc_offset"]
    try:
        when = datetime.strptime(text, "%Y%m%d%H%M%S%z")
    except ValueError:
        raise f.FieldError(
            f"{time_col}/utc_offset", f"{rec.fields[time_col]!r} {rec.fields['utc_offset']!r} is not "
            "YYYYMMDDHHMMSS with a +HHMM offset",
        ) from None  # fmt: skip
    return f.instant(when, f"{time_col}/utc_offset")


def _purchase(source: str, group: list[_Record]) -> Iterator[Parsed]:
    head, items = group[0], group[1:]
    origin = Origin(source, tuple(r.line for r in group))
    broken = next((r for r in group if r.problem), None)
    if broken is not None:
        reason = f"{broken.problem} (line {broken.line.number})"
        yield from quarantine_all(origin, reason if broken is head else f"receipt held back: {reason}",
                                  field=broken.field)  # fmt: skip
        return
    get = head.fields
    try:
        count = f.positive(get["line_count"], "line_count")
        if len(items) != count:
            raise f.FieldError("line_count", f"announces {count} L records but {len(items)} follow")
        currency = f.currency(get["currency"])
        lines = tuple(_item(rec, currency) for rec in items)
        member = Member(card_number=f.required(get["card_number"], "card_number"))
        store, receipt = f.required(get["store_id"], "store_id"), f.required(get["receipt_id"], "receipt_id")
        when = _local_time(head, "receipt_time")
    except f.FieldError as error:
        yield from quarantine_all(origin, f"column {error.field}: {error.message}", field=error.field)
        return
    yield LegacyPurchase(f"{store}/{receipt}", member, "", store, receipt, currency, lines, when, origin)


def _item(rec: _Record, currency: str) -> PurchaseLine:
    try:
        return PurchaseLine(
            f.required(rec.fields["sku"], "sku"), f.required(rec.fields["category"], "category"),
            f.positive(rec.fields["quantity"], "quantity"), f.digits(rec.fields["amount_minor"], "amount_minor"),
        )  # fmt: skip
    except f.FieldError as error:
        raise f.FieldError(error.field, f"{error.message} (L record at line {rec.line.number})") from None


def _refund(source: str, rec: _Record) -> Iterator[Parsed]:
    origin = Origin(source, (rec.line,))
    if rec.problem:
        yield from quarantine_all(origin, rec.problem, field=rec.field)
        return
    get = rec.fields
    try:
        currency = f.currency(get["currency"])
        refund = f.positive(get["refund_minor"], "refund_minor")
        member = Member(card_number=f.required(get["card_number"], "card_number"))
        store, slip = f.required(get["store_id"], "store_id"), f.required(get["refund_id"], "refund_id")
        original_store = f.required(get["original_store_id"], "original_store_id")
        original = f.required(get["original_receipt_id"], "original_receipt_id")
        when = _local_time(rec, "refund_time")
    except f.FieldError as error:
        yield from quarantine_all(origin, f"column {error.field}: {error.message}", field=error.field)
        return
    yield LegacyReturn(
        f"{store}/{slip}/{original_store}/{original}", member, "", original_store, original, slip, "", store, (),
        refund, currency, when, origin,
    )  # fmt: skip
