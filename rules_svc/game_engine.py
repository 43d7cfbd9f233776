"""Gamification progress as pure arithmetic: one purchase fact in, progress and awards out.

No I/O here: the store (game_store.py) loads a member's progress, calls `apply`, and saves the
result with the awards in one transaction, so a purchase event counts once. Award keys are
deterministic (program, item, member, period), so the reward posted to the ledger under that
key can only ever be paid once, however often an event is delivered (one revoked and earned
again is keyed apart: game_store.py). `withdraw` takes back what `apply` counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from fractions import Fraction
from zoneinfo import ZoneInfo

from rules_svc.fx import convert_minor, rates_of
from rules_svc.program import Achievement, Challenge, Distinct, GameMatch, Program, Streak


@dataclass(frozen=True, slots=True)
class PurchaseFact:
    event_id: str
    member_id: str
    purchase_id: str
    channel: str
    store_id: str
    total_minor: int
    currency: str
    receipt_time: datetime
    categories: tuple[str, ...] = ()
    earned: tuple[tuple[str, int], ...] = ()  # points per unit the purchase earned
    experiment_arms: tuple[tuple[str, str], ...] = ()

    def points(self, unit: str) -> int:
        return dict(self.earned).get(unit, 0)


@dataclass(slots=True)
class ItemState:
    """A member's progress on one item (stored as JSON)."""

    seen: list[str] = field(default_factory=list)  # distinct values counted, up to the count (achievements)
    count: int = 0  # matching purchases (challenges)
    completions: int = 0
    last_completed_us: int = 0
    last_week: int = 0  # week number (Monday ordinal // 7) of the newest matching purchase (streaks)
    run: int = 0  # consecutive weeks ending at last_week
    weeks: list[int] = field(default_factory=list)  # recent matching weeks (streaks; late receipts fill gaps)
    paid: list[list[int]] = field(default_factory=list)  # [first, last] week of each streak already paid
    period: str = ""  # the challenge window this progress belongs to (an id reused later starts afresh)
    period_ends_us: int = 0  # that window's end (0: stored before ends were kept)
    kept_from: int = 0  # streaks: weeks before this one were forgotten (past the lateness horizon)
    # What the item asked for when it was completed (0: completed before this was kept, or not
    # completed): a withdrawal judges the award by it, whichever version counted the purchase
    # taken back, so a later version's changed target neither revokes nor keeps it.
    target: int = 0
    # "achievement", "streak" or "challenge" ("": stored before this was kept): an id a later
    # version gives another kind of item starts afresh, as a new item would.
    kind: str = ""


@dataclass(frozen=True, slots=True)
class Counted:
    """What one purchase gave one item, kept so that taking the purchase back (a full return,
    a rejected fraud review) takes back exactly that: an achievement's distinct value, a
    streak's week (as text), or a place in a challenge window (`period`; `counts` when it
    raised the count, else it came after the target and stands in should a counted one go)."""

    item_id: str
    value: str = ""
    period: str = ""
    counts: bool = False
    # Filled in by the store, which keeps them per purchase ('' for progress counted before it
    # kept them: never withdrawn).
    purchase_id: str = ""
    receipt_us: int = 0


WEEK = "week"  # the period of a streak's Counted (a challenge's is its window, an achievement's '')


@dataclass(frozen=True, slots=True)
class Revoked:
    """An award a withdrawn purchase no longer earns: the one keyed under any of `periods` (as
    Award.period: an achievement's "once", a challenge's windows of its id that overlap; all
    but `keep` of them where merged accounts each earned one), or,
    with no periods, for a streak the awards of runs that began within [first_week, last_week]
    beyond the `keep` that its `runs` (still long enough) can hold; those whose runs began
    outside them go first."""

    item_id: str
    periods: tuple[str, ...] = ()
    first_week: int = 0
    last_week: int = 0
    keep: int = 0
    runs: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Award:
    item_id: str
    name: str
    period: str
    points: int
    unit: str

    def key(self, program: str, member_id: str) -> str:
        return f"{program}:{self.item_id}:{member_id}:{self.period}"


