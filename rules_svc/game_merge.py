"""A person's two accounts made one: their progress merged, as pure arithmetic.

The ledger carries a merged member's purchase count, caps and tier qualification over to the
member it went to, once (docs/ledger.md, Merge); gamification follows the same rule, or the
person would be paid again for what one of their accounts already completed, and lose what the
other had made towards a challenge. The store (game_store.GameStore.merge) loads both members'
progress, merges it here and saves it under the heir with any award the union earns, in one
transaction. What either account completed stays completed (at the earlier time) and pays
nothing more; what neither completed and the two together reach pays once, on the heir.
"""

from __future__ import annotations

from dataclasses import replace

from rules_svc.game_engine import Award, ItemState, ProgramHistory, in_window, kind_of
from rules_svc.program import Achievement, Challenge, Program, Streak

Item = Achievement | Streak | Challenge


def merge_progress(program: Program, source: dict[str, ItemState], target: dict[str, ItemState], at_us: int,
                   history: ProgramHistory | None = None) -> list[Award]:  # fmt: skip
    """Merges the source's progress into `target` (in place) under `program`, the version in
    effect at the merge (`at_us`, when what the union completes is completed); returns the
    awards the union earns. An item that version no longer has is merged by what its progress
    holds, and earns nothing."""
    history = history or ProgramHistory.of([program])
    g = program.gamification
    items: dict[str, Item] = {a.id: a for a in g.achievements}
    items |= {s.id: s for s in g.streaks} | {c.id: c for c in g.challenges}
    awards: list[Award] = []
    for item_id, theirs in source.items():
        mine = target.get(item_id)
        if mine is None:
            target[item_id] = theirs
            continue
        item = items.get(item_id)
        kind = kind_of(item) if item is not None else ""
        mine_before, theirs_before = (bool(kind) and st.kind not in ("", kind) for st in (mine, theirs))
        # Progress on another kind of item the id was before is history: the other's stays.
        if mine_before != theirs_before:
            if mine_before:
                target[item_id] = theirs
            continue
        if mine_before:
            item = None  # both on the earlier item: merged by what their progress holds
        if isinstance(item, Streak) or (item is None and (mine.weeks or theirs.weeks or mine.paid or theirs.paid)):
            target[item_id], earned = _streak(item, mine, theirs, at_us)
        elif isinstance(item, Challenge) or (item is None and (mine.period or theirs.period)):
            target[item_id], earned = _challenge(item, mine, theirs, at_us, history)
        else:
            target[item_id], earned = _achievement(item, mine, theirs, at_us)
        awards += earned
    return awards


def _first_completed(mine: ItemState, theirs: ItemState) -> ItemState | None:
    """Of two completed-once items, the completion that came first (None: neither completed)."""
    done = [s for s in (mine, theirs) if s.completions]
    return min(done, key=lambda s: s.last_completed_us) if done else None


def _achievement(item: Achievement | None, mine: ItemState, theirs: ItemState,
                 at_us: int) -> tuple[ItemState, list[Award]]:  # fmt: skip
    seen = mine.seen + [v for v in theirs.seen if v not in mine.seen]
    first = _first_completed(mine, theirs)
    if first is not None:
        merged = replace(mine, completions=1, last_completed_us=first.last_completed_us, target=first.target)
        merged.seen = seen[: max(item.count, first.target)] if item else seen
        return merged, []
    if item is None:
        return replace(mine, seen=seen), []
    merged = replace(mine, seen=seen[: item.count])
    if len(merged.seen) < item.count:
        return merged, []
    merged.completions, merged.last_completed_us, merged.target = 1, at_us, item.count
    return merged, [Award(item.id, item.name, "once", item.reward.points, item.reward.unit)]


