"""The program document marketing edits: a declarative rule set, validated before it can run.

A file is parsed by pydantic (shape, types, ranges) and then checked for meaning (references
between its parts, time zones that exist). Every problem is reported with the path of the bad
field, e.g. `rules[3].when.time_window.start`, so the person who edited the YAML finds it.
Decimals (rates, multipliers) are written as strings or integers, never as floats, and are
held as exact fractions.
"""

from __future__ import annotations

import ast
import json
import re
from datetime import datetime
from enum import StrEnum
from fractions import Fraction
from typing import Annotated, Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pointmesh.currencies import is_known
from pointmesh.strict_files import AmbiguousNumber, DuplicateKey, load_strict

# \A..\Z, not ^..$: `$` also matches before a trailing newline, so "pos\n" would pass.
NAME_RE = re.compile(r"\A[A-Za-z0-9_.:\-]{1,64}\Z")
_DECIMAL_RE = re.compile(r"\A\d{1,9}(\.\d{1,9})?\Z")
_HHMM_RE = re.compile(r"\A([01]\d|2[0-3]):[0-5]\d\Z")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class ProgramInvalid(Exception):
    """A program document that cannot be published; `errors` holds (path, message) pairs."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{path}: {message}" for path, message in errors[:5]))


def _text(value: Any) -> str:
    """Text only: YAML reads `!!binary` as bytes, checks that passed over anything but a str let
    them by, and pydantic's lax mode then made them text no check had looked at."""
    if not isinstance(value, str):
        raise ValueError(f"must be text, got {type(value).__name__}")
    return value


def _stored(info: ValidationInfo) -> bool:
    """Whether a version published before is being read back (`validate_program(stored=True)`)."""
    return bool(info.context and info.context.get("stored"))


def _as_served(value: str, info: ValidationInfo) -> str:
    """Releases before 2026-12-05 matched names, times and decimals with `$`, which also takes a
    final newline: a version they published ("2\n") is read as it was served ("2"). These fields
    and attribute values only (_attribute_value): other text reads back exactly as published, as
    the replica that published it holds it."""
    return value[:-1] if value.endswith("\n") and _stored(info) else value


def _name(value: Any, info: ValidationInfo) -> str:
    text = _as_served(_text(value), info)
    if not NAME_RE.fullmatch(text):
        raise ValueError(f"{text!r} must be 1..64 of letters, digits and _.:-")
    return text


def _decimal(value: Any, info: ValidationInfo) -> str:
    """Accepts 2, '2', '1.5'; refuses floats so no binary rounding ever enters a rate."""
    if isinstance(value, (bool, float)):
        raise ValueError("write decimals as a quoted string, e.g. '1.5', so they stay exact")
    if isinstance(value, int):
        value = str(value)
    text = _as_served(value, info) if isinstance(value, str) else None
    if text is None or not _DECIMAL_RE.fullmatch(text):
        raise ValueError(f"{value!r} is not a non-negative decimal like '1.5'")
    return text


def _currency(value: Any) -> str:
    text = _text(value)
    if not is_known(text):
        raise ValueError(f"{text!r} is not an ISO 4217 currency code we know")
    return text


def _hhmm(value: Any, info: ValidationInfo) -> str:
    text = _as_served(_text(value), info)
    if not _HHMM_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a time of day HH:MM (00:00..23:59)")
    return text


# Names the zone database carries that mean "whatever this host says": a program priced by
# them would change with the machine it runs on.
_HOST_ZONES = frozenset({"localtime", "posixrules", "Factory"})
# Copies of the database some hosts install beside it: `right/` counts leap seconds, so zoneinfo
# moves its DST switches 27 s late; `posix/` duplicates the plain names. Refused at publish;
# a version stored with one keeps loading where the host has it.
_VARIANT_TREES = frozenset({"right", "posix"})


def _timezone(value: Any, info: ValidationInfo) -> str:
    text = _text(value)
    tree, _, zone = text.partition("/")
    if zone and tree.lower() in _VARIANT_TREES and not _stored(info):
        raise ValueError(f"{text!r} is a copy of a zone only some hosts have; write {zone!r}")
    try:
        if text in _HOST_ZONES:
            raise ValueError(text)
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{text!r} is not an IANA time zone (e.g. Europe/Helsinki)") from None
    return text


# C0 and C1 controls (line breaks, tabs, escapes) and the Unicode line and paragraph separators.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