@dataclass(frozen=True, slots=True)
class ProgramHistory:
    """What all published versions of a program say together, for what the version in effect
    at one receipt cannot decide alone: how late any receipt may still arrive (so a streak
    forgets nothing a late receipt could still join), and where each challenge window ends as
    last published (so a window cut short and its id reused is told from a correction), and
    how long any version lets a purchase be taken back (so the store keeps its share that long)."""

    max_lateness_days: int
    # (challenge id, starts as Unix seconds) -> ends in Unix microseconds, as the latest version
    # (in the order versions take effect) that defines a window starting then has it
    window_ends_us: Mapping[tuple[str, int], int]
    max_final_after_days: int = 0
    # achievement id -> the most distinct values any version asks for
    achievement_counts: Mapping[str, int] = field(default_factory=dict)
    # as window_ends_us, the latest end any version gave the window (a receipt counted under a
    # version in effect then may lie past where a later version cut it short)
    window_max_ends_us: Mapping[tuple[str, int], int] = field(default_factory=dict)
    # item id -> its kind in the latest version that has the id (an id reused for another kind)
    kinds: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, programs: Iterable[Program]) -> ProgramHistory:
        """`programs` in the order they take effect."""
        lateness, final, counts, kinds = 0, 0, dict[str, int](), dict[str, str]()
        ends, max_ends = dict[tuple[str, int], int](), dict[tuple[str, int], int]()
        for p in programs:
            lateness = max(lateness, p.policy.max_lateness_days)
            final = max(final, p.gamification.final_after_days)
            for c in p.gamification.challenges:
                window = (c.id, int(c.starts.timestamp()))
                ends[window] = epoch_us(c.ends)
                max_ends[window] = max(max_ends.get(window, 0), ends[window])
            for a in p.gamification.achievements:
                counts[a.id] = max(counts.get(a.id, 0), a.count)
            g = p.gamification
            kinds |= {a.id: kind_of(a) for a in g.achievements} | {x.id: kind_of(x) for x in g.streaks}
            kinds |= {c.id: kind_of(c) for c in g.challenges}
        return cls(lateness, ends, final, counts, max_ends, kinds)

    def run_ends_us(self, challenge_id: str, period: str) -> int:
        """Where the run of this id's windows that overlap one another (one challenge whose
        dates were corrected, however often) around `period` ends, as far as any version took
        them; 0 for a window no version publishes. A withdrawal under any window of the run may read places counted under
        another (`overlapping_periods`), so a place is history only once the whole run is."""
        start = _period_start(period)
        windows = sorted((s * 1_000_000, e) for (c, s), e in self.window_max_ends_us.items() if c == challenge_id)
        run_start = run_end = -1
        for s, e in windows:
            if s < run_end:  # overlaps the run so far
                run_end = max(run_end, e)
                continue
            if run_start <= start * 1_000_000 < run_end:
                return run_end
            run_start, run_end = s, e
        return run_end if run_start <= start * 1_000_000 < run_end else 0

    def ends_us(self, challenge_id: str, period: str, default_us: int) -> int:
        return self.window_ends_us.get((challenge_id, _period_start(period)), default_us)

    def end_of(self, item: Challenge) -> int:
        """Where the challenge's window ends (Unix microseconds) as its latest version publishes it."""
        return self.ends_us(item.id, challenge_period(item), epoch_us(item.ends))


def matches(match: GameMatch, fact: PurchaseFact, fx: tuple[str, dict[str, Fraction]] = ("", {})) -> bool:
    if match.channels and fact.channel not in match.channels:
        return False
    if match.stores and fact.store_id not in match.stores:
        return False
    if match.categories and not set(match.categories) & set(fact.categories):
        return False
    least = match.min_total
    if least is None:
        return True
    total = convert_minor(fact.total_minor, fact.currency, least.currency, *fx)
    return total is not None and total >= least.amount_minor


def week_of(day: date) -> int:
    """Consecutive integers for consecutive ISO weeks (Monday to Sunday)."""
    return (day - timedelta(days=day.weekday())).toordinal() // 7


def epoch_us(when: datetime) -> int:
    return int(when.timestamp() * 1_000_000)