def _challenge(item: Challenge | None, mine: ItemState, theirs: ItemState, at_us: int,
               history: ProgramHistory) -> tuple[ItemState, list[Award]]:  # fmt: skip
    """Places in one window (or windows of the id that overlap: its dates were corrected) add
    up; of two different windows, the one the challenge is in now (else the later) is kept and
    the other is history, as a reused id's earlier window is for one member."""
    current = item is not None and in_window(mine, item, history) and in_window(theirs, item, history)
    if not current and mine.period != theirs.period:
        return (theirs if _later(theirs, mine, item, history) else mine), []
    merged = replace(mine, count=mine.count + theirs.count)
    if not merged.period:  # progress stored before windows were kept
        merged.period, merged.period_ends_us = theirs.period, theirs.period_ends_us
    first = _first_completed(mine, theirs)
    if first is not None:
        # Each account's award stays live, held by its own places in the sum: a return that
        # leaves fewer than the places of both takes one back (game_engine._withdraw_place),
        # as it would have before the merge.
        merged.completions, merged.last_completed_us = mine.completions + theirs.completions, first.last_completed_us
        merged.target = first.target
        return merged, []
    if item is None or not current or merged.count < item.purchases:
        return merged, []
    merged.completions, merged.last_completed_us, merged.target = 1, at_us, item.purchases
    return merged, [Award(item.id, item.name, merged.period, item.reward.points, item.reward.unit)]


def _later(theirs: ItemState, mine: ItemState, item: Challenge | None, history: ProgramHistory) -> bool:
    if item is not None and in_window(theirs, item, history) != in_window(mine, item, history):
        return in_window(theirs, item, history)
    return _start(theirs.period) > _start(mine.period)


def _start(period: str) -> int:
    digits = period.removeprefix("from-")
    return int(digits) if digits.isdigit() else 0


def _streak(item: Streak | None, mine: ItemState, theirs: ItemState, at_us: int) -> tuple[ItemState, list[Award]]:
    """Weeks and paid runs unite: a run either paid stays paid (extended over the weeks the
    other adds, as a late week joining it would), and a run of `weeks` that only the two
    together make pays once, keyed by its first week like any other."""
    if item is not None:
        mine, theirs = _with_weeks(mine, item), _with_weeks(theirs, item)
    kept_from = max(mine.kept_from, theirs.kept_from)  # weeks before it are forgotten, as apply would
    weeks = sorted({w for w in mine.weeks + theirs.weeks if w >= kept_from})
    merged = ItemState(
        weeks=weeks, paid=sorted(p for p in mine.paid + theirs.paid if p[1] >= kept_from),
        completions=mine.completions + theirs.completions,
        last_completed_us=max(mine.last_completed_us, theirs.last_completed_us), kept_from=kept_from, kind=mine.kind,
    )  # fmt: skip
    awards = []
    for first, last in _runs(weeks, item.weeks if item else 0):
        overlapping = [p for p in merged.paid if p[0] <= last and p[1] >= first]
        merged.paid = [p for p in merged.paid if p not in overlapping]
        merged.paid.append([min([first, *(p[0] for p in overlapping)]), max([last, *(p[1] for p in overlapping)])])
        if not overlapping and item is not None:
            merged.completions += 1
            merged.last_completed_us = at_us
            awards.append(Award(item.id, item.name, f"run-{first}", item.reward.points, item.reward.unit))
    merged.paid.sort()
    present = set(weeks)
    merged.last_week = newest = max(weeks, default=0)
    while newest - merged.run in present:
        merged.run += 1
    return merged, awards


def _with_weeks(state: ItemState, item: Streak) -> ItemState:
    """Progress stored before a streak's weeks were kept has them from its run (as
    game_engine._streak reads it)."""
    if state.weeks or not state.run:
        return state
    first = state.last_week - state.run + 1
    paid = [[first, state.last_week]] if state.run >= item.weeks else []
    return replace(state, weeks=list(range(first, state.last_week + 1)), paid=paid)


def _runs(weeks: list[int], length: int) -> list[tuple[int, int]]:
    """The runs of at least `length` consecutive weeks in `weeks` (sorted); none for length 0."""
    if not length:
        return []
    runs: list[tuple[int, int]] = []
    for w in weeks:
        if runs and runs[-1][1] == w - 1:
            runs[-1] = (runs[-1][0], w)
        else:
            runs.append((w, w))
    return [r for r in runs if r[1] - r[0] + 1 >= length]
