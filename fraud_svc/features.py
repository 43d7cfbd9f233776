"""The one feature definition for fraud scoring, shared by training (offline) and serving.

A feature row is computed from the transaction itself plus velocity state *including* the
event: `featurize` records the event in the velocity store and reads every window after
that, so "purchases by this member in the last 10 minutes" counts this purchase too (it is
at least 1 for a purchase). Training replays events in event-time order through
`MemoryVelocity`; serving observes them in `RedisVelocity`; `featurize_matrix` and
`featurize` share `_request` (what to record and read) and `_row` (numbers to features), so
the two cannot drift apart, and tests/fraud pins that both stores answer alike.

Missing values are NaN (no device on a POS purchase, no contact change ever, an entity never
seen before), which LightGBM routes as "missing" rather than as zero.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import numpy as np
import numpy.typing as npt

from fraud_svc.domain import EXACT_LATENESS, FUTURE_SKEW, BadRequest, TxContext, TxKind
from fraud_svc.velocity import Link, MemoryVelocity, Track, TrackSpec, Velocity

MIN10 = 10 * 60_000
H1 = 3_600_000
H24 = 24 * H1
D7 = 7 * H24
D30 = 30 * H24
D90 = 90 * H24
D180 = 180 * H24
# How late an event may come after newer ones and still see its windows whole (domain.py).
LATE_MS = (EXACT_LATENESS + FUTURE_SKEW) // timedelta(milliseconds=1)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAN = math.nan
_BLOCK_ROWS = 8_192


@dataclass(frozen=True, slots=True)
class _Group:
    """A track family and the feature names of its answer, in the velocity layout."""

    family: str
    spec: TrackSpec
    names: tuple[str, ...]


def _group(family: str, spec: TrackSpec, *names: str) -> _Group:
    """Every track keeps its entries LATE_MS past its retention, so an event that late still
    sees what happened before it (docs/fraud.md: velocity state)."""
    if len(names) != spec.width:
        raise ValueError(f"{family}: {len(names)} names for {spec.width} answers")
    return _Group(family, replace(spec, late_ms=LATE_MS), names)


# Order matters: it is the order of `_request`'s tracks and of FEATURE_NAMES. A track with
# `want_prev` answers the previous event's time last; its feature is hours since then.
# Keys are "<family>:<id>": families differ, so ids from different families never collide
# ("mi" twice on purpose: a member's incoming transfers, read as sender and written as recipient).
_GROUPS: tuple[_Group, ...] = (
    _group("ma", TrackSpec((MIN10, H1, H24), want_prev=True, retention_ms=D30),
           "member_events_10m", "member_events_1h", "member_events_24h", "member_hours_since_last_event"),
    _group("mp", TrackSpec((MIN10, H1, H24, D7, D30), (H1, H24, D30), (H24, D7), retention_ms=D30),
           "member_purchases_10m", "member_purchases_1h", "member_purchases_24h", "member_purchases_7d",
           "member_purchases_30d", "member_purchase_amount_1h", "member_purchase_amount_24h",
           "member_purchase_amount_30d", "member_purchase_cards_24h", "member_purchase_cards_7d"),
    _group("mr", TrackSpec((H24, D7, D30), (H24, D7), want_prev=True, retention_ms=D30),
           "member_redemptions_24h", "member_redemptions_7d", "member_redemptions_30d",
           "member_redeemed_points_24h", "member_redeemed_points_7d", "member_hours_since_redemption"),
    _group("mo", TrackSpec((H1, H24, D7), (H24,), (D7,), retention_ms=D7),
           "member_transfers_out_1h", "member_transfers_out_24h", "member_transfers_out_7d",
           "member_transfer_out_points_24h", "member_transfer_recipients_7d"),
    _group("mi", TrackSpec((H24, D7), (H24, D7), (D7,), retention_ms=D7),
           "member_transfers_in_24h", "member_transfers_in_7d", "member_transfer_in_points_24h",
           "member_transfer_in_points_7d", "member_transfer_senders_7d"),
    _group("mi", TrackSpec((H24, D7), (), (D7,), retention_ms=D7),
           "recipient_transfers_in_24h", "recipient_transfers_in_7d", "recipient_transfer_senders_7d"),
    _group("mt", TrackSpec((H24, D7, D30), (D30,), (D7,), retention_ms=D30),
           "member_returns_24h", "member_returns_7d", "member_returns_30d", "member_return_amount_30d",
           "member_return_stores_7d"),
    _group("c", TrackSpec((MIN10, H1, H24), (H1,), (H24, D7), retention_ms=D7),
           "card_events_10m", "card_events_1h", "card_events_24h", "card_amount_1h", "card_members_24h",
           "card_members_7d"),
    _group("d", TrackSpec((MIN10, H1, H24), (), (H24, D7), retention_ms=D7),
           "device_events_10m", "device_events_1h", "device_events_24h", "device_members_24h",
           "device_members_7d"),
    _group("i", TrackSpec((H1, H24), (), (H24, D7), retention_ms=D7),
           "ip_events_1h", "ip_events_24h", "ip_members_24h", "ip_members_7d"),
    _group("s", TrackSpec((H1, H24), retention_ms=H24), "store_events_1h", "store_events_24h"),
    _group("e", TrackSpec((H1, H24), (), (H24,), retention_ms=H24),
           "employee_events_1h", "employee_events_24h", "employee_members_24h"),
    _group("em", TrackSpec((H24, D7), retention_ms=D7),
           "employee_member_events_24h", "employee_member_events_7d"),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _LinkGroup:
    family: str
    window_ms: int
    retention_ms: int
    age_name: str | None  # None: the age duplicates another feature and is not kept
    new_name: str
    seen_name: str
    age_unit_ms: int = H1


_LINKS: tuple[_LinkGroup, ...] = (
    _LinkGroup("md", D30, D90, "member_device_age_hours", "member_new_devices_30d", "member_devices_30d"),
    _LinkGroup("mip", D30, D90, "member_ip_age_hours", "member_new_ips_30d", "member_ips_30d"),
    _LinkGroup("mc", D7, D90, "member_card_age_hours", "member_new_cards_7d", "member_cards_7d"),
    _LinkGroup("ms", D30, D180, "member_store_age_days", "member_new_stores_30d", "member_stores_30d", 24 * H1),
    _LinkGroup("dm", D30, D90, None, "device_new_members_30d", "device_members_30d"),
)

_CONTEXT_NAMES: tuple[str, ...] = (
    "is_purchase", "is_redemption", "is_transfer", "is_return",
    "channel_pos", "channel_web", "channel_app", "channel_call_centre",
    "amount_minor", "points", "balance_points", "points_share_of_balance",
    "tenure_days", "contact_change_age_hours", "hour_of_day",
)  # fmt: skip

_DERIVED_NAMES: tuple[str, ...] = (
    "amount_vs_member_avg_30d",
    "return_to_purchase_ratio_30d",
    "transfer_in_share_of_balance_24h",
    "employee_member_share_24h",
)

FEATURE_NAMES: tuple[str, ...] = (
    _CONTEXT_NAMES
    + tuple(name for group in _GROUPS for name in group.names)
    + tuple(n for link in _LINKS for n in (link.age_name, link.new_name, link.seen_name) if n is not None)
    + _DERIVED_NAMES
)
FEATURE_INDEX: Mapping[str, int] = {name: i for i, name in enumerate(FEATURE_NAMES)}

_KINDS = (TxKind.PURCHASE, TxKind.REDEMPTION, TxKind.TRANSFER, TxKind.RETURN)
_CHANNELS = ("pos", "web", "app", "call_centre")
_KIND_ONE_HOT = {k: tuple(1.0 if k is other else 0.0 for other in _KINDS) for k in _KINDS}
_CHANNEL_ONE_HOT = {c: tuple(1.0 if c == other else 0.0 for other in _CHANNELS) for c in _CHANNELS}
_NO_CHANNEL = (0.0,) * len(_CHANNELS)


@dataclass(frozen=True, slots=True)
class FeatureRow:
    """One transaction's features, in FEATURE_NAMES order."""

    values: tuple[float, ...]

    def __getitem__(self, name: str) -> float:
        return self.values[FEATURE_INDEX[name]]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(FEATURE_NAMES, self.values, strict=True))

    def array(self) -> npt.NDArray[np.float64]:
        return np.asarray(self.values, dtype=np.float64).reshape(1, -1)