# Free text is shown to people, and every YAML alias of it is stored again: a 900 kB name used
# twenty times made an 18 MB version. Refused at publish; a stored version keeps its text.
MAX_LABEL_CHARS = 200
MAX_DESCRIPTION_CHARS = 10_000


def _label(value: Any, info: ValidationInfo) -> str:
    """A one-line name people read (a store's, a rule's, a tier's): `name: |` in YAML adds a line
    break no app shows. Refused at publish; a stored version keeps the text it was served with."""
    text = _text(value)
    if not _stored(info) and len(text) > MAX_LABEL_CHARS:
        raise ValueError(f"is {len(text)} characters long; a name may have at most {MAX_LABEL_CHARS}")
    if not _stored(info) and _CONTROL_RE.search(text):
        raise ValueError(f"{text!r} holds a line break or other control character; write it on one line")
    return text


def _description(value: Any, info: ValidationInfo) -> str:
    """The program's description, which may span lines but not books (see MAX_DESCRIPTION_CHARS)."""
    text = _text(value)
    if not _stored(info) and len(text) > MAX_DESCRIPTION_CHARS:
        raise ValueError(f"is {len(text)} characters long; a description may have at most {MAX_DESCRIPTION_CHARS}")
    return text


def _attribute_value(value: Any, info: ValidationInfo) -> str:
    """A member attribute matches only when equal, and no retailer means "gold\n" (what `club: |`
    in YAML gives) rather than "gold": refused at publish. A stored version is read without its
    final newline, as every reload has read it since 2026-12-05, so its meaning does not move."""
    text = _text(value)
    if _stored(info):
        return text.removesuffix("\n")
    if _CONTROL_RE.search(text):
        raise ValueError(
            f"{text!r} holds a line break or other control character; a member attribute must equal "
            "the value exactly, so write the value alone"
        )
    return text


Name = Annotated[str, BeforeValidator(_name)]
DecimalText = Annotated[str, BeforeValidator(_decimal)]
Currency = Annotated[str, BeforeValidator(_currency)]
TimeOfDay = Annotated[str, BeforeValidator(_hhmm)]
TimeZoneName = Annotated[str, BeforeValidator(_timezone)]
Label = Annotated[str, BeforeValidator(_label)]
AttributeValue = Annotated[str, BeforeValidator(_attribute_value)]
Description = Annotated[str, BeforeValidator(_description)]


def _not_bool(value: object) -> object:
    # YAML reads yes/no/on/off as booleans and pydantic's lax mode turns them into 1 and 0:
    # `bonus_points: yes` must be refused, not paid as one point. A float is refused even when
    # whole: YAML and JSON parse `99.99999999999999999` (or `1e2`) to a binary float before
    # anyone looks, and pydantic then takes 100.0 as 100, a rate nobody wrote.
    if isinstance(value, bool):
        raise ValueError(f"must be a whole number, got {value!r}")
    if isinstance(value, float):
        raise ValueError(f"must be a whole number written without a decimal point or exponent, got {value!r}")
    return value


Points = Annotated[int, BeforeValidator(_not_bool), Field(ge=0, le=10**12)]
PositiveInt = Annotated[int, BeforeValidator(_not_bool), Field(gt=0, le=10**12)]
T = TypeVar("T")
# A condition list that is present must name something: `channels: []` would silently never match.
NonEmpty = Annotated[list[T], Field(min_length=1)]


def fraction(text: str) -> Fraction:
    return Fraction(text)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class Store(_Strict):
    id: Name
    timezone: TimeZoneName
    region: Name | None = None
    name: Label = ""


class TimeWindow(_Strict):
    """Store-local time of day; end is exclusive and may be before start (wraps past midnight)."""

    start: TimeOfDay
    end: TimeOfDay

    @model_validator(mode="after")
    def _not_empty(self) -> TimeWindow:
        if self.start == self.end:
            raise ValueError("start and end are equal: the window would be empty")
        return self


class DateRange(_Strict):
    """A campaign's validity. A time without offset is store-local; with an offset, an instant."""

    start: datetime | None = None
    end: datetime | None = None

    @field_validator("start", "end")
    @classmethod
    def _whole_minute(cls, value: datetime | None) -> datetime | None:
        """The engine decides place-and-time conditions once per minute, so bounds are minutes."""
        if value is not None and (value.second or value.microsecond):
            raise ValueError("campaign bounds are whole minutes; drop the seconds (the end is exclusive)")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> DateRange:
        if self.start is None and self.end is None:
            raise ValueError("give start, end or both")
        if self.start is not None and self.end is not None:
            if (self.start.tzinfo is None) != (self.end.tzinfo is None):
                raise ValueError("start and end must both have an offset or both be store-local")
            if self.end <= self.start:
                raise ValueError("end must be after start")
        return self


