"""Seeded synthetic transactions with labelled fraud patterns and their benign look-alikes.

Everything is drawn from one `numpy.random.Generator` seeded by `SynthConfig.seed` in a
fixed order, so the same config always yields the same events (ids included). Generation is
columnar (numpy); only `SynthData.events()` builds `TxContext` objects, which keeps a million
rows to seconds. docs/fraud.md describes every pattern; in short:

fraud (label 1): `burst` (many small purchases on a stolen card within minutes),
`account_takeover` (contact change, attacker device/IP, then a large redemption or a transfer
to a mule who redeems), `transfer_ring` (new accounts funnelling points to a collector who
redeems), `store_abuse` (a cashier puts an accomplice's loyalty id on other customers'
receipts), `return_fraud` (large returns at stores never shopped at).

benign look-alikes (label 0): `black_friday_burst` (some on a store card opened that day),
`payday_burst`, `new_phone` (new device, sometimes a new phone number, then a large
redemption), `household_transfer` (family pooling, then redeeming), `busy_cashier` (a cashier
serving many members), `split_receipts` (a business buyer's several receipts at one till),
`serial_returner`; plus replaced payment cards and carrier/campus NAT addresses shared by
many members.

Labels carry noise: `label_noise` of fraud rows are labelled benign (missed chargebacks) and
`benign_noise` of benign rows fraud (genuine but disputed); `patterns` keeps the truth.
Churn: some members' purchase rate decays until they stop, leaving points unredeemed; a
member's churn label is "no purchase in the 90 days after `churn_as_of`".
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from fraud_svc.domain import MemberActivity, TxContext, TxKind

PATTERNS: tuple[str, ...] = (
    "benign", "black_friday_burst", "payday_burst", "new_phone", "household_transfer", "busy_cashier",
    "serial_returner", "split_receipts", "burst", "account_takeover", "transfer_ring", "store_abuse", "return_fraud",
)  # fmt: skip
FRAUD_PATTERNS: frozenset[str] = frozenset(
    {"burst", "account_takeover", "transfer_ring", "store_abuse", "return_fraud"}
)
KINDS: tuple[TxKind, ...] = (TxKind.PURCHASE, TxKind.REDEMPTION, TxKind.TRANSFER, TxKind.RETURN)
CHANNELS: tuple[str, ...] = ("pos", "web", "app", "call_centre")
SEGMENTS: tuple[str, ...] = ("regular", "family", "student", "business", "senior", "daily")
PUR, RED, XFER, RET = 0, 1, 2, 3
POS, WEB, APP, CALL = 0, 1, 2, 3
_P = {name: i for i, name in enumerate(PATTERNS)}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DAY = 86_400_000
HOUR = 3_600_000
MINUTE = 60_000
CHURN_HORIZON_DAYS = 90
# Measured events per regular member per day at fraud_rate 1 (see `SynthConfig.for_rows`).
EVENTS_PER_MEMBER_DAY = 0.118

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

# Purchase hour profiles: tills follow opening hours, online shopping peaks in the evening.
POS_HOURS = np.array([0, 0, 0, 0, 0, 0, 0, 1, 3, 5, 7, 8, 10, 8, 7, 7, 8, 10, 10, 8, 5, 2, 0, 0], float)
WEB_HOURS = np.array([2, 1, 1, 0.5, 0.5, 1, 2, 3, 4, 5, 5, 6, 6, 6, 5, 5, 6, 7, 8, 10, 10, 9, 6, 4], float)


@dataclass(frozen=True, slots=True)
class SynthConfig:
    members: int = 2_000
    seed: int = 0
    start: datetime = datetime(2025, 8, 1, tzinfo=UTC)
    days: int = 183
    warmup_days: int = 45  # velocity state fills up here; fraud starts after it, evaluation too
    fraud_rate: float = 1.0  # multiplies how often every fraud pattern happens
    label_noise: float = 0.02
    benign_noise: float = 0.0005

    @classmethod
    def for_rows(cls, rows: int, *, seed: int = 0, days: int = 183, **kw: float) -> SynthConfig:
        """A config whose output has about `rows` events (within a few percent)."""
        members = max(50, round(rows / (EVENTS_PER_MEMBER_DAY * days)))
        return cls(members=members, seed=seed, days=days, **kw)  # type: ignore[arg-type]

    @property
    def start_ms(self) -> int:
        return (self.start - _EPOCH) // timedelta(milliseconds=1)

    @property
    def end_ms(self) -> int:
        return self.start_ms + self.days * DAY

    @property
    def churn_as_of(self) -> datetime:
        return self.start + timedelta(days=self.days - CHURN_HORIZON_DAYS)


@dataclass(frozen=True, slots=True)
class LabelledEvent:
    ctx: TxContext
    is_fraud: bool
    pattern: str


@dataclass(frozen=True, slots=True)
class ChurnSet:
    """Members active in the year before `as_of`, their ledger view then, and whether they
    made no purchase in the following 90 days (True = churned)."""

    as_of: datetime
    activities: tuple[MemberActivity, ...]
    churned: npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class SynthData:
    """Time-ordered event columns (one row per event) plus the member table and churn set."""

    config: SynthConfig
    t_ms: I64
    kind: I64
    member: I64
    channel: I64
    store: I64
    amount_minor: I64
    points: I64
    balance_points: I64
    device: I64
    ip: I64
    card: I64
    employee: I64
    counterparty: I64
    contact_changed_ms: I64
    pattern: I64
    label: npt.NDArray[np.bool_]
    member_join_ms: I64
    churn: ChurnSet

    def __len__(self) -> int:
        return len(self.t_ms)

    @property
    def scored(self) -> npt.NDArray[np.bool_]:
        """Rows after the warm-up: the ones to train and evaluate on."""
        return self.t_ms >= self.config.start_ms + self.config.warmup_days * DAY

    def pattern_names(self) -> list[str]:
        return [PATTERNS[p] for p in self.pattern.tolist()]

    def is_pattern(self, name: str) -> npt.NDArray[np.bool_]:
        return np.asarray(self.pattern == _P[name], dtype=bool)

    def contexts(self) -> Iterator[TxContext]:
        """The events as fraud_svc receives them, in event-time order."""
        prefix = f"ev{self.config.seed}-"
        since = [_dt(ms) for ms in self.member_join_ms.tolist()]
        cols = (self.t_ms, self.kind, self.member, self.channel, self.store, self.amount_minor, self.points,
                self.balance_points, self.device, self.ip, self.card, self.employee, self.counterparty,
                self.contact_changed_ms)  # fmt: skip
        rows = zip(*(c.tolist() for c in cols), strict=True)
        for i, (t, k, m, ch, s, amount, pts, bal, dev, ip, card, emp, cp, cc) in enumerate(rows):
            yield TxContext(
                event_id=f"{prefix}{i:08d}", kind=KINDS[k], member_id=f"m{m:07d}", occurred_at=_dt(t),
                channel=CHANNELS[ch], store_id=f"s{s:04d}" if s >= 0 else "", amount_minor=amount,
                currency="EUR" if amount else "", points=pts, device_id=f"dv{dev:06x}" if dev >= 0 else "",
                ip=f"10.{ip >> 16 & 255}.{ip >> 8 & 255}.{ip & 255}" if ip >= 0 else "",
                card_hash=f"cd{card:08x}" if card >= 0 else "", employee_card=f"e{emp:05d}" if emp >= 0 else "",
                counterparty_member_id=f"m{cp:07d}" if cp >= 0 else "",
                contact_changed_at=_dt(cc) if cc >= 0 else None, member_since=since[m], balance_points=bal,
            )  # fmt: skip

    def events(self) -> Iterator[LabelledEvent]:
        for ctx, label, pattern in zip(self.contexts(), self.label.tolist(), self.pattern.tolist(), strict=True):
            yield LabelledEvent(ctx, label, PATTERNS[pattern])


def _dt(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


class _Ids:
    """Hands out fresh integer ids for one entity type (devices, IPs, cards)."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int = 1) -> I64:
        ids = np.arange(self.next, self.next + n, dtype=np.int64)
        self.next += n
        return ids

    def one(self) -> int:
        self.next += 1
        return self.next - 1