def _distinct_values(item: Achievement, fact: PurchaseFact, local_day: date) -> list[str]:
    kind = item.distinct
    if kind == Distinct.STORE:
        return [fact.store_id] if fact.store_id else []  # web and app purchases have no store
    if kind == Distinct.CATEGORY:
        wanted = item.match.categories
        return [c for c in fact.categories if not wanted or c in wanted]
    if kind == Distinct.CHANNEL:
        return [fact.channel]
    if kind == Distinct.DAY:
        return [local_day.isoformat()]
    return [fact.purchase_id]


def _achievement(item: Achievement, state: ItemState, fact: PurchaseFact, local_day: date,
                 counted: list[Counted]) -> Award | None:  # fmt: skip
    values = _distinct_values(item, fact, local_day)
    counted.extend(Counted(item.id, value) for value in dict.fromkeys(values))  # after completion too
    # Beyond the count, values say nothing more (game_counted keeps them for `withdraw`); this also
    # trims progress a withdrawal stored whole before it kept only the count.
    del state.seen[item.count :]
    if state.completions:
        return None
    for value in values:
        if value not in state.seen:
            state.seen.append(value)
    del state.seen[item.count :]
    if len(state.seen) < item.count:
        return None
    state.completions, state.last_completed_us, state.target = 1, epoch_us(fact.receipt_time), item.count
    return Award(item.id, item.name, "once", item.reward.points, item.reward.unit)


def _streak(item: Streak, state: ItemState, fact: PurchaseFact, week: int, late_weeks: int,
            counted: list[Counted]) -> Award | None:  # fmt: skip
    """A run of `item.weeks` or more consecutive weeks pays once, keyed by its first week.

    A late receipt may fill a gap and join two runs; a run that overlaps one already paid
    extends it instead of paying again. Weeks older than the lateness window are forgotten.
    """
    if not state.weeks and state.run:  # progress stored before weeks were kept
        first = state.last_week - state.run + 1
        state.weeks = list(range(first, state.last_week + 1))
        state.paid = [[first, state.last_week]] if state.run >= item.weeks else []
    weeks = set(state.weeks)
    newest = max(weeks, default=week)
    horizon = newest - late_weeks - item.weeks - 1
    if week < horizon:
        return None  # a receipt older than any run still open
    counted.append(Counted(item.id, str(week), WEEK))
    # A week already counted goes on all the same: a version that asks for fewer weeks than the
    # run already has pays it on the member's next purchase, even one in a week counted before
    # (waiting for a new week would pay nothing if the member misses it).
    weeks.add(week)
    first = last = week
    while first - 1 in weeks:
        first -= 1
    while last + 1 in weeks:
        last += 1
    award = None
    if last - first + 1 >= item.weeks:
        overlapping = [p for p in state.paid if p[0] <= last and p[1] >= first]
        if overlapping:
            state.paid = [p for p in state.paid if p not in overlapping]
            state.paid.append([min(first, *(p[0] for p in overlapping)), max(last, *(p[1] for p in overlapping))])
        else:
            state.paid.append([first, last])
            state.completions += 1
            state.last_completed_us = epoch_us(fact.receipt_time)
            award = Award(item.id, item.name, f"run-{first}", item.reward.points, item.reward.unit)
    newest = max(weeks)
    horizon = newest - late_weeks - item.weeks - 1
    state.weeks = sorted(w for w in weeks if w >= horizon)
    state.paid = sorted(p for p in state.paid if p[1] >= horizon)
    state.kept_from = max(state.kept_from, horizon)
    _newest_run(state)
    return award


def _newest_run(state: ItemState) -> None:
    weeks = set(state.weeks)
    state.last_week = newest = max(weeks, default=0)
    run = 0
    while newest - run in weeks:
        run += 1
    state.run = run


def challenge_period(item: Challenge) -> str:
    return f"from-{int(item.starts.timestamp())}"


def join_key(item: Challenge) -> str:
    """What joining an opt-in challenge records: its id and window, so a reused id asks again."""
    return f"{item.id}@{challenge_period(item)}"


# A till's clock may run behind the app's: a purchase rung up this long before the member joined
# (by the till's receipt time) is taken for one made just after, as the member saw it.
JOIN_CLOCK_SKEW = timedelta(minutes=5)