def epoch_ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise BadRequest("occurred_at must carry a time zone", field="occurred_at")
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _value(ctx: TxContext) -> int:
    return ctx.amount_minor if ctx.kind in (TxKind.PURCHASE, TxKind.RETURN) else ctx.points


def _request(ctx: TxContext) -> tuple[list[Track | None], list[Link | None]]:
    """Every track and link this event records into or reads; None where it has no entity."""
    if not ctx.event_id or not ctx.member_id:
        raise BadRequest("event_id and member_id are required", field="event_id" if not ctx.event_id else "member_id")
    kind, member, value = ctx.kind, ctx.member_id, _value(ctx)
    g = _GROUPS
    cp = ctx.counterparty_member_id if kind is TxKind.TRANSFER else ""
    emp = ctx.employee_card
    tracks: list[Track | None] = [
        Track(g[0].spec, f"ma:{member}", value, "", True),
        Track(g[1].spec, f"mp:{member}", value, ctx.card_hash, kind is TxKind.PURCHASE),
        Track(g[2].spec, f"mr:{member}", value, "", kind is TxKind.REDEMPTION),
        Track(g[3].spec, f"mo:{member}", value, cp, kind is TxKind.TRANSFER),
        Track(g[4].spec, f"mi:{member}", value, "", False),
        Track(g[5].spec, f"mi:{cp}", value, member, True) if cp else None,
        Track(g[6].spec, f"mt:{member}", value, ctx.store_id, kind is TxKind.RETURN),
        Track(g[7].spec, f"c:{ctx.card_hash}", value, member, True) if ctx.card_hash else None,
        Track(g[8].spec, f"d:{ctx.device_id}", value, member, True) if ctx.device_id else None,
        Track(g[9].spec, f"i:{ctx.ip}", value, member, True) if ctx.ip else None,
        Track(g[10].spec, f"s:{ctx.store_id}", value, "", True) if ctx.store_id else None,
        Track(g[11].spec, f"e:{emp}", value, member, True) if emp else None,
        Track(g[12].spec, f"em:{len(emp)}:{emp}:{member}", value, "", True) if emp else None,
    ]
    ln = _LINKS
    links: list[Link | None] = [
        Link(f"md:{member}", ctx.device_id, ln[0].window_ms, ln[0].retention_ms, True) if ctx.device_id else None,
        Link(f"mip:{member}", ctx.ip, ln[1].window_ms, ln[1].retention_ms, True) if ctx.ip else None,
        Link(f"mc:{member}", ctx.card_hash, ln[2].window_ms, ln[2].retention_ms, True) if ctx.card_hash else None,
        Link(f"ms:{member}", ctx.store_id, ln[3].window_ms, ln[3].retention_ms, kind is TxKind.PURCHASE)
        if ctx.store_id
        else None,
        Link(f"dm:{ctx.device_id}", member, ln[4].window_ms, ln[4].retention_ms, True) if ctx.device_id else None,
    ]
    return tracks, links


