"""What every legacy adapter produces: purchases, returns, or lines it could not read.

Adapters differ only in how they read bytes; from here on a record from a CSV drop, a
mainframe export or a vendor webhook is the same thing, so the importer has one path to the
ledger. Each record remembers the source lines it came from, so a ledger refusal can still
quarantine exactly those lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class SourceLine:
    """One physical line of a source (1-based), kept verbatim for the quarantine file."""

    number: int
    raw: str


@dataclass(frozen=True, slots=True)
class Origin:
    source: str
    lines: tuple[SourceLine, ...]

    @property
    def first_line(self) -> int:
        return self.lines[0].number if self.lines else 0


@dataclass(frozen=True, slots=True)
class Member:
    """Who the record belongs to: a loyalty card number (resolved by the importer) or a member id."""

    card_number: str = ""
    member_id: str = ""

    def __post_init__(self) -> None:
        if bool(self.card_number) == bool(self.member_id):
            raise ValueError("give exactly one of card_number or member_id")


@dataclass(frozen=True, slots=True)
class PurchaseLine:
    sku: str
    category: str
    quantity: int
    amount_minor: int  # line total in the receipt currency


@dataclass(frozen=True, slots=True)
class LegacyPurchase:
    """A receipt. Its natural key (channel, store_id, receipt_id) is what the ledger dedupes on."""

    source_record_id: str
    member: Member
    channel: str  # "" means the import's channel
    store_id: str
    receipt_id: str
    currency: str
    lines: tuple[PurchaseLine, ...]
    receipt_time: datetime  # aware
    origin: Origin

    @property
    def total_minor(self) -> int:
        """Always the sum of the lines: the ledger refuses a total that disagrees with them."""
        return sum(line.amount_minor for line in self.lines)


@dataclass(frozen=True, slots=True)
class ReturnLine:
    line_index: int  # 0-based index into the original receipt's lines
    quantity: int


@dataclass(frozen=True, slots=True)
class LegacyReturn:
    """A return slip against one original receipt: either lines by quantity or a refunded amount."""

    source_record_id: str
    member: Member
    original_channel: str  # "" means the import's channel
    original_store_id: str
    original_receipt_id: str
    return_receipt_id: str
    channel: str  # where returned; "" means the import's channel
    store_id: str
    lines: tuple[ReturnLine, ...]
    refund_minor: int | None
    currency: str
    return_time: datetime | None
    origin: Origin

    def __post_init__(self) -> None:
        if bool(self.lines) == (self.refund_minor is not None):
            raise ValueError("a return has either lines or a refund amount")


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A source line held back, with why. `code` is "PARSE" for adapter refusals, else the
    ledger's gRPC status name; `field` is the source column or the ledger's request field."""

    source: str
    line: int
    reason: str
    raw: str
    code: str = "PARSE"
    field: str = ""
    # (store id, receipt id) of the purchase the line belongs to, when the file names it: a
    # settlement run knows the receipt is in the file, however unreadable the line.
    receipt: tuple[str, str] | None = None


Record = LegacyPurchase | LegacyReturn
Parsed = LegacyPurchase | LegacyReturn | Quarantined


def quarantine_all(origin: Origin, reason: str, *, code: str = "PARSE", field: str = "") -> list[Quarantined]:
    """Every line of a record, held back together: a receipt is fixed and re-sent as a whole."""
    return [Quarantined(origin.source, ln.number, reason, ln.raw, code, field) for ln in origin.lines]