class PurchaseNumber(_Strict):
    """The member's nth purchase in the program: `equals: 1` is the first, `every: 5` each fifth."""

    equals: PositiveInt | None = None
    every: PositiveInt | None = None

    @model_validator(mode="after")
    def _one(self) -> PurchaseNumber:
        if (self.equals is None) == (self.every is None):
            raise ValueError("set exactly one of equals or every")
        return self


class MoneyAtLeast(_Strict):
    currency: Currency
    amount_minor: Points


class DayOfWeek(StrEnum):
    MON = "mon"
    TUE = "tue"
    WED = "wed"
    THU = "thu"
    FRI = "fri"
    SAT = "sat"
    SUN = "sun"


class When(_Strict):
    """Conditions, all of which must hold. Line conditions pick the lines a rule applies to."""

    channels: NonEmpty[Name] | None = None
    stores: NonEmpty[Name] | None = None
    regions: NonEmpty[Name] | None = None
    days_of_week: NonEmpty[DayOfWeek] | None = None
    time_window: TimeWindow | None = None
    date_range: DateRange | None = None
    basket_total_at_least: MoneyAtLeast | None = None
    tiers: NonEmpty[Name] | None = None
    segments: NonEmpty[Name] | None = None
    attributes: dict[Name, AttributeValue] | None = None
    purchase_number: PurchaseNumber | None = None
    categories: NonEmpty[Name] | None = None
    skus: NonEmpty[Name] | None = None
    line_amount_at_least: MoneyAtLeast | None = None


class MultiplierScope(StrEnum):
    LINE = "line"
    BASKET = "basket"


class Effect(_Strict):
    """Exactly one of: a multiplier on the base points of the qualifying lines, a fixed bonus
    once per receipt, or a bonus per qualifying item."""

    multiplier: DecimalText | None = None
    per: MultiplierScope = MultiplierScope.LINE
    compound: bool = False
    bonus_points: PositiveInt | None = None
    bonus_points_per_item: PositiveInt | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Effect:
        chosen = [self.multiplier, self.bonus_points, self.bonus_points_per_item]
        if sum(x is not None for x in chosen) != 1:
            raise ValueError("set exactly one of multiplier, bonus_points or bonus_points_per_item")
        if self.multiplier is not None and Fraction(self.multiplier) <= 1:
            raise ValueError("multiplier must be greater than 1 (it adds to the base earn)")
        if self.compound and self.per != MultiplierScope.LINE:
            raise ValueError("compound applies to line multipliers only")
        return self


class Caps(_Strict):
    per_line: PositiveInt | None = None
    per_receipt: PositiveInt | None = None
    per_member_per_day: PositiveInt | None = None
    per_member_per_campaign: PositiveInt | None = None

    @model_validator(mode="after")
    def _one_member_cap(self) -> Caps:
        """A component carries one guard with one counter, so a rule has at most one member cap."""
        if self.per_member_per_day is not None and self.per_member_per_campaign is not None:
            raise ValueError("set at most one of per_member_per_day and per_member_per_campaign")
        return self


class Rule(_Strict):
    id: Name
    name: Label = ""
    unit: Name = "points"
    priority: Annotated[int, BeforeValidator(_not_bool), Field(ge=0, le=1_000_000)] = 100
    group: Name | None = None
    when: When = When()
    effect: Effect
    caps: Caps = Caps()


class GroupMode(StrEnum):
    BEST_OF = "best_of"
    ADDITIVE = "additive"


class Group(_Strict):
    id: Name
    mode: GroupMode


class BaseRate(_Strict):
    """`points` per `per_minor` minor units of `currency`, e.g. 1 point per 100 cents."""

    currency: Currency
    unit: Name = "points"
    points: PositiveInt
    per_minor: PositiveInt


class FxRate(_Strict):
    """How many units of `currency` one unit of the base currency buys (1 EUR = 161.5 JPY)."""

    currency: Currency
    per_base: DecimalText

    @field_validator("per_base")
    @classmethod
    def _positive(cls, value: str) -> str:
        if Fraction(value) == 0:
            raise ValueError("must be greater than zero")
        return value