def _context(ctx: TxContext, t_ms: int) -> list[float]:
    kind, balance = ctx.kind, ctx.balance_points
    share = _NAN
    if kind in (TxKind.REDEMPTION, TxKind.TRANSFER) and balance > 0:
        share = ctx.points / balance
    tenure = _NAN if ctx.member_since is None else (t_ms - epoch_ms(ctx.member_since)) / H24
    contact = _NAN
    if ctx.contact_changed_at is not None:
        contact = max(0.0, (t_ms - epoch_ms(ctx.contact_changed_at)) / H1)
    return [
        *_KIND_ONE_HOT[kind], *_CHANNEL_ONE_HOT.get(ctx.channel, _NO_CHANNEL),
        float(ctx.amount_minor), float(ctx.points), float(balance), share,
        tenure, contact, float(ctx.occurred_at.astimezone(UTC).hour),
    ]  # fmt: skip


def _row(
    ctx: TxContext, t_ms: int, tracks: list[Track | None], links: list[Link | None], answer: tuple[int, ...]
) -> list[float]:
    """Turns the velocity answer (integers in request order) into the feature vector."""
    values = _context(ctx, t_ms)
    at = 0
    for group, track in zip(_GROUPS, tracks, strict=True):
        width = len(group.names)
        if track is None:
            values.extend([_NAN] * width)
            continue
        values.extend(map(float, answer[at : at + width]))
        at += width
        if group.spec.want_prev:
            prev = answer[at - 1]
            values[-1] = _NAN if prev < 0 else (t_ms - prev) / H1
    for link_group, link in zip(_LINKS, links, strict=True):
        if link is None:
            values.extend([_NAN] * (2 if link_group.age_name is None else 3))
            continue
        age, new, seen = answer[at : at + 3]
        at += 3
        if link_group.age_name is not None:
            values.append(_NAN if age < 0 else age / link_group.age_unit_ms)
        values += (float(new), float(seen))
    _derive(ctx, values)
    return values


