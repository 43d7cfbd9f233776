"""Input checks shared by every entry point; each failure names the request field at fault."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ledger_svc.domain import IdemKey, InvalidArgument, Money, is_valid_id, is_valid_name
from ledger_svc.screening import ScreeningContext
from pointmesh.bounds import KEY_PATTERN, MAX_AMOUNT_MINOR, MAX_POINTS
from pointmesh.currencies import is_known

MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50

# How far ahead of the ledger's clock a caller's instant may be (clocks of tills and phones).
FUTURE_SKEW = timedelta(minutes=5)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def idem_key(key: IdemKey | None, field: str = "idempotency_key") -> IdemKey:
    if key is None or not key.key:
        raise InvalidArgument("an idempotency key is required for every mutation", field=f"{field}.key")
    if not KEY_PATTERN.match(key.key):
        raise InvalidArgument("must be 1..128 printable ASCII characters without spaces", field=f"{field}.key")
    namespace = key.namespace or "default"
    if not is_valid_name(namespace):
        raise InvalidArgument(f"namespace {namespace!r} is not a valid name", field=f"{field}.namespace")
    return IdemKey(namespace, key.key)


def member_id(value: str, field: str = "member_id") -> str:
    if not value:
        raise InvalidArgument("is required", field=field)
    if not is_valid_id(value, "m"):
        raise InvalidArgument(f"{value!r} is not a member id (expected m_ followed by 28 hex digits)", field=field)
    return value


def object_id(value: str, prefix: str, field: str) -> str:
    if not value:
        raise InvalidArgument("is required", field=field)
    if not is_valid_id(value, prefix):
        raise InvalidArgument(f"{value!r} is not a valid id (expected {prefix}_...)", field=field)
    return value


def positive_points(value: int, field: str = "points") -> int:
    if value <= 0:
        raise InvalidArgument(f"must be greater than zero, got {value}", field=field)
    if value > MAX_POINTS:
        raise InvalidArgument(f"must be at most {MAX_POINTS}, got {value}", field=field)
    return value


def unit(value: str, units: tuple[str, ...], field: str = "unit") -> str:
    chosen = value or units[0]
    if chosen not in units:
        raise InvalidArgument(f"unknown unit {chosen!r}; configured units are {', '.join(units)}", field=field)
    return chosen


def money(value: Money, field: str, *, allow_zero: bool = False) -> Money:
    if not is_known(value.currency):
        raise InvalidArgument(f"{value.currency!r} is not an ISO 4217 code", field=f"{field}.currency")
    amount(value.amount_minor, f"{field}.amount_minor", allow_zero=allow_zero)
    return value


def amount(value: int, field: str, *, allow_zero: bool = False) -> int:
    """A money amount in minor units: positive (or zero) and at most MAX_AMOUNT_MINOR."""
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidArgument(f"must be positive, got {value}", field=field)
    if value > MAX_AMOUNT_MINOR:
        raise InvalidArgument(f"must be at most {MAX_AMOUNT_MINOR} minor units, got {value}", field=field)
    return value


def name(value: str, field: str) -> str:
    if not is_valid_name(value):
        raise InvalidArgument(f"{value!r} must be 1..64 of letters, digits and _.:-", field=field)
    return value


def required_text(value: str, field: str, max_len: int = 500) -> str:
    if not value.strip():
        raise InvalidArgument("is required", field=field)
    if len(value) > max_len:
        raise InvalidArgument(f"must be at most {max_len} characters", field=field)
    return value


def optional_text(value: str, field: str, max_len: int = 200) -> str:
    if len(value) > max_len:
        raise InvalidArgument(f"must be at most {max_len} characters", field=field)
    return value


def page_size(value: int, field: str = "page.page_size") -> int:
    if value < 0 or value > MAX_PAGE_SIZE:
        raise InvalidArgument(f"must be between 1 and {MAX_PAGE_SIZE}, got {value}", field=field)
    return value or DEFAULT_PAGE_SIZE


def hold_timeout(value: timedelta | None, default: timedelta, maximum: timedelta) -> timedelta:
    if value is None:
        return default
    if value < timedelta(seconds=1) or value > maximum:  # shorter: gone before the till could capture it
        raise InvalidArgument(f"must be between 1 and {int(maximum.total_seconds())} seconds (the ledger's hold maximum)",
                              field="timeout")  # fmt: skip
    return value


def screening_context(ctx: ScreeningContext, now: datetime, field: str = "context") -> ScreeningContext:
    """Refused here what fraud_svc would refuse: its refusal is decided by the operation's
    policy without a score, which lets a small spend through fail-open, so a caller able to
    send a refused field could choose to go unscored (a blocked device included)."""
    for name in ("channel", "store_id", "device_id", "ip", "card_hash", "employee_card"):
        optional_text(getattr(ctx, name), f"{field}.{name}", max_len=128)
    changed = ctx.contact_changed_at
    if changed is not None and not EPOCH <= changed <= now + FUTURE_SKEW:
        raise InvalidArgument(
            f"must lie between 1970-01-01 and {FUTURE_SKEW} ahead of the ledger's clock ({now.isoformat()}),"
            f" got {changed.isoformat()}", field=f"{field}.contact_changed_at",
        )  # fmt: skip
    return ctx