class Fx(_Strict):
    base_currency: Currency
    as_of: datetime | None = None
    rates: list[FxRate] = []


class TierWindow(StrEnum):
    CALENDAR_YEAR = "calendar_year"
    ROLLING_12_MONTHS = "rolling_12_months"


class TierLevel(_Strict):
    code: Name
    threshold: Points
    name: Label = ""


class Tiers(_Strict):
    """Qualification on a unit's earnings (e.g. tier_credits) over a window; the first level is
    the entry level and must have threshold 0."""

    metric_unit: Name = "tier_credits"
    window: TierWindow = TierWindow.CALENDAR_YEAR
    downgrade_grace_days: Annotated[int, BeforeValidator(_not_bool), Field(ge=0, le=366)] = 30
    levels: list[TierLevel]


class PointValue(_Strict):
    """Redeeming `points` pays `amount_minor` of `currency` (100 points = 1.00 EUR)."""

    currency: Currency
    points: PositiveInt
    amount_minor: PositiveInt


class Redemption(_Strict):
    unit: Name = "points"
    values: list[PointValue] = []
    minimum_points: Points = 0
    max_share_percent: Annotated[int, BeforeValidator(_not_bool), Field(ge=1, le=100)] = 100


class Rounding(StrEnum):
    FLOOR = "floor"
    HALF_UP = "half_up"


class ReturnBonusPolicy(StrEnum):
    KEEP = "keep"
    CLAW_BACK = "claw_back"


class Policy(_Strict):
    rounding: Rounding = Rounding.FLOOR
    expiry_days: Annotated[int, BeforeValidator(_not_bool), Field(ge=1, le=3660)] | None = 365
    release_after_days: Annotated[int, BeforeValidator(_not_bool), Field(ge=0, le=365)] = 0
    max_lateness_days: Annotated[int, BeforeValidator(_not_bool), Field(ge=0, le=3660)] = 30
    basket_bonus_on_return: ReturnBonusPolicy = ReturnBonusPolicy.CLAW_BACK

    @field_validator("release_after_days")
    @classmethod
    def _released_before_expiry(cls, value: int, info: ValidationInfo) -> int:
        """Points still pending when their lot expires could never be spent (the ledger refuses
        such an Earn too)."""
        expiry = info.data.get("expiry_days")
        if isinstance(expiry, int) and value >= expiry:
            raise ValueError(f"must be less than expiry_days ({expiry}): points would expire before they are released")
        return value


class GameReward(_Strict):
    points: PositiveInt
    unit: Name = "points"


class GameMatch(_Strict):
    """Which purchases count; empty lists mean any channel, store or category."""

    channels: list[Name] = []
    stores: list[Name] = []
    categories: list[Name] = []
    min_total: MoneyAtLeast | None = None


class Distinct(StrEnum):
    PURCHASE = "purchase"
    STORE = "store"
    CATEGORY = "category"
    CHANNEL = "channel"
    DAY = "day"


class Achievement(_Strict):
    """Completed once, when `count` distinct things (purchases, stores, categories, ...) matched."""

    id: Name
    name: Label
    match: GameMatch = GameMatch()
    count: PositiveInt = 1
    distinct: Distinct = Distinct.PURCHASE
    reward: GameReward


class Streak(_Strict):
    """A matching purchase in each of `weeks` consecutive ISO weeks (program timezone); a missed
    week starts the count again, and a streak completed pays again only after it broke."""

    id: Name
    name: Label
    match: GameMatch = GameMatch()
    weeks: PositiveInt
    reward: GameReward


class Challenge(_Strict):
    """`purchases` matching purchases with receipt times in [starts, ends); pays once."""

    id: Name
    name: Label
    starts: datetime
    ends: datetime
    match: GameMatch = GameMatch()
    purchases: PositiveInt
    opt_in: bool = False
    reward: GameReward

    @model_validator(mode="after")
    def _window(self) -> Challenge:
        if self.starts.tzinfo is None or self.ends.tzinfo is None:
            raise ValueError("starts and ends need an offset (a challenge is one instant range for all stores)")
        if self.ends <= self.starts:
            raise ValueError("ends must be after starts")
        return self


class ExperimentArm(_Strict):
    """A share of members (percent) and the experiment rules that apply to them only."""

    id: Name
    allocation: PositiveInt
    rules: list[Name] = []