def has_joined(joined: Mapping[str, int], item: Challenge, history: ProgramHistory | None = None,
               at: datetime | None = None) -> bool:  # fmt: skip
    """Joined this challenge (by `at`, when given: a purchase counts only if made after joining,
    however late its receipt arrives). `joined` maps each join key to when it was recorded
    (Unix microseconds; 0 for joins recorded before their time was kept). Joined under a bare id
    (joined before windows were kept), or under the key of any window of its id that overlaps
    this one as `history` publishes it (`starts` corrected either way: the same challenge, so
    the join stands; a reused id's older window ended before this one began). A window no
    version publishes now counts if it started inside this one."""
    by_us = epoch_us(at + JOIN_CLOCK_SKEW) if at is not None else None

    def in_time(key: str) -> bool:
        return by_us is None or joined[key] <= by_us

    if item.id in joined and in_time(item.id):
        return True
    history = history or ProgramHistory.of(())
    overlapping = set(overlapping_periods(item, history))
    starts_us = epoch_us(item.starts)
    ends_us = history.end_of(item)
    for key in joined:
        start = key.removeprefix(f"{item.id}@from-")
        if start == key or not start.isdigit() or not in_time(key):
            continue  # another challenge's join, or one made after `at`
        if f"from-{start}" in overlapping:
            return True
        if (item.id, int(start)) not in history.window_ends_us and starts_us <= int(start) * 1_000_000 < ends_us:
            return True
    return False


def _stored_for(state: ItemState, item: Challenge) -> bool:
    """Whether stored progress was counted under exactly this window. Progress stored before
    windows were kept belongs to it unless it was completed before it began."""
    if state.period:
        return state.period == challenge_period(item)
    return not (state.completions and state.last_completed_us < epoch_us(item.starts))


def _stored_ends_us(state: ItemState, item: Challenge, history: ProgramHistory) -> int:
    """The end of the window the progress was counted under, as its latest version publishes it
    (a member who bought nothing since it was cut short still holds the older end)."""
    return history.ends_us(item.id, state.period, state.period_ends_us) if state.period else 0


def in_window(state: ItemState, item: Challenge, history: ProgramHistory | None = None) -> bool:
    """Whether stored progress belongs to the challenge as published now: counted under this
    window, or under one of the same id that overlaps it (its dates were corrected since)."""
    if _stored_for(state, item):
        return True
    history = history or ProgramHistory.of(())
    stored_start_us = _period_start(state.period) * 1_000_000 if state.period else 0
    stored_ends_us = _stored_ends_us(state, item, history)
    ends_us = history.end_of(item)
    return bool(stored_ends_us) and stored_start_us < ends_us and epoch_us(item.starts) < stored_ends_us


def overlapping_periods(item: Challenge, history: ProgramHistory) -> list[str]:
    """The periods of this id's published windows that overlap the challenge's window (itself
    included): one challenge whose dates were corrected, whose progress counts as one."""
    starts_us = epoch_us(item.starts)
    ends_us = history.end_of(item)
    found = {challenge_period(item)}
    for (challenge_id, start), window_ends_us in history.window_ends_us.items():
        if challenge_id == item.id and start * 1_000_000 < ends_us and starts_us < window_ends_us:
            found.add(f"from-{start}")
    return sorted(found)


def _period_start(period: str) -> int:
    return int(period.removeprefix("from-"))


