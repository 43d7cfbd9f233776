"""Experiment arms: deterministic assignment, and which rules a member's arms allow."""

from __future__ import annotations

import hashlib
from datetime import datetime

from rules_svc.program import Experiment, Program

BUCKETS = 10_000


def bucket(salt: str, member_id: str) -> int:
    """0..9999, uniform, stable for a member and salt (and unrelated across salts)."""
    return int(hashlib.sha256(f"{salt}:{member_id}".encode()).hexdigest()[:12], 16) % BUCKETS


def assign(experiment: Experiment, member_id: str) -> str:
    point = bucket(experiment.salt, member_id)
    upper = 0
    for arm in experiment.arms:
        upper += arm.allocation * BUCKETS // 100
        if point < upper:
            return arm.id
    return experiment.arms[-1].id


class ExperimentRules:
    """Compiled once per program version: the arm lookup the engine does per basket."""

    def __init__(self, program: Program) -> None:
        self.experiments = list(program.experiments)
        # rule id -> (experiment id, arms that get it)
        self.gated: dict[str, tuple[str, frozenset[str]]] = {}
        for exp in self.experiments:
            for arm in exp.arms:
                for rule_id in arm.rules:
                    _, arms = self.gated.get(rule_id, (exp.id, frozenset()))
                    self.gated[rule_id] = (exp.id, arms | {arm.id})

    def arms_of(self, member_id: str, at: datetime) -> dict[str, str]:
        """The member's arm in every experiment running at `at` (none without a member id)."""
        if not member_id:
            return {}
        return {e.id: assign(e, member_id) for e in self.experiments if e.starts <= at < e.ends}

    def allows(self, rule_id: str, arms: dict[str, str]) -> bool:
        gate = self.gated.get(rule_id)
        return gate is None or arms.get(gate[0]) in gate[1]