class Experiment(_Strict):
    """Members are assigned an arm by a salted hash of their id: stable, and independent
    between experiments with different salts. Rules an arm names apply only to that arm's
    members while the experiment runs; every accrual is tagged with the member's arm."""

    id: Name
    name: Label = ""
    salt: Name
    starts: datetime
    ends: datetime
    control: Name
    arms: list[ExperimentArm]

    @model_validator(mode="after")
    def _arms(self) -> Experiment:
        if self.starts.tzinfo is None or self.ends.tzinfo is None:
            raise ValueError("starts and ends need an offset")
        if self.ends <= self.starts:
            raise ValueError("ends must be after starts")
        if len(self.arms) < 2:
            raise ValueError("an experiment needs at least two arms")
        if sum(a.allocation for a in self.arms) != 100:
            raise ValueError(f"arm allocations must add up to 100, got {sum(a.allocation for a in self.arms)}")
        if self.control not in {a.id for a in self.arms}:
            raise ValueError(f"control {self.control!r} is not one of the arms")
        return self


class Gamification(_Strict):
    achievements: list[Achievement] = []
    streaks: list[Streak] = []
    challenges: list[Challenge] = []
    # Days after its receipt from which what a purchase gave is final: a return or a rejected
    # review later than that takes back its points (the ledger's business) but not its progress,
    # so the store need not keep each purchase's share for ever (docs/gamification.md, Retention).
    final_after_days: Annotated[int, BeforeValidator(_not_bool), Field(ge=1, le=3660)] = 365


class Program(_Strict):
    program: Name
    description: Description = ""
    default_timezone: TimeZoneName
    units: list[Name] = ["points"]
    channels: list[Name]
    stores: list[Store] = []
    base_rates: list[BaseRate]
    fx: Fx | None = None
    groups: list[Group] = []
    rules: list[Rule] = []
    tiers: Tiers | None = None
    redemption: Redemption | None = None
    policy: Policy = Policy()
    gamification: Gamification = Gamification()
    experiments: list[Experiment] = []


def _path(loc: tuple[int | str, ...]) -> str:
    out, previous = "", ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":  # the key itself is bad (an attribute's name): `attributes['club level']`
            out = out.removesuffix(f".{previous}") + f"[{previous!r}]"
        elif part.startswith("function-") or part in {"str", "int", "list", "dict"}:
            continue
        else:
            out += f".{part}" if out else part
        previous = str(part)
    return out


_PATH_STEP = re.compile(r"\[(\d+)\]|\[('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\]|\.?([^.\[]+)")


def _in_document_order(errors: list[tuple[str, str]], data: dict[str, Any]) -> list[tuple[str, str]]:
    """Problems in the order the document is written (the schema's order is not the file's): by
    where each path's steps sit in the mapping as read (keys keep the file's order), a field
    the document lacks after those it has, at its level."""

    def rank(path: str) -> tuple[int, ...]:
        ranks: list[int] = []
        node: Any = data
        for index, quoted, name in _PATH_STEP.findall(path):
            step: int | str = int(index) if index else ast.literal_eval(quoted) if quoted else name
            if isinstance(node, dict) and isinstance(step, str):
                keys = list(node)
                ranks.append(keys.index(step) if step in keys else len(keys))
                node = node.get(step)
            elif isinstance(node, list) and isinstance(step, int):
                ranks.append(step)
                node = node[step] if step < len(node) else None
            else:
                ranks.append(1 << 30)
                node = None
        return tuple(ranks)

    return sorted(errors, key=lambda e: rank(e[0]))


def _duplicates(path: str, ids: list[str]) -> list[tuple[str, str]]:
    seen: set[str] = set()
    errors = []
    for i, item in enumerate(ids):
        if item in seen:
            errors.append((f"{path}[{i}]", f"{item!r} is listed twice"))
        seen.add(item)
    return errors


