"""Field parsers shared by the adapters; each failure names the field and says why.

Money is parsed from decimal text digit by digit, never through float, and a text with more
decimals than the currency has is refused rather than rounded: "12.345 EUR" is a data error a
person must look at, not a value to guess.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime

from pointmesh import currencies
from pointmesh.timestamps import utc_instant

# int64 minor units; 18 digits keep every parsed amount far inside it.
MAX_AMOUNT_DIGITS = 18
# What the ledger holds in int64: a receipt's lines (or a slip's refunds) must sum inside it too,
# and ten 18-digit lines do not.
MAX_TOTAL_MINOR = 2**63 - 1
# The ledger takes at most 500 lines per receipt, so a returned line number is 1..500.
MAX_RECEIPT_LINES = 500
_DECIMAL = re.compile(r"^(?P<whole>[0-9]+)(?:\.(?P<frac>[0-9]+))?$")
_INTEGER = re.compile(r"^[0-9]+$")


class FieldError(ValueError):
    """A field that cannot be read; `field` is the column or JSON path, `message` says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def required(value: str | None, field: str) -> str:
    if value is None:
        raise FieldError(field, "is missing")
    text = value.strip()
    if not text:
        raise FieldError(field, "is empty")
    return text


def currency(value: str | None, field: str = "currency") -> str:
    code = required(value, field)
    if not currencies.is_known(code):
        raise FieldError(field, f"{code!r} is not an ISO 4217 currency code we know (upper case, e.g. EUR)")
    return code


def amount_minor(text: str | None, currency_code: str, field: str = "amount") -> int:
    """Decimal text in major units -> exact minor units: "12.50" EUR -> 1250, "1000" JPY -> 1000."""
    value = required(text, field)
    match = _DECIMAL.match(value)
    if match is None:
        raise FieldError(field, f"{value!r} is not a decimal amount like 12.50 (digits, one '.', no sign)")
    whole, frac = match["whole"], match["frac"] or ""
    places = currencies.exponent(currency_code)
    if len(frac) > places:
        raise FieldError(field, f"{value!r} has {_decimals(len(frac))} but {currency_code} has {_decimals(places)}")
    minor_text = (whole + frac.ljust(places, "0")).lstrip("0") or "0"
    if len(minor_text) > MAX_AMOUNT_DIGITS:
        raise FieldError(field, f"{value!r} is too large")
    return int(minor_text)


def _decimals(n: int) -> str:
    return "no decimals" if n == 0 else f"{n} decimal{'s' if n > 1 else ''}"


def digits(text: str | None, field: str) -> int:
    """A non-negative integer written as plain digits (no sign, no exponent, no spaces inside)."""
    value = required(text, field)
    if not _INTEGER.match(value):
        raise FieldError(field, f"{value!r} is not a whole number")
    significant = value.lstrip("0") or "0"  # leading zeros must not reach int(): it refuses 4,300+ digits
    if len(significant) > MAX_AMOUNT_DIGITS:
        raise FieldError(field, f"{_shown(value)} is too large")
    return int(significant)


def _shown(value: str) -> str:
    """A value for a message, cut short: a reason quotes the field, not a 5,000-digit column."""
    return repr(value) if len(value) <= 40 else f"{value[:20]!r}...({len(value)} characters)"


def positive(text: str | None, field: str) -> int:
    number = digits(text, field)
    if number <= 0:
        raise FieldError(field, f"must be at least 1, got {number}")
    return number


def line_number(text: str | None, field: str) -> int:
    """A 1-based line of a receipt the ledger could hold."""
    number = positive(text, field)
    if number > MAX_RECEIPT_LINES:
        raise FieldError(field, f"line {number} cannot exist: a receipt has at most {MAX_RECEIPT_LINES} lines")
    return number


def total_minor(amounts: Iterable[int], field: str) -> int:
    """The sum of a receipt's amounts, refused when the ledger's int64 could not hold it."""
    total = sum(amounts)
    if total > MAX_TOTAL_MINOR:
        raise FieldError(
            field, f"the amounts sum to {total} minor units, more than the ledger holds ({MAX_TOTAL_MINOR})"
        )
    return total


def aware_time(text: str | None, field: str) -> datetime:
    """ISO-8601 with a UTC offset ("2026-01-05T09:30:00+02:00" or "...Z"); local times are refused
    because the receipt's instant decides campaigns and expiry."""
    value = required(text, field)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise FieldError(field, f"{value!r} is not an ISO-8601 date-time") from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise FieldError(field, f"{value!r} has no UTC offset (add Z or +hh:mm)")
    return instant(when, field)


def instant(when: datetime, field: str) -> datetime:
    """An aware time a ledger Timestamp can hold: its UTC value within years 1..9999."""
    try:
        utc_instant(when)
    except ValueError as error:
        raise FieldError(field, str(error)) from None
    return when
