"""Vendor webhooks: one purchase or return per JSON payload, signed with HMAC-SHA256.

The signature covers the raw body bytes exactly as received (and the timestamp, when the
vendor sends one), so it is checked before the body is parsed: a parser must never see bytes
nobody vouched for. The timestamp window stops an old captured delivery from being replayed
later; a replay inside the window is harmless because the ledger dedupes the receipt.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

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

SIGNATURE_HEADER = "X-Signature"
TIMESTAMP_HEADER = "X-Signature-Timestamp"
DEFAULT_TOLERANCE = timedelta(minutes=5)
_SCHEME = "sha256="
# Unix seconds of at most 11 digits reach year 5138; a datetime cannot hold 12 (year 33658).
MAX_TIMESTAMP_DIGITS = 11
# No field takes a number of more than 18 digits; one past this is refused before int() reads it
# (it is quadratic in the digits and refuses 4,300 of them).
MAX_JSON_INTEGER_DIGITS = 100


class SignatureError(ValueError):
    """The delivery is not proven to come from the vendor (answer 401, do not parse it)."""


def signed_payload(body: bytes, timestamp: str | None) -> bytes:
    return body if timestamp is None else timestamp.encode("ascii") + b"." + body


def sign(secret: bytes, body: bytes, *, timestamp: str | None = None) -> str:
    """The header value a vendor sends; for tests and vendor simulators."""
    return _SCHEME + hmac.new(secret, signed_payload(body, timestamp), hashlib.sha256).hexdigest()


def verify_signature(
    secret: bytes,
    body: bytes,
    header: str | None,
    *,
    timestamp: str | None = None,
    now: datetime | None = None,
    tolerance: timedelta | None = DEFAULT_TOLERANCE,
) -> None:
    """Raises SignatureError unless `header` ("sha256=<hex>", several comma-separated during a
    vendor's key rotation) is the HMAC of `body` and, when a tolerance is set, the signed
    `timestamp` (Unix seconds) is within it of `now`. `tolerance=None` is for vendors that sign
    the body only."""
    if not secret:
        raise SignatureError("no webhook secret is configured")
    if not header:
        raise SignatureError(f"the {SIGNATURE_HEADER} header is missing")
    candidates = [p.strip()[len(_SCHEME) :] for p in header.split(",") if p.strip().startswith(_SCHEME)]
    if not candidates:
        raise SignatureError(f"{SIGNATURE_HEADER} has no {_SCHEME}<hex> signature")
    if tolerance is not None and not timestamp:
        raise SignatureError(f"the {TIMESTAMP_HEADER} header is missing")
    if timestamp is not None and not (
        timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= MAX_TIMESTAMP_DIGITS
    ):
        raise SignatureError(f"{TIMESTAMP_HEADER} {timestamp[:40]!r} is not Unix seconds (at most 11 digits)")
    expected = sign(secret, body, timestamp=timestamp)[len(_SCHEME) :]
    # Every candidate is compared in constant time; no early exit reveals which one was close.
    matches = [hmac.compare_digest(expected.encode(), c.lower().encode("ascii", "replace")) for c in candidates]
    if not any(matches):
        raise SignatureError("signature does not match the body (wrong secret or altered body)")
    if tolerance is not None and timestamp is not None:
        sent = datetime.fromtimestamp(int(timestamp), UTC)
        age = (now or datetime.now(UTC)) - sent
        if abs(age) > tolerance:
            when = "old" if age > timedelta(0) else "in the future"
            raise SignatureError(
                f"timestamp {sent.isoformat()} is {abs(age).total_seconds():.0f} s {when} "
                f"(tolerance {tolerance.total_seconds():.0f} s): a replayed or delayed delivery"
            )


class _PayloadError(ValueError):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


@dataclass
class WebhookAdapter:
    """`default_channel` is the vendor's channel when a payload names none ("web" for a web shop)."""

    name: str = "webhook"
    default_channel: str = "web"

    def parse(self, source: str, data: bytes) -> Iterator[Parsed]:
        data = data.removeprefix(UTF8_BOM)  # JSON parsers may ignore one (RFC 8259, 8.1)
        raw = data.decode("utf-8", errors="backslashreplace")
        origin = Origin(source, (SourceLine(1, raw),))
        try:
            payload = _load(data)
            kind = _text(payload, "type", "$")
            if kind == "purchase":
                yield _purchase(payload, origin)
            elif kind == "return":
                yield _return(payload, origin)
            else:
                raise _PayloadError("$.type", f"{kind!r} is not 'purchase' or 'return'")
        except _PayloadError as error:
            yield Quarantined(source, 1, str(error), raw, field=error.path)
        except f.FieldError as error:
            yield Quarantined(source, 1, f"{error.field}: {error.message}", raw, field=error.field)


def _load(data: bytes) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise _PayloadError("$", f"key(s) {', '.join(twice)} appear twice in one object")
        return dict(pairs)

    def integer(text: str) -> int:
        if len(text.lstrip("-")) > MAX_JSON_INTEGER_DIGITS:
            raise _PayloadError("$", f"a number of {len(text.lstrip('-'))} digits; no field takes more than 18")
        return int(text)

    try:
        payload = json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates, parse_int=integer)
    except UnicodeDecodeError:
        raise _PayloadError("$", "body is not UTF-8") from None
    except json.JSONDecodeError as error:
        raise _PayloadError("$", f"not JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    except _PayloadError:
        raise
    except RecursionError:
        raise _PayloadError("$", "arrays or objects nested too deeply to read") from None
    except ValueError as error:  # what the JSON reader itself refuses beyond the above
        raise _PayloadError("$", f"not readable: {error}") from None
    if not isinstance(payload, dict):
        raise _PayloadError("$", "must be a JSON object")
    return payload


def _text(obj: dict[str, Any], key: str, at: str, *, optional: bool = False) -> str:
    value = obj.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise _PayloadError(f"{at}.{key}", "is missing" if value is None else "must be a string")
    if not _utf8(value):
        raise _PayloadError(f"{at}.{key}", "is not valid Unicode: an unpaired surrogate such as \\ud800")
    if not value.strip() and not optional:
        raise _PayloadError(f"{at}.{key}", "is empty")
    return value.strip()


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _count(obj: dict[str, Any], key: str, at: str, maximum: int = 10**f.MAX_AMOUNT_DIGITS - 1) -> int:
    """A whole number 1..maximum; the default bound is the one file columns have (18 digits)."""
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
        raise _PayloadError(f"{at}.{key}", f"must be a whole number from 1 to {maximum}, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    """A JSON value for a message; a list or object by its kind (it may be nested deeply)."""
    if isinstance(value, list | dict):
        return "a list" if isinstance(value, list) else "an object"
    return json.dumps(value)


def _money(obj: dict[str, Any], key: str, at: str, currency: str) -> int:
    """Amounts are decimal strings ("12.50"): a JSON number may already have been through a float."""
    if isinstance(obj.get(key), int | float) and not isinstance(obj.get(key), bool):
        raise _PayloadError(f"{at}.{key}", 'must be a decimal string such as "12.50", not a JSON number')
    return f.amount_minor(_text(obj, key, at), currency, f"{at}.{key}")


def _member(payload: dict[str, Any]) -> Member:
    card, member_id = _text(payload, "card_number", "$", optional=True), _text(payload, "member_id", "$", optional=True)
    if bool(card) == bool(member_id):
        raise _PayloadError("$.card_number", "give exactly one of card_number or member_id")
    return Member(card_number=card, member_id=member_id)


def _objects(payload: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = payload.get(key)
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise _PayloadError(f"$.{key}", "must be a list of objects")
    return items


def _purchase(payload: dict[str, Any], origin: Origin) -> LegacyPurchase:
    currency = f.currency(_text(payload, "currency", "$"), "$.currency")
    lines = []
    for i, item in enumerate(_objects(payload, "lines")):
        at = f"$.lines[{i}]"
        lines.append(
            PurchaseLine(
                _text(item, "sku", at), _text(item, "category", at), _count(item, "quantity", at),
                _money(item, "amount", at, currency),
            )
        )  # fmt: skip
    if not lines:
        raise _PayloadError("$.lines", "a purchase needs at least one line")
    f.total_minor((line.amount_minor for line in lines), "$.lines")
    if "total" in payload:
        total = _money(payload, "total", "$", currency)
        if total != sum(line.amount_minor for line in lines):
            raise _PayloadError(
                "$.total", f"is {total} minor units but the lines sum to {sum(ln.amount_minor for ln in lines)}"
            )
    return LegacyPurchase(
        _text(payload, "id", "$"), _member(payload), _text(payload, "channel", "$", optional=True),
        _text(payload, "store_id", "$", optional=True), _text(payload, "receipt_id", "$"), currency, tuple(lines),
        f.aware_time(_text(payload, "time", "$"), "$.time"), origin,
    )  # fmt: skip


def _return(payload: dict[str, Any], origin: Origin) -> LegacyReturn:
    currency = f.currency(_text(payload, "currency", "$"), "$.currency")
    original = payload.get("original")
    if not isinstance(original, dict):
        raise _PayloadError("$.original", "must be an object naming the original receipt")
    lines: tuple[ReturnLine, ...] = ()
    refund: int | None = None
    if ("lines" in payload) == ("refund" in payload):
        raise _PayloadError("$.lines", "give either lines (by quantity) or refund (an amount)")
    if "lines" in payload:
        lines = tuple(
            ReturnLine(
                _count(item, "line", f"$.lines[{i}]", f.MAX_RECEIPT_LINES) - 1,
                _count(item, "quantity", f"$.lines[{i}]"),
            )
            for i, item in enumerate(_objects(payload, "lines"))
        )
        if not lines:
            raise _PayloadError("$.lines", "a return by lines needs at least one line")
    else:
        refund = _money(payload, "refund", "$", currency)
    return LegacyReturn(
        _text(payload, "id", "$"), _member(payload), _text(original, "channel", "$.original", optional=True),
        _text(original, "store_id", "$.original", optional=True), _text(original, "receipt_id", "$.original"),
        _text(payload, "return_id", "$"), _text(payload, "channel", "$", optional=True),
        _text(payload, "store_id", "$", optional=True), lines, refund, currency,
        f.aware_time(_text(payload, "time", "$"), "$.time"), origin,
    )  # fmt: skip