def _meaning_errors(p: Program, *, publishing: bool = True) -> list[tuple[str, str]]:
    """Checks pydantic cannot do field by field: references and coverage. Checks added after
    versions were published under looser ones (`publishing` only) refuse new documents but not
    stored versions, whose meaning they do not change: a live program keeps serving."""
    errors: list[tuple[str, str]] = []
    units, channels = set(p.units), set(p.channels)
    stores = {s.id for s in p.stores}
    regions = {s.region for s in p.stores if s.region}
    groups = {g.id for g in p.groups}
    tiers = {t.code for t in p.tiers.levels} if p.tiers else set()
    errors += _duplicates("units", p.units) + _duplicates("channels", p.channels)
    errors += _duplicates("stores", [s.id for s in p.stores]) + _duplicates("rules", [r.id for r in p.rules])
    errors += _duplicates("groups", [g.id for g in p.groups])
    errors += _duplicates("base_rates", [f"{b.currency}/{b.unit}" for b in p.base_rates])
    if publishing:  # a version that refuses every basket would displace the one that works
        if not p.channels:
            errors.append(("channels", "names no channel: every purchase would be refused"))
        if not p.base_rates:
            errors.append(("base_rates", "lists no base rate: no basket's currency could be priced"))
    fx_currencies = {r.currency for r in p.fx.rates} if p.fx else set()

    def convertible(currency: str) -> bool:
        """Whether a basket total can be compared with an amount in `currency` (see FX)."""
        return (
            currency == (p.fx.base_currency if p.fx else None)
            or currency in fx_currencies
            or any(b.currency == currency for b in p.base_rates)
        )

    for i, rate in enumerate(p.base_rates):
        if rate.unit not in units:
            errors.append((f"base_rates[{i}].unit", f"{rate.unit!r} is not one of units {sorted(units)}"))
    if p.fx is not None:
        errors += _duplicates("fx.rates", [r.currency for r in p.fx.rates])
        if not any(b.currency == p.fx.base_currency for b in p.base_rates):
            errors.append(("fx.base_currency", f"no base rate earns in {p.fx.base_currency}"))
        for i, fx in enumerate(p.fx.rates):
            if fx.currency == p.fx.base_currency:
                errors.append((f"fx.rates[{i}].currency", "is the base currency itself"))
    for i, rule in enumerate(p.rules):
        at = f"rules[{i}]"
        if rule.unit not in units:
            errors.append((f"{at}.unit", f"{rule.unit!r} is not one of units {sorted(units)}"))
        if rule.group is not None and rule.group not in groups:
            errors.append((f"{at}.group", f"{rule.group!r} is not a declared group"))
        w = rule.when
        for field, listed, known in (
            ("channels", w.channels, channels), ("stores", w.stores, stores),
            ("regions", w.regions, regions), ("tiers", w.tiers, tiers),
        ):  # fmt: skip
            for j, item in enumerate(listed or []):
                if item not in known:
                    errors.append((f"{at}.when.{field}[{j}]", f"{item!r} is not declared in the program"))
        for field, money in (
            ("basket_total_at_least", w.basket_total_at_least),
            ("line_amount_at_least", w.line_amount_at_least),
        ):
            if money is not None and not convertible(money.currency):
                errors.append(
                    (f"{at}.when.{field}.currency", f"{money.currency} has neither a base rate nor an FX rate")
                )
        effect = rule.effect
        if (
            publishing
            and rule.caps.per_line is not None
            and (
                effect.bonus_points is not None
                or (effect.multiplier is not None and effect.per == MultiplierScope.BASKET)
            )
        ):
            kind = "bonus_points" if effect.bonus_points is not None else "a per: basket multiplier"
            errors.append((
                f"{at}.caps.per_line",
                f"{kind} pays one basket component, not one per line, so a per-line cap would never apply; "
                "use per_receipt",
            ))  # fmt: skip
        if rule.caps.per_member_per_campaign is not None and w.date_range is None:
            errors.append((f"{at}.caps.per_member_per_campaign", "needs when.date_range to say what the campaign is"))
    if p.tiers is not None:
        if p.tiers.metric_unit not in units:
            errors.append(("tiers.metric_unit", f"{p.tiers.metric_unit!r} is not one of units {sorted(units)}"))
        levels = p.tiers.levels
        if not levels:
            errors.append(("tiers.levels", "at least one level is needed"))
        elif levels[0].threshold != 0:
            errors.append(("tiers.levels[0].threshold", "the entry level must have threshold 0"))
        for j in range(1, len(levels)):
            if levels[j].threshold <= levels[j - 1].threshold:
                errors.append((f"tiers.levels[{j}].threshold", "thresholds must increase level by level"))
        errors += _duplicates("tiers.levels", [t.code for t in levels])
    if p.redemption is not None:
        if p.redemption.unit not in units:
            errors.append(("redemption.unit", f"{p.redemption.unit!r} is not one of units {sorted(units)}"))
        if publishing:  # one value per currency: with two, which one pays would depend on their order
            errors += _duplicates("redemption.values", [v.currency for v in p.redemption.values])
    rule_ids = {r.id for r in p.rules}
    in_experiment: dict[str, str] = {}
    errors += _duplicates("experiments", [e.id for e in p.experiments])
    for i, exp in enumerate(p.experiments):
        errors += _duplicates(f"experiments[{i}].arms", [a.id for a in exp.arms])
        for j, arm in enumerate(exp.arms):
            for k, rule_id in enumerate(arm.rules):
                at = f"experiments[{i}].arms[{j}].rules[{k}]"
                if rule_id not in rule_ids:
                    errors.append((at, f"{rule_id!r} is not a rule of the program"))
                elif in_experiment.setdefault(rule_id, exp.id) != exp.id:
                    errors.append((at, f"{rule_id!r} already belongs to experiment {in_experiment[rule_id]!r}"))
    g = p.gamification
    items = [("achievements", a.id, a.reward, a.match) for a in g.achievements]
    items += [("streaks", s.id, s.reward, s.match) for s in g.streaks]
    items += [("challenges", c.id, c.reward, c.match) for c in g.challenges]
    counters: dict[str, int] = {}
    first_at: dict[str, str] = {}
    for section, item_id, reward, match in items:
        j = counters[section] = counters.get(section, -1) + 1
        at = f"gamification.{section}[{j}]"
        if item_id in first_at:
            errors.append((f"{at}.id", f"{item_id!r} is already the id of {first_at[item_id]}"))
        first_at.setdefault(item_id, at)
        if reward.unit not in units:
            errors.append((f"{at}.reward.unit", f"{reward.unit!r} is not one of units {sorted(units)}"))
        for field, listed, known in (("channels", match.channels, channels), ("stores", match.stores, stores)):
            for k, item in enumerate(listed):
                if item not in known:
                    errors.append((f"{at}.match.{field}[{k}]", f"{item!r} is not declared in the program"))
        # Publish only: a stored version with such an item keeps loading (it never completes, as before).
        if publishing and match.min_total is not None and not convertible(match.min_total.currency):
            errors.append(
                (f"{at}.match.min_total.currency", f"{match.min_total.currency} has neither a base rate nor an FX rate")
            )
    if publishing:
        errors += _unreachable_counts(p) + _mixed_best_of(p)
    return errors