class _Events:
    """Column blocks appended by each pattern; every column broadcasts to the block length."""

    COLUMNS = ("t", "kind", "member", "channel", "store", "amount", "share", "device", "ip", "card",
               "employee", "cp", "pattern")  # fmt: skip

    def __init__(self) -> None:
        self.blocks: list[dict[str, npt.NDArray[Any]]] = []

    def add(self, t: object, kind: object, member: object, channel: object, pattern: str, **cols: object) -> None:
        t_arr = np.atleast_1d(np.asarray(t, dtype=np.int64))
        block: dict[str, npt.NDArray[Any]] = {}
        given = {"t": t_arr, "kind": kind, "member": member, "channel": channel, "pattern": _P[pattern], **cols}
        for name in self.COLUMNS:
            default = 0.0 if name == "share" else (0 if name == "amount" else -1)
            dtype = np.float64 if name == "share" else np.int64
            value = np.asarray(given.get(name, default), dtype=dtype)
            block[name] = np.broadcast_to(value, t_arr.shape)
        self.blocks.append(block)

    def concat(self) -> dict[str, npt.NDArray[Any]]:
        return {name: np.concatenate([b[name] for b in self.blocks]) for name in self.COLUMNS}


class _World:
    """Members, stores, cashiers and devices of one generated programme."""

    def __init__(self, cfg: SynthConfig, rng: np.random.Generator) -> None:
        self.cfg, self.rng = cfg, rng
        n = self.n = cfg.members
        self.start, self.end = cfg.start_ms, cfg.end_ms
        self.fraud_from = self.start + cfg.warmup_days * DAY
        self.devices, self.ips, self.cards = _Ids(), _Ids(), _Ids()
        self.day_cum = np.concatenate([[0.0], np.cumsum(_day_weights(cfg))])
        existing = rng.random(n) < 0.85
        tenure = np.minimum(rng.exponential(700, n), 3000) * DAY
        self.join = np.where(existing, self.start - tenure, self.start + rng.random(n) * (self.end - self.start))
        self.join = self.join.astype(np.int64)
        self.segment = rng.choice(len(SEGMENTS), n, p=[0.4, 0.2, 0.12, 0.08, 0.12, 0.08])
        daily = self.segment == SEGMENTS.index("daily")
        self.lam = np.clip(rng.lognormal(np.log(0.075), 0.7, n), 0.005, 1.0)
        self.lam[daily] = rng.uniform(0.4, 0.9, daily.sum())
        seg_amount = np.array([3500, 6000, 1800, 4000, 3000, 450], float)[self.segment]
        self.mean_amount = seg_amount * rng.lognormal(0, 0.35, n)
        pos = rng.beta(3, 1.5, n)
        web = (1 - pos) * rng.beta(2, 2, n)
        self.chan_cum = np.c_[pos, pos + web]
        self.serial = rng.random(n) < 0.06
        stores = self.n_stores = int(np.clip(n // 150, 8, 2000))
        self.store_cum = np.cumsum(_normalise(1.0 / np.arange(1, stores + 1, dtype=np.float64) ** 0.8))
        self.home_store = self.popular_store(n)
        self.second_store = self.popular_store(n)
        per_store = rng.integers(3, 12, stores)
        self.cashier_store = np.repeat(np.arange(stores), per_store)
        self.cashier_first = np.concatenate([[0], np.cumsum(per_store)[:-1]])
        weights = rng.dirichlet(np.full(per_store.max(), 0.6), stores)
        self.cashier_cum = np.concatenate(
            [np.cumsum(_normalise(weights[s, : per_store[s]])) + s for s in range(stores)]
        )
        self.device1 = self.devices.take(n)
        self.device2 = np.where(rng.random(n) < 0.3, self.devices.take(n), -1)
        self.tablet = np.full(n, -1, np.int64)
        self.home_ip = self.ips.take(n)
        self.mobile_ips = self.ips.take(max(20, n // 25))
        self.nat_ips = self.ips.take(max(3, n // 1500))  # carrier NAT: many members behind one address
        students = np.flatnonzero((self.segment == SEGMENTS.index("student")) & (rng.random(n) < 0.5))
        self.home_ip[students] = rng.choice(self.ips.take(max(2, n // 3000)), len(students))  # campus networks
        self.card1 = self.cards.take(n)
        self.card_new_ms = np.where(rng.random(n) < 0.15, rng.uniform(self.start, self.end, n), np.inf)
        self.card_new = self.cards.take(n)  # a replaced card (expiry, loss) takes over from card1
        self.card2 = np.where(rng.random(n) < 0.35, self.cards.take(n), -1)
        self.shared_card = np.full(n, -1, np.int64)
        self.balance0 = np.where(
            existing, self.lam * 365 * self.mean_amount / 100 * rng.uniform(0.1, 0.8, n), rng.integers(0, 500, n)
        ).astype(np.int64)
        self._churn_dynamics()
        online = (1 - pos) > 0.1
        has_phone = online & (rng.random(n) < 0.12)
        self.phone_ms = np.where(has_phone, rng.uniform(self.start, self.end, n), np.inf)
        self.phone_dev = np.where(has_phone, self.devices.take(n), -1)
        self.extra_join: list[int] = []
        self.extra_balance: list[int] = []
        self.change_member: list[int] = []
        self.change_t: list[int] = []

    def _churn_dynamics(self) -> None:
        """Churners decay from a start date until they stop; 12% of the rest have a lull."""
        rng, n = self.rng, self.n
        as_of = self.end - CHURN_HORIZON_DAYS * DAY
        churner = rng.random(n) < 0.25
        self.decline = np.where(churner, as_of + rng.uniform(-150, 20, n) * DAY, np.inf)
        self.tau = rng.uniform(15, 45, n) * DAY
        self.stop = self.decline + rng.uniform(1, 3, n) * self.tau
        lull = rng.random(n) < 0.12
        self.lull_start = np.where(lull, rng.uniform(self.start, self.end, n), np.inf)
        self.lull_end = self.lull_start + rng.uniform(20, 60, n) * DAY

    def popular_store(self, n: int) -> I64:
        return np.minimum(np.searchsorted(self.store_cum, self.rng.random(n)), self.n_stores - 1)

    def cashier(self, store: I64) -> I64:
        idx = np.searchsorted(self.cashier_cum, store + self.rng.random(len(store)), side="right")
        first = self.cashier_first[store]
        return np.clip(idx, first, np.append(self.cashier_first[1:], len(self.cashier_store))[store] - 1)

    def account(self, join_ms: float, balance: int) -> int:
        """A new account opened by a fraudster; ids follow the regular members."""
        self.extra_join.append(int(join_ms))
        self.extra_balance.append(int(balance))
        return self.n + len(self.extra_join) - 1

    def change(self, member: int, t_ms: float) -> None:
        self.change_member.append(int(member))
        self.change_t.append(int(t_ms))

    def activity(self, m: I64, t: F64) -> F64:
        act = np.where(t >= self.decline[m], np.exp(-(t - self.decline[m]) / self.tau[m]), 1.0)
        act = np.where(t >= self.stop[m], 0.0, act)
        return np.where((t >= self.lull_start[m]) & (t < self.lull_end[m]), act * 0.3, act)

    def times(self, m: I64, hours: F64, lo: I64 | None = None) -> I64:
        """Event times for members `m` after `lo` (default their join), following the day weights."""
        lo = self.join[m] if lo is None else lo
        days = len(self.day_cum) - 1
        lo_day = np.clip((lo - self.start) // DAY, 0, days - 1)
        u = self.day_cum[lo_day] + self.rng.random(len(m)) * (self.day_cum[-1] - self.day_cum[lo_day])
        day = np.clip(np.searchsorted(self.day_cum, u, side="right") - 1, 0, days - 1)
        hour = np.searchsorted(np.cumsum(_normalise(hours)), self.rng.random(len(m)), side="right")
        minute = (self.rng.random(len(m)) * HOUR).astype(np.int64)
        return np.asarray(self.start + day * DAY + np.minimum(hour, 23) * HOUR + minute, dtype=np.int64)

    def channels(self, m: I64) -> I64:
        u = self.rng.random(len(m))
        return np.where(u < self.chan_cum[m, 0], POS, np.where(u < self.chan_cum[m, 1], WEB, APP))

    def attach(self, m: I64, t: I64, ch: I64, with_card: bool) -> dict[str, I64]:
        """Store, cashier, device, IP and card a member's own transaction would carry."""
        rng, n = self.rng, len(m)
        pos, online = ch == POS, (ch == WEB) | (ch == APP)
        u = rng.random(n)
        store = np.where(u < 0.75, self.home_store[m], np.where(u < 0.9, self.second_store[m], self.popular_store(n)))
        store = np.where(pos, store, -1)
        employee = np.where(pos, self.cashier(np.maximum(store, 0)), -1)
        device = np.where(t >= self.phone_ms[m], self.phone_dev[m], self.device1[m])
        u = rng.random(n)
        device = np.where((u < 0.2) & (self.device2[m] >= 0), self.device2[m], device)
        device = np.where((u >= 0.2) & (u < 0.4) & (self.tablet[m] >= 0), self.tablet[m], device)
        home = rng.random(n) < np.where(ch == WEB, 0.8, 0.5)
        ip = np.where(home, self.home_ip[m], self.mobile_ip(n))
        u = rng.random(n)
        card1 = np.where(t >= self.card_new_ms[m], self.card_new[m], self.card1[m])
        card = np.where((u < 0.3) & (self.card2[m] >= 0), self.card2[m], card1)
        card = np.where((u >= 0.75) & (self.shared_card[m] >= 0), self.shared_card[m], card)
        return {
            "store": store, "employee": employee, "device": np.where(online, device, -1),
            "ip": np.where(online, ip, -1), "card": np.where(with_card & (ch != CALL), card, -1),
        }  # fmt: skip

    def moment(self, lo: float, hi: float, hours: F64 = WEB_HOURS) -> float:
        """A time between lo and hi on a uniformly drawn day, at an hour drawn from `hours`
        (fraudsters keep shoppers' hours, so the hour alone gives little away)."""
        rng = self.rng
        day = lo + rng.random() * (hi - lo)
        day -= (day - self.start) % DAY
        hour = int(np.searchsorted(np.cumsum(_normalise(hours)), rng.random(), side="right"))
        t = day + min(hour, 23) * HOUR + rng.random() * HOUR
        return float(min(max(t, lo), hi))

    def mobile_ip(self, n: int) -> I64:
        nat = self.rng.random(n) < 0.35
        return np.where(nat, self.rng.choice(self.nat_ips, n), self.rng.choice(self.mobile_ips, n))

    def amounts(self, m: I64, scale: float = 1.0) -> I64:
        raw = self.mean_amount[m] * scale * self.rng.lognormal(0, 0.55, len(m))
        return np.maximum(raw, 50).astype(np.int64)

    def count(self, per_member: float) -> int:
        """How many incidents of a fraud pattern, from a rate per member per 100 days after warm-up."""
        cfg = self.cfg
        return int(self.rng.poisson(per_member * self.n * cfg.fraud_rate * (cfg.days - cfg.warmup_days) / 100))


def _normalise(x: F64) -> F64:
    return np.asarray(x / x.sum(), dtype=np.float64)


def _day_weights(cfg: SynthConfig) -> F64:
    """Weekly rhythm, paydays, December and Black Friday; normalised to a mean of 1."""
    weights = []
    for d in range(cfg.days):
        day = (cfg.start + timedelta(days=d)).date()
        w = (1.0, 0.95, 1.0, 1.05, 1.15, 1.35, 0.7)[day.weekday()]
        w *= 1.3 if day.day in (25, 26, 1) else 1.0
        w *= 1.3 if day.month == 12 and day.day <= 23 else (0.2 if day.month == 12 and day.day == 25 else 1.0)
        w *= 3.0 if day == _black_friday(day.year) else 1.0
        weights.append(w)
    arr = np.asarray(weights, dtype=np.float64)
    return np.asarray(arr / arr.mean(), dtype=np.float64)


def _black_friday(year: int) -> date:
    first_thursday = 1 + (3 - datetime(year, 11, 1).weekday()) % 7
    return datetime(year, 11, first_thursday + 22).date()


def _purchases(w: _World, ev: _Events) -> dict[str, I64]:
    """Everyday purchases (thinned by churn and lulls); returns them for the returns step."""
    rng = w.rng
    span = w.day_cum[-1] - w.day_cum[np.clip((w.join - w.start) // DAY, 0, len(w.day_cum) - 2)]
    m = np.repeat(np.arange(w.n), rng.poisson(w.lam * span))
    ch = w.channels(m)
    t = np.where(ch == POS, w.times(m, POS_HOURS), w.times(m, WEB_HOURS))
    keep = (t >= w.join[m]) & (rng.random(len(m)) < w.activity(m, t.astype(float)))
    m, ch, t = m[keep], ch[keep], t[keep]
    cols = w.attach(m, t, ch, with_card=True)
    amount = w.amounts(m)
    ev.add(t, PUR, m, ch, "benign", amount=amount, **cols)
    bought = {"t": t, "m": m, "ch": ch, "amount": amount, **cols}
    return _merge(bought, _split_receipts(w, ev, bought))


def _split_receipts(w: _World, ev: _Events, bought: dict[str, I64]) -> dict[str, I64]:
    """Business buyers often ring up several receipts in a row at one till with one card."""
    rng = w.rng
    pos = np.flatnonzero((bought["ch"] == POS) & (w.segment[bought["m"]] == SEGMENTS.index("business")))
    pos = pos[rng.random(len(pos)) < 0.3]
    k = rng.integers(1, 4, len(pos))
    src = np.repeat(pos, k)
    extra = {name: col[src] for name, col in bought.items()}
    extra["t"] = extra["t"] + (rng.uniform(1, 30, len(src)) * MINUTE).astype(np.int64)
    extra["amount"] = w.amounts(extra["m"])
    ev.add(extra["t"], PUR, extra["m"], POS, "split_receipts", amount=extra["amount"],
           **{c: extra[c] for c in ("store", "employee", "device", "ip", "card")})  # fmt: skip
    return extra


def _merge(a: dict[str, I64], b: dict[str, I64]) -> dict[str, I64]:
    return {name: np.concatenate([a[name], b[name]]) for name in a}


def _bursts_benign(w: _World, ev: _Events) -> list[dict[str, I64]]:
    """Black Friday mall sessions and payday shopping: several purchases within hours."""
    rng, made = w.rng, []
    days = [d for d in range(w.cfg.days) if (w.cfg.start + timedelta(days=d)).day == 25]
    bf = (_black_friday(w.cfg.start.year) - w.cfg.start.date()).days
    sessions = [(bf, 0.06, 2.5, 2.0, "black_friday_burst")] if 0 <= bf < w.cfg.days else []
    sessions += [(d, 0.015, 1.0, 1.5, "payday_burst") for d in days]
    for day, share, hours, extra, pattern in sessions:
        t0 = w.start + day * DAY + rng.uniform(9, 19, w.n) * HOUR
        who = np.flatnonzero((rng.random(w.n) < share) & (w.join < t0) & (w.activity(np.arange(w.n), t0) > 0.5))
        k = 2 + rng.poisson(extra, len(who)) + (pattern == "black_friday_burst")
        m = np.repeat(who, k)
        t = (np.repeat(t0[who], k) + rng.random(len(m)) * hours * HOUR).astype(np.int64)
        ch = np.where(np.repeat(rng.random(len(who)) < 0.7, k), POS, w.channels(m))
        cols = w.attach(m, t, ch, with_card=True)
        if pattern == "black_friday_burst":  # a quarter open the store card at the first till
            store_card = np.repeat(np.where(rng.random(len(who)) < 0.25, w.cards.take(len(who)), -1), k)
            cols["card"] = np.where(store_card >= 0, store_card, cols["card"])
        cols["store"] = np.where(ch == POS, w.popular_store(len(m)), -1)
        cols["employee"] = np.where(ch == POS, w.cashier(np.maximum(cols["store"], 0)), -1)
        amount = w.amounts(m, 1.3)
        ev.add(t, PUR, m, ch, pattern, amount=amount, **cols)
        made.append({"t": t, "m": m, "ch": ch, "amount": amount, **cols})
    return made


def _returns(w: _World, ev: _Events, bought: list[dict[str, I64]]) -> None:
    """Some purchases come back within 30 days, usually to the same store, never for more."""
    rng = w.rng
    p = {name: np.concatenate([b[name] for b in bought]) for name in bought[0]}
    m = p["m"]
    back = rng.random(len(m)) < np.where(w.serial[m], 0.25, 0.03)
    t = p["t"] + ((rng.exponential(5, len(m)) + 0.05) * DAY).astype(np.int64)
    keep = back & (t < p["t"] + 30 * DAY)
    sel = {name: col[keep] for name, col in p.items()}
    m, t = sel["m"], t[keep]
    ch = np.where((sel["ch"] != POS) & (rng.random(len(m)) < 0.5), sel["ch"], POS)
    store = np.where(rng.random(len(m)) < 0.85, sel["store"], -1)
    store = np.where(ch == POS, np.where(store >= 0, store, w.popular_store(len(m))), -1)
    full = rng.random(len(m)) < 0.6
    amount = np.where(full, sel["amount"], sel["amount"] * rng.uniform(0.2, 1.0, len(m))).astype(np.int64)
    online = ch != POS
    ev.add(
        t, RET, m, ch, "benign", amount=np.maximum(amount, 1), store=store, card=sel["card"],
        employee=np.where(ch == POS, w.cashier(np.maximum(store, 0)), -1),
        device=np.where(online, sel["device"], -1), ip=np.where(online, sel["ip"], -1),
    )  # fmt: skip
    ev.blocks[-1]["pattern"] = np.where(w.serial[m], _P["serial_returner"], _P["benign"])


def _redemptions(w: _World, ev: _Events) -> None:
    """Members spend points now and then; a fifth of redemptions empty the balance."""
    rng = w.rng
    rate = 0.16 * w.lam + 0.004
    span = (w.end - np.maximum(w.join, w.start)) / DAY
    m = np.repeat(np.arange(w.n), rng.poisson(rate * span))
    t = w.times(m, WEB_HOURS, np.maximum(w.join[m], w.start))
    keep = rng.random(len(m)) < w.activity(m, t.astype(float)) ** 2
    m, t = m[keep], t[keep]
    ch = rng.choice(4, len(m), p=[0.35, 0.25, 0.33, 0.07])
    share = np.where(rng.random(len(m)) < 0.8, rng.beta(2, 3, len(m)), rng.uniform(0.85, 1.0, len(m)))
    ev.add(t, RED, m, ch, "benign", share=share, **w.attach(m, t, ch, with_card=False))


def _new_phones(w: _World, ev: _Events) -> None:
    """A new phone (new device id), sometimes with a new number, often a big redemption soon."""
    rng = w.rng
    m = np.flatnonzero(np.isfinite(w.phone_ms))
    at = w.phone_ms[m]
    changed = rng.random(len(m)) < 0.3  # half of them set up a new number on the new phone itself
    lead = np.where(rng.random(len(m)) < 0.5, rng.uniform(0, 3, len(m)) * HOUR, rng.exponential(2, len(m)) * DAY)
    for member, t in zip(m[changed].tolist(), (at - lead)[changed].tolist(), strict=True):
        w.change(member, max(t, w.join[member]))
    big = rng.random(len(m)) < 0.5
    m, at = m[big], at[big]
    soon = rng.random(len(m)) < 0.25
    delay = np.where(
        soon, rng.uniform(5, 60, len(m)) * MINUTE, np.maximum(rng.exponential(10, len(m)) * HOUR, 10 * MINUTE)
    )
    t = (at + delay).astype(np.int64)
    ip = np.where(rng.random(len(m)) < 0.6, w.home_ip[m], w.mobile_ip(len(m)))
    ev.add(t, RED, m, APP, "new_phone", share=rng.uniform(0.7, 1.0, len(m)), device=w.phone_dev[m], ip=ip)


def _contact_changes(w: _World) -> None:
    rng, n = w.rng, w.n
    before = (w.join < w.start) & (rng.random(n) < 0.3)
    during = rng.random(n) < 0.05
    for member in np.flatnonzero(before).tolist():
        w.change(member, w.join[member] + rng.random() * (w.start - w.join[member]))
    for member in np.flatnonzero(during).tolist():
        w.change(member, rng.uniform(max(w.start, w.join[member]), w.end))


def _households(w: _World, ev: _Events) -> None:
    """Families share a home IP, sometimes a tablet or card, and pool points to redeem."""
    rng = w.rng
    pool = rng.permutation(w.n)[: w.n // 4]
    sizes = rng.integers(2, 5, len(pool))
    bounds = np.cumsum(sizes)
    homes = [h for h in np.split(pool, bounds[bounds < len(pool)]) if len(h) >= 2]
    for h in homes:
        w.home_ip[h] = w.home_ip[h[0]]
        if rng.random() < 0.4:
            w.tablet[h] = w.devices.one()
        if rng.random() < 0.3:
            w.shared_card[h] = w.card1[h[0]]
    rows: list[tuple[int, int, int, float, int]] = []  # t, sender/redeemer, receiver (-1: redemption), share, ch
    for h in homes:
        members = h.tolist()
        for _ in range(rng.poisson(w.cfg.days / 60)):
            t0 = rng.uniform(w.start, w.end)
            present = [m for m in members if w.join[m] < t0]
            if len(present) < 2:
                continue
            pooler = present[rng.integers(len(present))]
            last = t0
            for m in present:
                if m != pooler:
                    t = t0 + rng.random() * 4 * HOUR
                    last = max(last, t)
                    rows.append((int(t), m, pooler, rng.uniform(0.5, 1.0), APP))
            if rng.random() < 0.6:
                rows.append(
                    (int(last + rng.exponential(1) * DAY), pooler, -1, rng.uniform(0.7, 1.0), rng.choice([APP, WEB]))
                )
        for _ in range(rng.poisson(w.cfg.days / 90)):
            a, b = rng.choice(members, 2, replace=False)
            t = rng.uniform(max(w.start, w.join[a], w.join[b]), w.end)
            rows.append((int(t), int(a), int(b), rng.uniform(0.1, 0.5), APP))
    if not rows:
        return
    t_ms, m, to, ch = (np.asarray([r[i] for r in rows], dtype=np.int64) for i in (0, 1, 2, 4))
    share = np.asarray([r[3] for r in rows], dtype=np.float64)
    cols = w.attach(m, t_ms, ch, with_card=False)
    ev.add(t_ms, np.where(to >= 0, XFER, RED), m, ch, "household_transfer", share=share, cp=to, **cols)


def _account_takeovers(w: _World, ev: _Events) -> None:
    """Contact change, then within hours an attacker device/IP drains the balance: a large
    redemption (sometimes after a small test one) or a transfer to a mule who redeems.
    Attackers work in campaigns of a few weeks from a small pool of devices and addresses."""
    rng = w.rng
    n = w.count(0.0065)
    old = np.flatnonzero((w.join < w.start - 180 * DAY) & (w.balance0 >= 1500))
    if n == 0 or len(old) == 0:
        return
    victims = rng.choice(old, n, replace=n > len(old), p=_normalise(w.balance0[old].astype(float)))
    attackers = max(1, n // 8)
    att_dev, att_ip = w.devices.take(2 * attackers).reshape(-1, 2), w.ips.take(3 * attackers).reshape(-1, 3)
    campaign = rng.uniform(w.fraud_from, w.end - 23 * DAY, attackers)
    for victim in victims.tolist():
        a = rng.integers(attackers)
        t0 = w.moment(max(campaign[a], w.join[victim]), campaign[a] + 21 * DAY)
        dev = int(att_dev[a, rng.integers(2)]) if rng.random() < 0.65 else w.devices.one()
        ip = int(att_ip[a, rng.integers(3)]) if rng.random() < 0.65 else w.ips.one()
        if rng.random() < 0.92:
            w.change(victim, t0)
        t = t0 + rng.uniform(2 * MINUTE, 6 * HOUR)
        ch = WEB if rng.random() < 0.6 else APP
        if rng.random() < 0.3:
            ev.add(int(t), RED, victim, ch, "account_takeover", share=rng.uniform(0.03, 0.1), device=dev, ip=ip)
            t += rng.uniform(3 * MINUTE, 60 * MINUTE)
        if rng.random() < 0.75:
            ev.add(int(t), RED, victim, ch, "account_takeover", share=rng.uniform(0.8, 1.0), device=dev, ip=ip)
        else:
            mule = w.account(t - rng.uniform(1, 60) * DAY, int(rng.integers(0, 300)))
            ev.add(
                int(t), XFER, victim, ch, "account_takeover", share=rng.uniform(0.8, 1.0), cp=mule, device=dev, ip=ip
            )
            later = int(t + rng.uniform(10 * MINUTE, 12 * HOUR))
            ev.add(later, RED, mule, ch, "account_takeover", share=rng.uniform(0.9, 1.0), device=dev, ip=ip)
        w.change(victim, t0 + rng.uniform(1, 6) * DAY)


def _transfer_rings(w: _World, ev: _Events) -> None:
    """New accounts (sign-up bonuses) on shared devices funnel points to a collector, in a
    star or a chain, and the collector redeems everything."""
    rng = w.rng
    for _ in range(w.count(0.0022)):
        t0 = w.moment(w.fraud_from, w.end - 3 * DAY)
        k = min(10, 3 + rng.poisson(2))
        ring = [w.account(t0 - rng.uniform(1, 45) * DAY, int(rng.integers(800, 3000))) for _ in range(k)]
        devs, ips = w.devices.take(int(rng.integers(1, 3))), w.ips.take(int(rng.integers(1, 3)))
        collector, mules = ring[0], ring[1:]
        hops: list[tuple[float, int, int]] = []
        if rng.random() < 0.7:
            hops = [
                (t0 + x, m, collector)
                for x, m in zip(np.sort(rng.uniform(0, 36 * HOUR, len(mules))), mules, strict=True)
            ]
        else:
            t, chain = t0, [*mules, collector]
            for src, dst in itertools.pairwise(chain):
                t += rng.uniform(10 * MINUTE, 6 * HOUR)
                hops.append((t, src, dst))
        for t, src, dst in hops:
            ev.add(int(t), XFER, src, APP, "transfer_ring", share=rng.uniform(0.9, 1.0), cp=dst,
                   device=rng.choice(devs), ip=rng.choice(ips))  # fmt: skip
        t_red = int(hops[-1][0] + rng.uniform(10 * MINUTE, 24 * HOUR))
        ev.add(t_red, RED, collector, rng.choice([APP, WEB]), "transfer_ring", share=rng.uniform(0.9, 1.0),
               device=rng.choice(devs), ip=rng.choice(ips))  # fmt: skip


def _card_bursts(w: _World, ev: _Events) -> None:
    """A stolen card buys many small things within minutes to farm points, on one to three
    accounts (mostly freshly opened) from one device."""
    rng = w.rng
    for _ in range(w.count(0.008)):
        card, dev, ip = w.cards.one(), w.devices.one(), w.ips.one()
        ch = rng.choice([WEB, APP, POS], p=[0.5, 0.3, 0.2])
        t0 = w.moment(w.fraud_from, w.end - 5 * HOUR, POS_HOURS if ch == POS else WEB_HOURS)
        store = int(w.popular_store(1)[0]) if ch == POS else -1
        emp = int(w.cashier(np.array([store]))[0]) if ch == POS else -1
        accounts = 1 if rng.random() < 0.7 else int(rng.integers(2, 4))
        for i in range(accounts):
            if i == 0 and rng.random() < 0.4:
                member = int(rng.choice(np.flatnonzero(w.join < t0)))
            else:
                member = w.account(t0 - rng.uniform(0, 30) * DAY, 0)
            k = 4 + rng.poisson(6) if i == 0 else 3 + rng.poisson(3)
            start = t0 + (rng.uniform(0, 60 * MINUTE) if i else 0)
            t = (start + np.sort(rng.uniform(0, rng.uniform(10, 240) * MINUTE, k))).astype(np.int64)
            online = ch != POS
            ev.add(t, PUR, member, ch, "burst", amount=rng.integers(100, 3000, k), card=card, store=store,
                   employee=emp, device=dev if online else -1, ip=ip if online else -1)  # fmt: skip


def _store_abuse(w: _World, ev: _Events) -> None:
    """A cashier scans an accomplice's loyalty id on other customers' receipts, shift after shift."""
    rng = w.rng
    for _ in range(w.count(0.0011)):
        store = int(w.popular_store(1)[0])
        first = int(w.cashier_first[store])
        count = int(np.sum(w.cashier_store == store))
        emp = first + int(rng.integers(count))
        t0 = rng.uniform(w.fraud_from, w.end - 10 * DAY)
        locals_ = np.flatnonzero((w.home_store == store) & (w.join < t0))
        member = int(rng.choice(locals_)) if len(locals_) else int(rng.choice(np.flatnonzero(w.join < t0)))
        days = np.sort(rng.choice(30, int(rng.integers(3, 13)), replace=False))
        for day in days.tolist():
            k = int(rng.integers(2, 10))
            shift = t0 + day * DAY + rng.choice([8, 14]) * HOUR
            t = (shift + np.sort(rng.uniform(0, 8 * HOUR, k))).astype(np.int64)
            u = rng.random(k)
            card = np.where(u < 0.3, w.card1[rng.integers(0, w.n, k)], np.where(u < 0.5, w.cards.take(k), -1))
            amount = np.maximum(rng.lognormal(np.log(3500), 0.6, k), 50).astype(np.int64)
            ev.add(t, PUR, member, POS, "store_abuse", amount=amount, store=store, employee=emp, card=card)


def _return_fraud(w: _World, ev: _Events) -> None:
    """Large returns in a few days across stores the member never bought at, often for cash."""
    rng = w.rng
    for _ in range(w.count(0.0022)):
        t0 = rng.uniform(w.fraud_from, w.end - 5 * DAY)
        if rng.random() < 0.7:
            member = int(rng.choice(np.flatnonzero(w.join < t0)))
            card = int(w.card1[member]) if rng.random() < 0.5 else -1
        else:
            member, card = w.account(t0 - rng.uniform(5, 60) * DAY, 0), -1
        k = 2 + rng.poisson(2)
        t = np.sort([w.moment(t0, t0 + 4 * DAY, POS_HOURS) for _ in range(k)]).astype(np.int64)
        store = w.popular_store(k)
        if member < w.n:
            store = np.where(rng.random(k) < 0.3, w.home_store[member], store)
        amount = np.maximum(rng.lognormal(np.log(9000), 0.6, k), 1500).astype(np.int64)
        ev.add(t, RET, member, POS, "return_fraud", amount=amount, store=store, employee=w.cashier(store), card=card)


def generate(config: SynthConfig) -> SynthData:
    """Generates one programme's events; the same config always gives the same data."""
    rng = np.random.default_rng(config.seed)
    w = _World(config, rng)
    ev = _Events()
    _contact_changes(w)
    _households(w, ev)
    bought = [_purchases(w, ev), *_bursts_benign(w, ev)]
    _returns(w, ev, bought)
    _redemptions(w, ev)
    _new_phones(w, ev)
    _account_takeovers(w, ev)
    _transfer_rings(w, ev)
    _card_bursts(w, ev)
    _store_abuse(w, ev)
    _return_fraud(w, ev)
    cols = ev.concat()
    join = np.concatenate([w.join, np.asarray(w.extra_join, dtype=np.int64)])
    balance0 = np.concatenate([w.balance0, np.asarray(w.extra_balance, dtype=np.int64)])
    t, member = cols["t"], cols["member"]
    valid = (t >= config.start_ms) & (t < config.end_ms) & (t >= join[member])
    order = np.flatnonzero(valid)[np.argsort(t[valid], kind="stable")]
    cols = {name: col[order] for name, col in cols.items()}
    points, before, kept, snapshot = _balances(cols, balance0, config.end_ms - CHURN_HORIZON_DAYS * DAY)
    cols = {name: col[kept] for name, col in cols.items()}
    pattern = cols["pattern"].astype(np.int64)
    _mark_busy_cashiers(cols, pattern, config.days)
    fraud = np.isin(pattern, [_P[p] for p in FRAUD_PATTERNS])
    noise = rng.random(len(pattern))
    label = np.where(fraud, noise >= config.label_noise, noise < config.benign_noise)
    data = dict(
        t_ms=cols["t"], kind=cols["kind"], member=cols["member"], channel=cols["channel"], store=cols["store"],
        amount_minor=cols["amount"], points=points[kept], balance_points=before[kept], device=cols["device"],
        ip=cols["ip"], card=cols["card"], employee=cols["employee"], counterparty=cols["cp"],
        contact_changed_ms=_contact_at(w, cols["member"], cols["t"]), pattern=pattern,
    )  # fmt: skip
    churn = _churn_set(config, w.n, data, join, snapshot, w.segment)
    return SynthData(config=config, label=label, member_join_ms=join, churn=churn, **data)


def _balances(
    cols: dict[str, npt.NDArray[Any]], balance0: I64, snapshot_ms: int
) -> tuple[I64, I64, npt.NDArray[np.bool_], I64]:
    """Replays the ledger in time order: 1 point per currency unit earned, redemptions and
    transfers take a share of the balance then, returns take their points back. A redemption
    or transfer the balance cannot pay for is dropped, as the ledger would refuse it. Also
    returns every balance as it stood at `snapshot_ms`."""
    times = cols["t"].tolist()
    kinds, members, cps = cols["kind"].tolist(), cols["member"].tolist(), cols["cp"].tolist()
    amounts, shares = cols["amount"].tolist(), cols["share"].tolist()
    balance = balance0.tolist()
    n = len(kinds)
    points, before, kept = [0] * n, [0] * n, [True] * n
    snapshot: list[int] | None = None
    for i in range(n):
        if snapshot is None and times[i] > snapshot_ms:
            snapshot = balance.copy()
        k, m = kinds[i], members[i]
        b = balance[m]
        before[i] = b
        if k == PUR:
            points[i] = p = amounts[i] // 100
            balance[m] = b + p
        elif k == RET:
            points[i] = p = amounts[i] // 100
            balance[m] = max(0, b - p)
        else:
            floor = 200 if k == RED else 100
            if b < floor:
                kept[i] = False
                continue
            points[i] = p = min(b, max(floor, int(shares[i] * b)))
            balance[m] = b - p
            if k == XFER:
                balance[cps[i]] += p
    final = np.asarray(balance if snapshot is None else snapshot, np.int64)
    return np.asarray(points, np.int64), np.asarray(before, np.int64), np.asarray(kept, bool), final


def _mark_busy_cashiers(cols: dict[str, npt.NDArray[Any]], pattern: I64, days: int) -> None:
    """Names the honest purchases of the busiest tenth of cashiers (by volume) `busy_cashier`."""
    emp = cols["employee"].astype(np.int64)
    has = emp >= 0
    if not has.any():
        return
    volume = np.bincount(emp[has])
    busy = volume >= max(np.quantile(volume[volume > 0], 0.9), days * 10)
    mark = has & busy[np.maximum(emp, 0)] & (pattern == _P["benign"]) & (cols["kind"] == PUR)
    pattern[mark] = _P["busy_cashier"]


def _contact_at(w: _World, member: I64, t: I64) -> I64:
    """The member's latest contact change at or before each event, or -1."""
    if not w.change_member:
        return np.full(len(t), -1, np.int64)
    base = w.start - 4000 * DAY
    cm, ct = np.asarray(w.change_member, np.int64), np.asarray(w.change_t, np.int64)
    keys = np.sort((cm << 39) | (ct - base))
    idx = np.searchsorted(keys, (member << 39) | (t - base), side="right") - 1
    hit = keys[np.maximum(idx, 0)]
    ok = (idx >= 0) & ((hit >> 39) == member)
    return np.where(ok, (hit & ((1 << 39) - 1)) + base, -1)


def _churn_set(cfg: SynthConfig, regular: int, cols: dict[str, I64], join: I64, balance: I64, segment: I64) -> ChurnSet:
    """The ledger's view of each regular member at `churn_as_of`, and the outcome after it."""
    as_of = cfg.end_ms - CHURN_HORIZON_DAYS * DAY
    t, m, kind = cols["t_ms"], cols["member"], cols["kind"]
    mine = m < regular
    buy = mine & (kind == PUR)
    past = t <= as_of

    def count(mask: npt.NDArray[np.bool_], weights: I64 | None = None) -> I64:
        return np.bincount(m[mask], weights=None if weights is None else weights[mask], minlength=regular).astype(
            np.int64
        )

    def last(mask: npt.NDArray[np.bool_]) -> I64:
        out = np.full(regular, -1, np.int64)
        np.maximum.at(out, m[mask], t[mask])
        return out

    n30, n90 = count(buy & past & (t > as_of - 30 * DAY)), count(buy & past & (t > as_of - 90 * DAY))
    n365 = count(buy & past & (t > as_of - 365 * DAY))
    spend90 = count(buy & past & (t > as_of - 90 * DAY), cols["amount_minor"])
    after = count(buy & ~past)
    last_buy, last_red = last(buy & past), last(mine & past & (kind == RED))
    spend365 = count(buy & past & (t > as_of - 365 * DAY), cols["amount_minor"])
    tiers = np.where(spend365 >= 150_000, "gold", np.where(spend365 >= 50_000, "silver", "bronze"))
    active = np.flatnonzero((n365 > 0) & (join[:regular] < as_of - 30 * DAY))
    activities = tuple(
        MemberActivity(
            member_id=f"m{i:07d}",
            member_since=_dt(int(join[i])),
            last_purchase_at=_dt(int(last_buy[i])) if last_buy[i] >= 0 else None,
            purchases_30d=int(n30[i]),
            purchases_90d=int(n90[i]),
            purchases_365d=int(n365[i]),
            spend_90d_minor=int(spend90[i]),
            balance_points=int(balance[i]),
            last_redemption_at=_dt(int(last_red[i])) if last_red[i] >= 0 else None,
            segment=SEGMENTS[segment[i]],
            tier=str(tiers[i]),
        )
        for i in active.tolist()
    )
    return ChurnSet(as_of=_dt(as_of), activities=activities, churned=after[active] == 0)
