"""Gamification use cases behind the RPCs: progress, running challenges, opting in, leaderboards."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from zoneinfo import ZoneInfo

from pointmesh.clock import Clock
from rules_svc.domain import BadRequest, FailedPrecondition, NotFound
from rules_svc.experiment_stats import ArmResult, report
from rules_svc.game_engine import (
    ItemState,
    ProgramHistory,
    challenge_period,
    epoch_us,
    has_joined,
    in_window,
    join_key,
    overlapping_periods,
    stored_state,
    week_of,
)
from rules_svc.game_store import BoardRow, GameStore
from rules_svc.program import Challenge, Experiment, Program
from rules_svc.service import RulesService


class ItemKind(StrEnum):
    ACHIEVEMENT = "ACHIEVEMENT"
    STREAK = "STREAK"
    CHALLENGE = "CHALLENGE"


@dataclass(frozen=True, slots=True)
class ProgressItem:
    item_id: str
    name: str
    kind: ItemKind
    progress: int
    goal: int
    completions: int
    last_completed_us: int
    reward_points: int
    reward_unit: str
    joined: bool = False


@dataclass(frozen=True, slots=True)
class MemberProgress:
    items: list[ProgressItem]
    paid_points: int  # rewards in the program's first unit (its points) only, as are pending ones
    pending_points: int


class ProgramVersions:
    """The program versions gamification counts under. Called, the one in effect at a time (what
    the worker takes as `program_at`); `history`, what all of them say together."""

    def __init__(self, rules: RulesService) -> None:
        self.rules = rules
        self._history: dict[str, tuple[tuple[int, ...], ProgramHistory]] = {}

    def __call__(self, program: str, at: datetime, *, at_field: str = "basket.receipt_time") -> Program:
        """`at_field` is the request field blamed when no version was in effect at `at`: the worker's
        receipt time by default; a read asked about now has no basket, so it names `program`."""
        return self.rules.compiled(program, 0, at, at_field=at_field).program

    def history(self, program: str) -> ProgramHistory:
        """Built again only when a version was published (versions never change)."""
        infos = sorted(self.rules.list_versions(program), key=lambda i: (i.effective_from, i.version))
        seen = tuple(i.version for i in infos)
        cached = self._history.get(program)
        if cached is not None and cached[0] == seen:
            return cached[1]
        found = ProgramHistory.of(p for p in (self._version(program, i.version) for i in infos) if p is not None)
        self._history[program] = (seen, found)
        return found

    def _version(self, program: str, version: int) -> Program | None:
        try:
            return self.rules.compiled(program, version, self.rules.clock.now()).program
        except (FailedPrecondition, NotFound):
            return None  # no longer validates (or lost its document): nothing is counted under it


class GameService:
    def __init__(self, rules: RulesService, store: GameStore, clock: Clock) -> None:
        self.rules = rules
        self.store = store
        self.clock = clock
        self.program_at = ProgramVersions(rules)

    async def progress(self, program: str, member_id: str) -> MemberProgress:
        _require(member_id, "member_id")
        now = self.clock.now()
        p = self.program_at(program, now, at_field="program")
        states = await asyncio.to_thread(self.store.states, p.program, member_id)
        joined = await asyncio.to_thread(self.store.joined, p.program, member_id)
        this_week = week_of(now.astimezone(ZoneInfo(p.default_timezone)).date())
        items: list[ProgressItem] = []
        g = p.gamification
        for a in g.achievements:
            st = stored_state(states, a) or ItemState()
            items.append(ProgressItem(a.id, a.name, ItemKind.ACHIEVEMENT, min(len(st.seen), a.count), a.count,
                                      st.completions, st.last_completed_us, a.reward.points, a.reward.unit))  # fmt: skip
        for s in g.streaks:
            st = stored_state(states, s) or ItemState()
            alive = st.run if this_week <= st.last_week + 1 else 0  # a missed week broke it
            items.append(ProgressItem(s.id, s.name, ItemKind.STREAK, alive, s.weeks, st.completions,
                                      st.last_completed_us, s.reward.points, s.reward.unit))  # fmt: skip
        history = self.program_at.history(program)
        for c in g.challenges:
            st = stored_state(states, c) or ItemState()
            if not in_window(st, c, history):
                st = ItemState()  # progress of an earlier window of a reused id
            items.append(ProgressItem(c.id, c.name, ItemKind.CHALLENGE, st.count, c.purchases, st.completions,
                                      st.last_completed_us, c.reward.points, c.reward.unit,
                                      has_joined(joined, c, history)))  # fmt: skip
        # The response's reward points are the program's first unit (its points, what a member
        # spends): a tier_credits reward is no point paid, so it is left out of both figures.
        totals = await asyncio.to_thread(self.store.reward_totals, p.program, member_id, p.units[0])
        return MemberProgress(items, totals.get("PAID", 0), totals.get("PENDING", 0))

    def challenges(self, program: str, at: datetime | None) -> list[Challenge]:
        when = at or self.clock.now()
        p = self.program_at(program, when, at_field="at" if at else "program")
        return [c for c in p.gamification.challenges if c.starts <= when < c.ends]

    def _challenge(self, program: str, challenge_id: str) -> tuple[Program, Challenge]:
        p = self.program_at(program, self.clock.now(), at_field="program")
        for c in p.gamification.challenges:
            if c.id == challenge_id:
                return p, c
        raise NotFound(f"program {program} has no challenge {challenge_id!r}", field="challenge_id")

    async def join(self, program: str, challenge_id: str, member_id: str) -> bool:
        _require(member_id, "member_id")
        p, challenge = self._challenge(program, challenge_id)
        if not challenge.opt_in:
            raise FailedPrecondition(f"challenge {challenge_id} counts every member; nothing to join",
                                     field="challenge_id")  # fmt: skip
        if self.clock.now() >= challenge.ends:
            raise FailedPrecondition(f"challenge {challenge_id} ended at {challenge.ends.isoformat()}",
                                     field="challenge_id")  # fmt: skip
        await asyncio.to_thread(self.store.join, p.program, join_key(challenge), member_id, self.clock.now())
        return True

    async def experiment_report(self, program: str, experiment_id: str) -> ExperimentReport:
        p = self.program_at(program, self.clock.now(), at_field="program")
        found = next((e for e in p.experiments if e.id == experiment_id), None)
        if found is None:
            raise NotFound(f"program {program} has no experiment {experiment_id!r}", field="experiment_id")
        members = await asyncio.to_thread(self.store.experiment_members, p.program, experiment_id, found.salt)
        for arm in found.arms:
            members.setdefault(arm.id, [])
        return ExperimentReport(found, report(members, found.control))

    async def leaderboard(self, program: str, challenge_id: str, limit: int) -> list[tuple[int, BoardRow]]:
        if not 0 <= limit <= 100:
            raise BadRequest(f"must be between 1 and 100, got {limit}", field="limit")
        p, challenge = self._challenge(program, challenge_id)
        overlapping = overlapping_periods(challenge, self.program_at.history(program))
        rows = await asyncio.to_thread(self.store.board, p.program, challenge_id, challenge_period(challenge),
                                       epoch_us(challenge.starts), limit or 10, overlapping=overlapping)  # fmt: skip
        return [(rank, row) for rank, row in enumerate(rows, start=1)]


@dataclass(frozen=True, slots=True)
class ExperimentReport:
    experiment: Experiment
    arms: list[ArmResult]


def _require(value: str, field: str) -> None:
    if not value:
        raise BadRequest("is required", field=field)