def _mixed_best_of(p: Program) -> list[tuple[str, str]]:
    """A best-of group picks the member paying the most, which has no meaning across units
    (350 tier credits would beat 35 points): its rules earn one unit. Publish only."""
    best_of = {g.id for g in p.groups if g.mode == GroupMode.BEST_OF}
    first_unit: dict[str, tuple[int, str]] = {}
    errors = []
    for i, rule in enumerate(p.rules):
        if rule.group not in best_of:
            continue
        j, unit = first_unit.setdefault(rule.group, (i, rule.unit))
        if rule.unit != unit:
            errors.append((f"rules[{i}].unit", f"group {rule.group!r} is best-of, which compares what its rules "
                           f"pay in one unit: rules[{j}] earns {unit!r}, this rule {rule.unit!r}"))  # fmt: skip
    return errors


def _unreachable_counts(p: Program) -> list[tuple[str, str]]:
    """Achievements asking for more distinct channels, stores or categories than any purchase
    can bring (the program's channels, or those their match names): no member could complete
    one, and it would be marketed all the same. Publish only, as a stored version keeps loading."""
    errors = []
    for j, a in enumerate(p.gamification.achievements):
        possible: tuple[int, str] | None = None
        if a.distinct == Distinct.CHANNEL:
            possible = (len(set(a.match.channels or p.channels)), "channels")
        elif a.distinct == Distinct.STORE and a.match.stores:
            possible = (len(set(a.match.stores)), "stores")
        elif a.distinct == Distinct.CATEGORY and a.match.categories:
            possible = (len(set(a.match.categories)), "categories")
        if possible is not None and a.count > possible[0]:
            errors.append((
                f"gamification.achievements[{j}].count",
                f"asks for {a.count} distinct {a.distinct.value} values, but purchases can bring only "
                f"{possible[0]} {possible[1]}: no member could complete it",
            ))  # fmt: skip
    return errors


