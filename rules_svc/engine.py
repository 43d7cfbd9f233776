"""The points engine: a validated Program compiled once, then evaluated per basket.

Arithmetic is integers and exact fractions only. Rounding (docs/rules.md): foreign amounts are
converted to the base currency per line, floored; base points are computed per line with the
program's rounding (default floor); a multiplier adds `base * (m - 1)` per line, rounded the same
way, or on the sum of the qualifying lines' base points when `per: basket`.

Speed comes from doing little per basket: conditions on where and when (channel, store, region,
day, time window, campaign dates) are evaluated once per (channel, store, UTC minute) and
cached; rules with line conditions are skipped unless one of the basket's categories or SKUs
can match them (a best-of group is still decided at its first-ranked member's position, and
only its contenders are skipped that way); the base explanation of a line amount is formatted
once and reused; the rest is integer arithmetic and tuple construction.

Compound multipliers pay on base points and earlier components, except guarded ones (member
caps, purchase number): the ledger decides those against the member's state when it posts,
after this quote, so compounding them could pay on points the member never gets (docs/rules.md,
Effects).
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from zoneinfo import ZoneInfo

from pointmesh.currencies import format_minor, is_known, scale
from pointmesh.guards import apply_guards
from pointmesh.tiers import TierPolicy, effective_tier
from rules_svc.domain import BadRequest, Basket, Component, Evaluation, Excluded, MemberContext
from rules_svc.experiments import ExperimentRules
from rules_svc.fx import convert_minor, rates_of
from rules_svc.program import GroupMode, Program, Rounding
from rules_svc.rule_compiler import BONUS, BONUS_PER_ITEM, MULTIPLY_BASKET, CompiledRule, compile_rule

_PLACE_CACHE_MAX = 50_000
_BASE_TEXT_CACHE_MAX = 20_000

# Components are built with tuple.__new__ and every field given: a NamedTuple's own constructor is
# a Python function, twice the cost, and a basket builds dozens of components.
_new = tuple.__new__
_NO_RULES: frozenset[CompiledRule] = frozenset()


@dataclass(frozen=True, slots=True)
class _Place:
    tz: ZoneInfo
    region: str


@dataclass(frozen=True, slots=True)
class _Steps:
    """What a (channel, store, minute) runs: rules outside best-of groups whose place-and-time
    conditions hold and, at its opener's position, each best-of group with a member that holds.
    Each rule comes with whether a basket may skip it by its shortcut (never a group's opener)."""

    rules: list[tuple[CompiledRule, bool]]
    contenders: dict[str, list[CompiledRule]]


def _compounds(part: Component) -> bool:
    """Whether a later compound multiplier pays on this component: not when it carries a guard
    (a member cap or purchase number), which the ledger may cut in its write after this quote."""
    return part.line >= 0 and part.guard is None


class CompiledProgram:
    def __init__(self, program: Program, version: int) -> None:
        self.program = program
        self.version = version
        self.half_up = program.policy.rounding == Rounding.HALF_UP
        self.default_place = _Place(ZoneInfo(program.default_timezone), "")
        self.places = {s.id: _Place(ZoneInfo(s.timezone), s.region or "") for s in program.stores}
        self.channels = frozenset(program.channels)
        self.base_rates: dict[str, list[tuple[str, int, int, str]]] = {}
        for rate in program.base_rates:
            detail = f"{rate.points} {rate.unit} per {format_minor(rate.per_minor, rate.currency)}"
            self.base_rates.setdefault(rate.currency, []).append((rate.unit, rate.points, rate.per_minor, detail))
        self.base_currency, self.fx = rates_of(program)
        self.fx_text = {r.currency: r.per_base for r in program.fx.rates} if program.fx else {}
        self.rules = [compile_rule(r) for r in sorted(program.rules, key=lambda r: (r.priority, r.id))]
        self.experiments = ExperimentRules(program)
        self.best_of = {g.id for g in program.groups if g.mode == GroupMode.BEST_OF}
        # A best-of group is decided at its first-ranked member whichever condition that member
        # fails, a place-and-time one or an experiment arm included.
        self.openers: dict[str, CompiledRule] = {}
        for r in self.rules:
            if r.group is not None and r.group in self.best_of:
                self.openers.setdefault(r.group, r)
        # A best-of group prices every contender when its first one comes up, so a compound
        # contender needs the running totals then, whichever rule opened the group.
        self.compound_groups = {r.group for r in self.rules if r.compound and r.group in self.best_of}
        # Line value -> the rules a line with it could satisfy (see CompiledRule.shortcut).
        self.by_category: dict[str, set[CompiledRule]] = {}
        self.by_sku: dict[str, set[CompiledRule]] = {}
        for r in self.rules:
            if r.shortcut is not None:
                field, values = r.shortcut
                index = self.by_sku if field == "sku" else self.by_category
                for value in values:
                    index.setdefault(value, set()).add(r)
        self.uses_shortcuts = any(r.shortcut is not None for r in self.rules)
        self.counts_purchases = any(r.when.purchase_number is not None for r in program.rules)
        self._thresholds: dict[tuple[str, str, int], int] = {}
        tiers = program.tiers
        self.tier_codes = tuple(t.code for t in tiers.levels) if tiers is not None else ()
        self.tier_policy = (
            TierPolicy(tiers.metric_unit, tiers.window.value, tiers.downgrade_grace_days,
                       tuple((t.code, t.threshold) for t in tiers.levels), program.default_timezone)
            if tiers is not None else None
        )  # fmt: skip
        policy = program.policy
        self.expiry = timedelta(days=policy.expiry_days) if policy.expiry_days else None
        self.release = timedelta(days=policy.release_after_days) if policy.release_after_days else None
        self.horizon = max(self.expiry or timedelta(0), self.release or timedelta(0), timedelta(days=1))
        # How far before its instant a receipt is read: its local time (a zone is less than a day
        # off UTC), the day before it (a night window's day cap) and the tier grace looked back over.
        self.lookback = timedelta(days=2 + (program.tiers.downgrade_grace_days if program.tiers else 0))
        self._place_cache: dict[tuple[str, str, int], _Steps] = {}
        # Earn currency -> line amount -> the base components' details, one per base rate:
        # prices repeat, and formatting an amount costs more than the rest of a base component.
        self._base_texts: dict[str, dict[int, tuple[str, ...]]] = {currency: {} for currency in self.base_rates}

    # Checks and conversions ---------------------------------------------------------------

    def place_of(self, basket: Basket) -> _Place:
        if not basket.store_id:
            return self.default_place
        place = self.places.get(basket.store_id)
        if place is None:
            raise BadRequest(
                f"store {basket.store_id!r} is not in program {self.program.program} v{self.version}, "
                "so its time zone is unknown",
                field="basket.store_id",
            )
        return place

    def validate(self, basket: Basket) -> None:
        if basket.channel not in self.channels:
            raise BadRequest(
                f"channel {basket.channel!r} is not one of {sorted(self.channels)}", field="basket.channel"
            )
        if not is_known(basket.currency):
            raise BadRequest(f"{basket.currency!r} is not an ISO 4217 currency code", field="basket.currency")
        if basket.currency not in self.base_rates and basket.currency not in self.fx:
            raise BadRequest(
                f"program {self.program.program} v{self.version} has no earn rate or FX rate for {basket.currency}",
                field="basket.currency",
            )
        if basket.receipt_time.tzinfo is None:
            raise BadRequest("needs a time zone offset", field="basket.receipt_time")
        try:
            basket.receipt_time + self.horizon
        except OverflowError:
            raise BadRequest(
                f"{basket.receipt_time.isoformat()} is too late: its points would expire or release after year 9999",
                field="basket.receipt_time",
            ) from None
        try:
            basket.receipt_time.astimezone(UTC) - self.lookback
        except OverflowError:
            raise BadRequest(
                f"{basket.receipt_time.isoformat()} is too early: its local time, or the days before it that "
                "pricing reads, would be before year 1",
                field="basket.receipt_time",
            ) from None
        if not basket.lines:
            raise BadRequest("a basket needs at least one line", field="basket.lines")
        total = 0
        for i, line in enumerate(basket.lines):
            if line.quantity <= 0:
                raise BadRequest(f"must be positive, got {line.quantity}", field=f"basket.lines[{i}].quantity")
            if line.amount_minor < 0:
                raise BadRequest(
                    f"must not be negative, got {line.amount_minor}", field=f"basket.lines[{i}].amount_minor"
                )
            total += line.amount_minor
        if total != basket.total_minor:
            raise BadRequest(
                f"lines sum to {total} minor units but the total says {basket.total_minor}", field="basket.total_minor"
            )

    def _to_earn_currency(self, basket: Basket) -> tuple[str, Fraction | None, list[int]]:
        if basket.currency in self.base_rates:
            return basket.currency, None, [ln.amount_minor for ln in basket.lines]
        rate = self.fx[basket.currency]
        # base_minor = amount_minor * 10^eb / (10^ef * rate), floored per line.
        num_scale = scale(self.base_currency) * rate.denominator
        den_scale = scale(basket.currency) * rate.numerator
        return self.base_currency, rate, [ln.amount_minor * num_scale // den_scale for ln in basket.lines]

    def _base_total(self, basket: Basket) -> tuple[str, int] | None:
        if not self.base_currency:
            return basket.currency, basket.total_minor
        total = self._convert(basket.total_minor, basket.currency, self.base_currency)
        return None if total is None else (self.base_currency, total)

    def _convert(self, amount_minor: int, currency: str, to: str) -> int | None:
        return convert_minor(amount_minor, currency, to, self.base_currency, self.fx)

    def _threshold_in(self, currency: str, threshold_currency: str, minimum: int) -> int:
        """The smallest basket total in `currency` that converts to at least `minimum`."""
        key = (currency, threshold_currency, minimum)
        found = self._thresholds.get(key)
        if found is None:
            low, high = 0, 10**15
            while low < high:
                mid = (low + high) // 2
                converted = self._convert(mid, currency, threshold_currency)
                if converted is not None and converted >= minimum:
                    high = mid
                else:
                    low = mid + 1
            found = self._thresholds[key] = low
        return found

    def _candidates(self, basket: Basket, place: _Place, local: datetime) -> _Steps:
        # The UTC minute, not the wall-clock one: in a repeated DST hour two instants share the latter.
        key = (basket.channel, basket.store_id, int(basket.receipt_time.timestamp()) // 60)
        found = self._place_cache.get(key)
        if found is None:
            ch, st, rg = basket.channel, basket.store_id, place.region
            steps: list[CompiledRule] = []
            contenders: dict[str, list[CompiledRule]] = {}
            for r in self.rules:
                holds = all(check(ch, st, rg, local) for check in r.place_checks)
                group = r.group
                if group is not None and group in self.best_of:
                    if self.openers[group] is r:
                        steps.append(r)
                    if holds:
                        contenders.setdefault(group, []).append(r)
                elif holds:
                    steps.append(r)
            if len(contenders) < len(self.openers):  # a group none of whose members holds here
                steps = [r for r in steps if r.group is None or r.group not in self.best_of or r.group in contenders]
            skippable = [r.shortcut is not None and (r.group is None or r.group not in self.best_of) for r in steps]
            found = _Steps(list(zip(steps, skippable, strict=True)), contenders)
            if len(self._place_cache) >= _PLACE_CACHE_MAX:
                self._place_cache.clear()
            self._place_cache[key] = found
        return found

    # Evaluation -----------------------------------------------------------------------------

    def evaluate(self, basket: Basket, member: MemberContext) -> Evaluation:
        self.validate(basket)
        if member.tier and member.tier not in self.tier_codes:
            # priced as no tier, it would answer for the entry tier and say nothing (a typo in a
            # preview: "Silver" for "silver")
            declared = ", ".join(self.tier_codes) or "none"
            raise BadRequest(f"{member.tier!r} is not a tier of program {self.program.program} (its tiers: "
                             f"{declared})", field="member.tier")  # fmt: skip
        if not member.tier and self.tier_policy is not None:
            member = replace(member, tier=effective_tier(self.tier_policy, member.qualification, basket.receipt_time))
        place = self.place_of(basket)
        local = basket.receipt_time.astimezone(place.tz)
        earn_currency, fx_rate, amounts = self._to_earn_currency(basket)
        base, parts = self._base(earn_currency, amounts)
        running: dict[str, list[int]] | None = None
        ordinal = member.purchase_count + 1
        excluded: list[Excluded] = []
        possible = self._possible(basket) if self.uses_shortcuts else _NO_RULES
        # Basket totals against each threshold, worked out once per basket (see _reached).
        reached: dict[tuple[str, int], int | None] = {}
        steps = self._candidates(basket, place, local)
        arms = self.experiments.arms_of(member.member_id, basket.receipt_time)
        gated = self.experiments.gated
        allows = self.experiments.allows
        best_of_groups = self.best_of
        for rule in [r for r, skippable in steps.rules if not skippable or r in possible]:
            group = rule.group
            if group is not None and group in best_of_groups:
                # The group's opener: decided here whether or not the opener itself applies, so
                # neither its conditions nor the token shortcut move the decision to a later member.
                contenders = steps.contenders[group]
                if gated:
                    contenders = [r for r in contenders if allows(r.rule_id, arms)]
                if running is None and group in self.compound_groups:
                    running = self._running(base, parts)
                got = self._best_of(
                    group, contenders, basket, member, ordinal, local, base, running, excluded, possible, reached
                )
            else:
                if gated and not allows(rule.rule_id, arms):
                    continue
                if running is None and rule.compound:
                    running = self._running(base, parts)
                got = self._apply(rule, basket, member, ordinal, local, base, running, reached)
            if not got:
                continue
            if running is not None:
                for part in got:
                    if part.unit in running and _compounds(part):
                        running[part.unit][part.line] += part.points
            parts += got
        if member.counters is not None:
            parts = self._preview_guards(parts, member.counters, ordinal)
        return Evaluation(
            self.program.program, self.version, basket.currency, earn_currency,
            self.fx_text[basket.currency] if fx_rate is not None else "", tuple(amounts), tuple(parts), tuple(excluded),
            basket.receipt_time + self.expiry if self.expiry else None,
            basket.receipt_time + self.release if self.release else None,
            local, self.program.policy, self.program.tiers, member.tier, tuple(sorted(arms.items())),
            self.counts_purchases, self.program.default_timezone, self._base_total(basket),
        )  # fmt: skip

    def _base(self, earn_currency: str, amounts: list[int]) -> tuple[dict[str, list[int]], list[Component]]:
        """Base points per unit and line, and their components."""
        half_up = self.half_up
        rates = self.base_rates[earn_currency]
        base: dict[str, list[int]] = {}
        parts: list[Component] = []
        known = self._base_texts[earn_currency]
        texts = []
        for a in amounts:
            found = known.get(a)
            if found is None:
                if len(known) >= _BASE_TEXT_CACHE_MAX:
                    known.clear()
                amount_text = format_minor(a, earn_currency)
                found = known[a] = tuple(f"{detail} on {amount_text}" for *_, detail in rates)
            texts.append(found)
        for k, (unit, points, per_minor, _) in enumerate(rates):
            if half_up:
                per_line = [(2 * a * points + per_minor) // (2 * per_minor) for a in amounts]
            else:
                per_line = [a * points // per_minor for a in amounts]
            base[unit] = per_line
            parts += [
                _new(Component, ("base", unit, p, i, texts[i][k], (), "", None, 0, False, ()))
                for i, p in enumerate(per_line)
            ]
        return base, parts

    def _possible(self, basket: Basket) -> set[CompiledRule]:
        """The rules with a shortcut that one of the basket's lines could satisfy; the others are skipped."""
        possible: set[CompiledRule] = set()
        by_category, by_sku = self.by_category, self.by_sku
        for line in basket.lines:
            possible.update(by_category.get(line.category, ()), by_sku.get(line.sku, ()))
        return possible

    @staticmethod
    def _running(base: dict[str, list[int]], parts: list[Component]) -> dict[str, list[int]]:
        """Per-line totals so far (base plus extras already applied and not guarded), for
        compound multipliers."""
        running = {unit: list(v) for unit, v in base.items()}
        for part in parts:
            if part.rule_id != "base" and part.unit in running and _compounds(part):
                running[part.unit][part.line] += part.points
        return running

    def _best_of(
        self, group: str, contenders: list[CompiledRule], basket: Basket, member: MemberContext, ordinal: int,
        local: datetime, base: dict[str, list[int]], running: dict[str, list[int]] | None, excluded: list[Excluded],
        possible: Set[CompiledRule], reached: dict[tuple[str, int], int | None],
    ) -> list[Component] | None:  # fmt: skip
        scored: list[tuple[CompiledRule, list[Component]]] = []
        for contender in contenders:
            if contender.shortcut is not None and contender not in possible:
                continue  # no line can qualify: the contender does not apply
            got = self._apply(contender, basket, member, ordinal, local, base, running, reached)
            if got is not None:
                scored.append((contender, got))
        if not scored:
            return None
        best, best_parts = max(scored, key=lambda cr: (sum(p.points for p in cr[1]), -cr[0].priority))
        best_points = sum(p.points for p in best_parts)
        for rule, got in scored:
            if rule is not best:
                why = "pays more" if sum(p.points for p in got) < best_points else "pays the same and ranks first"
                excluded.append(Excluded(rule.rule_id, f"group {group} is best-of; {best.rule_id} {why}"))
        return best_parts

    @staticmethod
    def _preview_guards(parts: list[Component], counters: dict[str, int], ordinal: int) -> list[Component]:
        granted, _ = apply_guards([(p.guard, p.points) for p in parts], counters, ordinal)
        out = []
        for part, grant in zip(parts, granted, strict=True):
            if grant.points != part.points:
                capped = f"{part.capped}; {grant.note}" if part.capped else grant.note
                part = part._replace(points=grant.points, capped=capped)
            out.append(part)
        return out

    def _qualifying_lines(self, rule: CompiledRule, basket: Basket) -> list[int] | None:
        """Indexes of the lines a rule with line conditions applies to; None when none qualify."""
        categories, skus, line_min = rule.categories, rule.skus, rule.line_min
        # One condition, the common case, in a single pass.
        if line_min is None and skus is None and categories is not None:
            lines = [i for i, line in enumerate(basket.lines) if line.category in categories]
            return lines or None
        if line_min is None and categories is None and skus is not None:
            lines = [i for i, line in enumerate(basket.lines) if line.sku in skus]
            return lines or None
        lines = []
        for i, line in enumerate(basket.lines):
            if categories is not None and line.category not in categories:
                continue
            if skus is not None and line.sku not in skus:
                continue
            if line_min is not None:
                amount = self._convert(line.amount_minor, basket.currency, line_min[0])
                if amount is None or amount < line_min[1]:
                    continue
            lines.append(i)
        return lines or None

    def _reached(self, basket: Basket, basket_min: tuple[str, int]) -> int | None:
        """The basket total in its own currency that reaches `basket_min`, if the basket's does."""
        currency, minimum = basket_min
        total = self._convert(basket.total_minor, basket.currency, currency)
        if total is None or total < minimum:
            return None
        return self._threshold_in(basket.currency, currency, minimum)

    def _apply(
        self, rule: CompiledRule, basket: Basket, member: MemberContext, ordinal: int, local: datetime,
        base: dict[str, list[int]], running: dict[str, list[int]] | None, reached: dict[tuple[str, int], int | None],
    ) -> list[Component] | None:  # fmt: skip
        """The rule's components for this basket, or None when a condition does not hold."""
        for check in rule.member_checks:
            if not check(member, ordinal):
                return None
        threshold: int | None = 0
        if rule.basket_min is not None:
            threshold = reached.get(rule.basket_min, -1)
            if threshold == -1:  # not worked out for this basket yet (a reached threshold is >= 0)
                threshold = reached[rule.basket_min] = self._reached(basket, rule.basket_min)
            if threshold is None:
                return None
        lines: Sequence[int] | None
        if rule.every_line:
            lines = range(len(basket.lines))
        else:
            lines = self._qualifying_lines(rule, basket)
            if lines is None:
                return None
        guard = rule.guard if rule.day_cap is None else rule.guard_for(local)
        unit, rid, matched = rule.unit, rule.rule_id, rule.matched
        parts: list[Component] = []
        if rule.kind == BONUS:
            parts.append(
                _new(Component, (rid, unit, rule.bonus, -1, rule.bonus_detail, matched, "", guard, threshold, True, ()))
            )
        elif rule.kind == BONUS_PER_ITEM:
            bonus = rule.bonus
            for i in lines:
                qty = basket.lines[i].quantity
                detail = f"{bonus} {unit} x {qty} items"
                parts.append(
                    _new(Component, (rid, unit, bonus * qty, i, detail, matched, "", guard, threshold, False, ()))
                )
        else:
            source = running if rule.compound and running is not None else base
            unit_base = source.get(unit)
            if unit_base is None:
                return None  # a multiplier of a unit the earn currency has no base rate for
            num, den, half_up = rule.extra_num, rule.extra_den, self.half_up
            if rule.kind == MULTIPLY_BASKET:
                bases = tuple((i, unit_base[i]) for i in lines)
                total = sum(b for _, b in bases)
                points = (2 * total * num + den) // (2 * den) if half_up else total * num // den
                detail = f"x{rule.multiplier_text} on {total} base {unit} of the qualifying lines"
                parts.append(
                    _new(Component, (rid, unit, points, -1, detail, matched, "", guard, threshold, False, bases))
                )
            else:
                text = rule.multiplier_text
                for i in lines:
                    b = unit_base[i]
                    points = (2 * b * num + den) // (2 * den) if half_up else b * num // den
                    detail = f"x{text} on {b} {unit}"
                    parts.append(
                        _new(Component, (rid, unit, points, i, detail, matched, "", guard, threshold, False, ()))
                    )
        if rule.per_line_cap is not None or rule.per_receipt_cap is not None:
            return self._cap(parts, rule)
        return parts

    @staticmethod
    def _cap(parts: list[Component], rule: CompiledRule) -> list[Component]:
        per_line, per_receipt = rule.per_line_cap, rule.per_receipt_cap
        out = []
        left = per_receipt
        for part in parts:
            points, notes = part.points, []
            if per_line is not None and part.line >= 0 and points > per_line:
                notes.append(f"per-line cap {per_line} (from {points})")
                points = per_line
            if left is not None:
                if points > left:
                    notes.append(f"per-receipt cap {per_receipt} (from {points})")
                    points = left
                left -= points
            out.append(part._replace(points=points, capped="; ".join(notes)) if notes else part)
        return out