def _derive(ctx: TxContext, values: list[float]) -> None:
    f = FEATURE_INDEX
    amount = float(ctx.amount_minor)
    count_30d, sum_30d = values[f["member_purchases_30d"]], values[f["member_purchase_amount_30d"]]
    values.append(amount * count_30d / sum_30d if amount > 0 and count_30d > 0 and sum_30d > 0 else _NAN)
    values.append(values[f["member_return_amount_30d"]] / (sum_30d + 100.0))
    values.append(values[f["member_transfer_in_points_24h"]] / max(ctx.balance_points, 1))
    emp_events = values[f["employee_events_24h"]]
    values.append(values[f["employee_member_events_24h"]] / emp_events if emp_events > 0 else _NAN)


async def featurize(ctx: TxContext, velocity: Velocity) -> FeatureRow:
    """Records `ctx` in `velocity` (once per event: a retry is not counted again) and returns
    its features, computed from state that includes it."""
    t_ms = epoch_ms(ctx.occurred_at)
    tracks, links = _request(ctx)
    answer = await velocity.observe(
        ctx.event_id, t_ms, [x for x in tracks if x is not None], [x for x in links if x is not None]
    )
    return FeatureRow(tuple(_row(ctx, t_ms, tracks, links, answer)))


async def featurize_many(contexts: Sequence[TxContext], velocity: Velocity) -> list[FeatureRow]:
    """`featurize` for many events in event-time order, observed together (RedisVelocity sends
    them in pipelined chunks)."""
    async with aclosing(featurize_stream(contexts, velocity)) as chunks:
        return [row async for rows in chunks for row in rows]


async def featurize_stream(contexts: Sequence[TxContext], velocity: Velocity) -> AsyncGenerator[list[FeatureRow], None]:
    """`featurize_many` a chunk at a time, in order, as the velocity store answers: a caller
    scores one chunk while the store computes the next."""
    requests = [(ctx, epoch_ms(ctx.occurred_at), *_request(ctx)) for ctx in contexts]
    observations = [
        (ctx.event_id, t_ms, [x for x in tracks if x is not None], [x for x in links if x is not None])
        for ctx, t_ms, tracks, links in requests
    ]
    done = 0
    async with aclosing(velocity.observe_stream(observations)) as chunks:
        async for answers in chunks:
            chunk = requests[done : done + len(answers)]
            done += len(answers)
            yield [FeatureRow(tuple(_row(ctx, t_ms, tracks, links, answer)))
                   for (ctx, t_ms, tracks, links), answer in zip(chunk, answers, strict=True)]  # fmt: skip


def featurize_matrix(events: Iterable[TxContext], velocity: MemoryVelocity | None = None) -> npt.NDArray[np.float64]:
    """Offline twin of `featurize` for many events in event-time order: the same request and
    assembly, against in-process state, without an event loop per row. Rows are packed into
    float64 blocks as they come, so a million events need ~0.75 GB, not Python floats."""
    velocity = velocity if velocity is not None else MemoryVelocity()
    blocks: list[npt.NDArray[np.float64]] = []
    rows: list[list[float]] = []
    for ctx in events:
        t_ms = epoch_ms(ctx.occurred_at)
        tracks, links = _request(ctx)
        answer = velocity.observe_now(
            ctx.event_id, t_ms, [x for x in tracks if x is not None], [x for x in links if x is not None]
        )
        rows.append(_row(ctx, t_ms, tracks, links, answer))
        if len(rows) == _BLOCK_ROWS:
            blocks.append(np.asarray(rows, dtype=np.float64))
            rows = []
    if rows or not blocks:
        blocks.append(np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURE_NAMES)))
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
