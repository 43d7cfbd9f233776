"""Paying with points: how many points a basket may take and what they are worth.

Values are exact: `points` points pay `amount_minor` of a currency, floored in the retailer's
favour; a redemption never spends a point that adds no value (it is trimmed to the fewest
points paying the same amount); the share of the basket points may pay is capped; below the
program's minimum redemption the quote is refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from pointmesh.currencies import format_minor, is_known
from rules_svc.domain import BadRequest, FailedPrecondition
from rules_svc.program import Program


@dataclass(frozen=True, slots=True)
class RedemptionQuote:
    unit: str
    points: int
    pays_minor: int
    remaining_minor: int
    explanation: str


def quote_redemption(program: Program, currency: str, total_minor: int, available: int, wanted: int) -> RedemptionQuote:
    rules = program.redemption
    if rules is None:
        raise FailedPrecondition(f"program {program.program} does not allow paying with points", field="program")
    if not is_known(currency):
        raise BadRequest(f"{currency!r} is not an ISO 4217 currency code", field="basket_total.currency")
    value = next((v for v in rules.values if v.currency == currency), None)
    if value is None:
        raise FailedPrecondition(
            f"points have no value in {currency} in program {program.program}", field="basket_total.currency"
        )
    if total_minor <= 0:
        raise BadRequest(f"must be positive, got {total_minor}", field="basket_total.amount_minor")
    if available < 0 or wanted < 0:
        raise BadRequest("must not be negative", field="points_wanted" if wanted < 0 else "points_available")
    cap_minor = total_minor * rules.max_share_percent // 100
    # The most points whose value stays within the cap: p * amount // points <= cap.
    by_cap = ((cap_minor + 1) * value.points - 1) // value.amount_minor
    asked = min(available, wanted) if wanted else available
    points = min(asked, by_cap)
    pays = points * value.amount_minor // value.points
    # Trim points that buy nothing more (e.g. the third of three points worth 1.6 yen each).
    points = -(-pays * value.points // value.amount_minor)
    notes = [f"{value.points} {rules.unit} = {format_minor(value.amount_minor, currency)}"]
    if asked > by_cap:
        notes.append(f"capped at {rules.max_share_percent}% of the basket ({format_minor(cap_minor, currency)})")
    if points < rules.minimum_points:
        # Named by what held the points down: the basket's cap (more points would not help),
        # the member's points, or what the member asked for.
        if asked > by_cap:
            field, why = "basket_total.amount_minor", f" ({notes[-1]})"
        elif wanted and available < wanted:
            field, why = "points_available", f" (the member has {available} {rules.unit})"
        else:
            field, why = ("points_wanted", "") if wanted else ("points_available", "")
        raise FailedPrecondition(
            f"{points} {rules.unit} is below the minimum redemption of {rules.minimum_points}{why}", field=field
        )
    return RedemptionQuote(rules.unit, points, pays, total_minor - pays, "; ".join(notes))
