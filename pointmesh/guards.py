"""Member-state guards: the part of an earn that depends on what the member already has.

rules_svc computes points from the basket; a component that is capped per member per day or
campaign, or that pays only on the member's first or nth purchase, carries a guard. The ledger
applies the guards in the same atomic write as the earn, against its own counters, so two
concurrent purchases cannot both take the last of a cap or both be "first". rules_svc applies
the same function to the counters it was given, as a preview. One function, two callers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Guard:
    counter: str = ""
    limit: int = 0
    ordinal_equals: int = 0
    ordinal_every: int = 0

    def holds_for(self, ordinal: int) -> bool:
        if self.ordinal_equals and ordinal != self.ordinal_equals:
            return False
        return not (self.ordinal_every and ordinal % self.ordinal_every != 0)


@dataclass(frozen=True, slots=True)
class Granted:
    points: int
    note: str


def apply_guards(
    wanted: Sequence[tuple[Guard | None, int]], counters: Mapping[str, int], ordinal: int
) -> tuple[list[Granted], dict[str, int]]:
    """Grants each component what its guard allows, in order; returns grants and counter increments.

    Components sharing a counter draw from it in order, so the earlier (higher-priority) ones
    keep their points and the later ones are cut.
    """
    used: dict[str, int] = {}
    granted: list[Granted] = []
    for guard, points in wanted:
        if guard is None:
            granted.append(Granted(points, ""))
            continue
        if not guard.holds_for(ordinal):
            granted.append(Granted(0, f"purchase number {ordinal} does not qualify"))
            continue
        if not guard.counter:
            granted.append(Granted(points, ""))
            continue
        so_far = counters.get(guard.counter, 0) + used.get(guard.counter, 0)
        allowed = max(0, min(points, guard.limit - so_far))
        used[guard.counter] = used.get(guard.counter, 0) + allowed
        note = "" if allowed == points else f"member cap {guard.counter} of {guard.limit}: {so_far} already used"
        granted.append(Granted(allowed, note))
    return granted, {k: n for k, n in used.items() if n}