def _challenge(item: Challenge, state: ItemState, fact: PurchaseFact, joined: bool,
               history: ProgramHistory, counted: list[Counted]) -> Award | None:  # fmt: skip
    """Counts a receipt under the version of the challenge in effect at its receipt time. Two
    windows of one id that overlap are one challenge whose dates were corrected: progress
    carries over and pays once. Only a window that begins after the stored one ended is the id
    reused (counted afresh), and a receipt for a window that ended before the stored one began
    is a late one for the old window (not counted). Where each window ends is what its latest
    version publishes, not what the version at hand or the member's progress remembers."""
    if not item.starts <= fact.receipt_time < item.ends:
        return None
    period = challenge_period(item)
    start, ends_us = _period_start(period), history.end_of(item)
    if not _stored_for(state, item):
        stored_start = _period_start(state.period) if state.period else 0
        if stored_start > start:
            if ends_us <= stored_start * 1_000_000:
                return None  # a late receipt for an older window the id has since moved on from
            state.period, state.period_ends_us = period, ends_us  # moved to start earlier: adopted
        elif not (state.period and _stored_ends_us(state, item, history) > start * 1_000_000):
            state.count, state.completions, state.last_completed_us = 0, 0, 0  # the id reused: count afresh
            state.period, state.period_ends_us = period, ends_us
        # else: the stored window began earlier and still ran when this one begins (a receipt
        # counted under the version before a correction): it stays under the stored window.
    else:
        state.period, state.period_ends_us = period, ends_us
    if item.opt_in and not joined:
        return None
    if state.completions:
        counted.append(Counted(item.id, period=state.period))  # a stand-in, should a counted one go
        return None
    counted.append(Counted(item.id, period=state.period, counts=True))
    state.count += 1
    if state.count < item.purchases:
        return None
    state.completions, state.last_completed_us, state.target = 1, epoch_us(fact.receipt_time), item.purchases
    return Award(item.id, item.name, state.period, item.reward.points, item.reward.unit)


def kind_of(item: Achievement | Streak | Challenge) -> str:
    return "achievement" if isinstance(item, Achievement) else "streak" if isinstance(item, Streak) else "challenge"


def stored_state(states: Mapping[str, ItemState], item: Achievement | Streak | Challenge) -> ItemState | None:
    """The member's progress on `item`, None where there is none or the id held another kind."""
    state = states.get(item.id)
    return state if state is not None and state.kind in ("", kind_of(item)) else None


def state_of(states: dict[str, ItemState], item: Achievement | Streak | Challenge,
             history: ProgramHistory) -> ItemState | None:  # fmt: skip
    """The member's progress on `item` (stored in `states`): fresh where the id held another
    kind of item (its completion is not this item's; its awards keep their own keys). None for
    an item of a kind the id no longer has (a late receipt counted under an older version):
    the id's progress is the current kind's, and that receipt counts for nothing else."""
    kind = kind_of(item)
    state = stored_state(states, item)
    if state is None and item.id in states and history.kinds.get(item.id, kind) != kind:
        return None
    if state is None:
        state = states[item.id] = ItemState()
    state.kind = kind
    return state