# A program is a few kilobytes. YAML aliases are references that expand when the document is
# walked: a few lines of nested aliases ("billion laughs") stand for a billion values, and
# validating them would take rules_svc down. Anchors for reuse stay possible, a few at a time.
# Nesting too: a program is a handful of levels deep, while a few kilobytes of brackets nest
# thousands of levels, past the recursion limit of the parsers and of validation. The depth is
# counted before anything is built (JSON: brackets outside strings; YAML: the parser's events,
# stopping at the first level too deep, as its scanner slows with every open flow level).
MAX_DOCUMENT_BYTES = 1_000_000
MAX_YAML_ALIASES = 64
# The validated program as stored and sent (GetProgram, a follower's copy): aliases and defaults
# filled in make it larger than its source, and a version over the 16 MB gRPC message limit
# could never reach a follower. Checked at publish (rules_svc/service.py), well under the limit.
MAX_STORED_JSON_BYTES = 4_000_000
MAX_NESTING = 32
_JSON_BRACKETS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _too_deep() -> ProgramInvalid:
    return ProgramInvalid([("", f"is nested more than {MAX_NESTING} levels deep; a program needs far fewer")])


def _check_json_nesting(text: str) -> None:
    depth = 0
    for match in _JSON_BRACKETS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_NESTING:
                raise _too_deep()
        elif token in "]}":
            depth -= 1


def _check_yaml_events(text: str) -> None:
    """Aliases and nesting of a YAML document, from its parse events (nothing is built)."""
    aliases = depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_NESTING:
                raise _too_deep()
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
    if aliases > MAX_YAML_ALIASES:
        raise ProgramInvalid([("", f"uses {aliases} YAML aliases; at most {MAX_YAML_ALIASES} are allowed")])


def parse_document(text: str, *, fmt: str = "yaml") -> dict[str, Any]:
    """YAML or JSON text -> a plain mapping; syntax errors name the line."""
    if len(text.encode()) > MAX_DOCUMENT_BYTES:
        raise ProgramInvalid([("", f"the document is larger than {MAX_DOCUMENT_BYTES} bytes")])
    try:
        if fmt == "json":
            _check_json_nesting(text)
        else:
            _check_yaml_events(text)
        data = load_strict(text, fmt="json" if fmt == "json" else "yaml")
    except DuplicateKey as exc:
        where = "" if exc.line is None else f" at line {exc.line} column {exc.column}"
        raise ProgramInvalid([("", f"not valid {'JSON' if fmt == 'json' else 'YAML'}{where}: {exc.problem}")]) from None
    except AmbiguousNumber as exc:  # `per_minor: 0100` is octal 64 to YAML: refused where it is written
        raise ProgramInvalid(exc.found) from None
    except RecursionError:  # the checks above keep documents far from this; a last line of defence
        raise _too_deep() from None
    except json.JSONDecodeError as exc:
        raise ProgramInvalid([("", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise ProgramInvalid([("", f"not valid YAML{where}: {getattr(exc, 'problem', exc)}")]) from None
    if not isinstance(data, dict):
        raise ProgramInvalid([("", "the document must be a mapping with program, channels, base_rates, ...")])
    binary = _binary_scalars(data, "")
    if binary:
        raise ProgramInvalid(binary)
    return data


def _binary_scalars(value: Any, path: str) -> list[tuple[str, str]]:
    """YAML `!!binary` values, by path. A program holds none, and pydantic's lax mode would read
    their bytes as the text, number, flag or date they spell, past the checks meant for those."""
    if isinstance(value, bytes):
        return [(path, "is a YAML !!binary value; write it as plain text")]
    found: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, bytes):
                found.append((path, f"has a YAML !!binary key {key!r}; write it as plain text"))
            else:
                found += _binary_scalars(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _binary_scalars(item, f"{path}[{i}]")
    return found


def validate_program(data: dict[str, Any], *, stored: bool = False) -> Program:
    """A mapping -> a Program, or ProgramInvalid with every problem found and its path.
    `stored`: a version published before, read back (see _meaning_errors and _as_served): it
    keeps serving under checks added since."""
    try:
        program = Program.model_validate(data, context={"stored": stored})
    except ValidationError as exc:
        errors = []
        for err in exc.errors(include_url=False):
            message = str(err["msg"]).removeprefix("Value error, ")
            errors.append((_path(tuple(err["loc"])), message))
        raise ProgramInvalid(_in_document_order(errors, data)) from None
    problems = _meaning_errors(program, publishing=not stored)
    if problems:
        raise ProgramInvalid(_in_document_order(problems, data))
    return program


def load_program(text: str, *, fmt: str = "yaml") -> Program:
    return validate_program(parse_document(text, fmt=fmt))