def apply(program: Program, states: dict[str, ItemState], joined: Mapping[str, int], fact: PurchaseFact,
          history: ProgramHistory | None = None, counted: list[Counted] | None = None) -> list[Award]:  # fmt: skip
    """Advances every item the purchase matches; `states` is updated in place, and `counted`
    (when given) receives what the purchase gave each item (for `withdraw`). `program` is the
    version in effect at the receipt time, `history` what all published versions say (without
    it, `program` is taken for the only version there is).

    Days (distinct-day achievements) are the store's local days; streak weeks are ISO weeks
    in the program's time zone, so a member's streak does not depend on where they shop.
    """
    history = history or ProgramHistory.of([program])
    default_zone = ZoneInfo(program.default_timezone)
    store_zone = next((ZoneInfo(s.timezone) for s in program.stores if s.id == fact.store_id), default_zone)
    store_day = fact.receipt_time.astimezone(store_zone).date()
    week = week_of(fact.receipt_time.astimezone(default_zone).date())
    # Weeks a streak keeps: as late as any version accepts a receipt, since the one in effect at
    # a late receipt's time decides, and an older version may accept more than the newest.
    late_days = max(program.policy.max_lateness_days, history.max_lateness_days)
    late_weeks = -(-late_days // 7) + 1
    fx = rates_of(program)
    awards: list[Award | None] = []
    counted = [] if counted is None else counted
    g = program.gamification
    for a in g.achievements:
        if matches(a.match, fact, fx) and (found := state_of(states, a, history)) is not None:
            awards.append(_achievement(a, found, fact, store_day, counted))
    for s in g.streaks:
        if matches(s.match, fact, fx) and (found := state_of(states, s, history)) is not None:
            awards.append(_streak(s, found, fact, week, late_weeks, counted))
    for c in g.challenges:
        if matches(c.match, fact, fx) and (state := state_of(states, c, history)) is not None:
            joined_then = has_joined(joined, c, history, fact.receipt_time)
            awards.append(_challenge(c, state, fact, joined_then, history, counted))
    return [a for a in awards if a is not None]


def is_final(program: Program, receipt_time: datetime, taken_back_at: datetime) -> bool:
    """A purchase taken back later than `final_after_days` after its receipt keeps what it gave
    (the version in effect at the receipt says how long). Both times come from the ledger's
    events, so a replay decides the same."""
    return taken_back_at - receipt_time > timedelta(days=program.gamification.final_after_days)


def withdraw(program: Program, states: dict[str, ItemState], gone: list[Counted], remaining: list[Counted],
             history: ProgramHistory | None = None) -> tuple[list[Revoked], list[Counted]]:  # fmt: skip
    """Takes back what a withdrawn purchase gave (`gone`, as `apply` counted it), given what the
    member's other purchases still give the same items (`remaining`); `states` is updated in
    place. `program` is the version in effect at the purchase's receipt, `history` what all
    versions say. Returns the awards no longer earned and the stand-ins promoted to counted.

    A value or week another purchase also gave stays; a challenge's place passes to the first
    purchase that came after the target. An award is revoked only when what remains falls short
    of it; the item can then be completed again (the store keys the new award apart). Progress
    under a challenge window the id has since left is history and left alone; so is an item no
    longer in the program."""
    history = history or ProgramHistory.of([program])
    revoked: list[Revoked] = []
    promoted: list[Counted] = []
    g = program.gamification
    for a in g.achievements:
        state = stored_state(states, a)
        mine = {c.value for c in gone if c.item_id == a.id and not c.period}
        if state is None or not mine:
            continue
        others = list(dict.fromkeys(c.value for c in remaining if c.item_id == a.id and not c.period))
        kept = [v for v in state.seen if v not in mine or v in others]
        need = _target(state, a.count)
        # Up to the count only: what the remaining purchases give is in `remaining` (game_counted)
        # whenever another withdrawal needs it, so a member with thousands of purchases does not
        # carry every one of them in the progress rewritten on each event.
        state.seen = (kept + [v for v in others if v not in kept])[: max(a.count, need)]
        if state.completions and len(state.seen) < need:
            state.completions, state.last_completed_us, state.target = 0, 0, 0
            revoked.append(Revoked(a.id, ("once",)))
    for s in g.streaks:
        state = stored_state(states, s)
        if state is not None:
            revoked.extend(_withdraw_weeks(s, state, gone, remaining))
    for c in g.challenges:
        state = stored_state(states, c)
        if state is not None:
            revoked.extend(_withdraw_place(c, state, gone, remaining, history, promoted))
    return revoked, promoted


def _target(state: ItemState, asked: int) -> int:
    """What a withdrawal holds the item's progress to: the target its award was earned under,
    else what the version at hand asks (`asked`)."""
    return state.target if state.completions and state.target else asked


def _withdraw_weeks(item: Streak, state: ItemState, gone: list[Counted], remaining: list[Counted]) -> list[Revoked]:
    """A week no other purchase gave goes; each paid range it was in may keep as many awards as
    it still has runs of `item.weeks` (the store, which knows the awards, revokes the rest and
    lowers `completions`, then settles the runs with `repay_runs`). The range is replaced by
    those runs: two runs a returned week split are two streaks, as if the week had never been
    bought, so buying on after the second does not join it to the first. Weeks before
    `kept_from` were forgotten past the lateness horizon while present (a paid range is a run):
    they count as there."""
    others = {c.value for c in remaining if c.item_id == item.id and c.period == WEEK}
    mine = {c.value for c in gone if c.item_id == item.id and c.period == WEEK}
    lost = {w for w in state.weeks if str(w) not in others and str(w) in mine}
    if not lost:
        return []
    state.kept_from = state.kept_from or min(state.weeks)  # progress stored before it was kept
    state.weeks = [w for w in state.weeks if w not in lost]
    present, floor = set(state.weeks), state.kept_from
    revoked, kept = [], []
    for first, last in state.paid:
        if not any(first <= w <= last for w in lost):
            kept.append([first, last])
            continue
        runs = _runs(lambda w: w in present or w < floor, first, last, item.weeks)
        revoked.append(Revoked(item.id, first_week=first, last_week=last, keep=len(runs), runs=tuple(runs)))
        kept.extend([a, b] for a, b in runs)
    state.paid = sorted(kept)
    _newest_run(state)
    return revoked


def repay_runs(item: Streak, state: ItemState, revoked: Revoked, kept_starts: Iterable[int]) -> list[Award]:
    """Settles the runs a withdrawal left of a paid range (`revoked.runs`, already the paid ranges
    `_withdraw_weeks` put in its place), given the first weeks of the range's awards the store
    kept. A run keeps the awards that began in it. One that began in none (its first week went
    back, or is in a stretch now too short) stays with the first run after it that has no award
    (else the last before it), and that run's paid range reaches back to the award's week, so
    that a later withdrawal still finds the award among the range's (a range of runs joined that
    way holds each run's award, like one a late week joined). A run left with no award is paid
    under its own key (`run-<first week>`): returns those awards, counted in `completions`."""
    runs = list(revoked.runs)
    awards_in = dict.fromkeys(runs, 0)
    homeless = []
    for start in sorted(kept_starts):
        home = next((r for r in runs if r[0] <= start <= r[1]), None)
        if home is None:
            homeless.append(start)
        else:
            awards_in[home] += 1
    paid = [list(p) for p in state.paid]
    for start in homeless:
        free = [r for r in runs if not awards_in[r]] or runs
        if not free:
            continue  # no run left: the store revoked every award of the range
        home = next((r for r in free if r[0] > start), free[-1])
        awards_in[home] += 1
        low, high = min(start, home[0]), max(start, home[1])
        joined = [p for p in paid if p[0] <= high and p[1] >= low]
        paid = [p for p in paid if p not in joined]
        paid.append([min([low, *(p[0] for p in joined)]), max([high, *(p[1] for p in joined)])])
    state.paid = sorted(paid)
    fresh = [Award(item.id, item.name, f"run-{r[0]}", item.reward.points, item.reward.unit)
             for r in runs if not awards_in[r]]  # fmt: skip
    state.completions += len(fresh)
    return fresh


def _runs(present: Callable[[int], bool], first: int, last: int, length: int) -> list[tuple[int, int]]:
    """The runs of at least `length` consecutive present weeks within [first, last]."""
    out, start = [], None
    for w in range(first, last + 2):
        if w <= last and present(w):
            start = w if start is None else start
        elif start is not None:
            if w - start >= length:
                out.append((start, w - 1))
            start = None
    return out


def _withdraw_place(item: Challenge, state: ItemState, gone: list[Counted], remaining: list[Counted],
                    history: ProgramHistory, promoted: list[Counted]) -> list[Revoked]:  # fmt: skip
    """The purchase's place in the member's current window (with the windows of the id that
    overlap it: its start was corrected) goes, and the first stand-in takes it."""
    overlapping = set(overlapping_periods(item, history))
    windows = overlapping if state.period in overlapping else {state.period}
    places = [x for x in gone if x.item_id == item.id and x.counts and x.period in windows]
    if not places:
        return []
    state.count = max(0, state.count - len(places))
    need = _target(state, item.purchases)
    mine = [x for x in remaining if x.item_id == item.id and x.period in windows]
    for stand_in in [x for x in mine if not x.counts]:
        if state.count >= need * max(1, state.completions):
            break
        state.count += 1
        promoted.append(stand_in)
    # More than one award is live only where merged accounts each completed the window.
    held = state.count // need if need else state.completions
    if state.completions > held:
        revoked = Revoked(item.id, tuple(sorted(windows)), keep=held)
        state.completions = held
        if not held:
            state.last_completed_us, state.target = 0, 0
        return [revoked]
    counted = sorted([x for x in mine if x.counts] + promoted, key=lambda x: (x.receipt_us, x.purchase_id))
    if state.completions and len(counted) == state.count >= need:  # no progress from before rows were kept
        state.last_completed_us = counted[need - 1].receipt_us  # when the target is reached now
    return []
