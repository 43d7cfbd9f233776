"""The points engine: a validated Program compiled once, then evaluated per basket.

Arithmetic is integers and exact fractions only. Rounding (docs/rules.md): foreign amounts are
converted to the base currency per line, floored; base points are computed per line with the
program's rounding (default floor); a multiplier adds `base * (m - 1)` per line, rounded the same
way, or on the sum of the qualifying lines' base points when `per: basket`. Conditions that
only depend on where and when (channel, store, region, day, time window, campaign dates) are
evaluated once per (channel, store, minute) and cached, which keeps a 50-rule
program fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, time, timedelta
from fractions import Fraction
from zoneinfo import ZoneInfo

from pointmesh.currencies import format_minor, is_known, scale
from pointmesh.guards import Guard, apply_guards
from pointmesh.tiers import TierPolicy, effective_tier
from rules_svc.domain import BadRequest, Basket, Component, Evaluation, Excluded, MemberContext
from rules_svc.program import DAYS, GroupMode, MultiplierScope, Program, Rounding, Rule

_PLACE_CACHE_MAX = 50_000


def _round(num: int, den: int, mode: Rounding) -> int:
    if mode == Rounding.HALF_UP:
        return (2 * num + den) // (2 * den)
    return num // den


def _hhmm(text: str) -> time:
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes))


@dataclass(frozen=True, slots=True)
class _Place:
    tz: ZoneInfo
    region: str


@dataclass(slots=True)
class _Compiled:
    rule: Rule
    place_checks: list[Callable[[str, str, str, datetime], bool]]
    member_checks: list[Callable[[MemberContext, int], bool]]
    line_checks: list[Callable[[int, int], bool]]
    categories: frozenset[str] | None
    skus: frozenset[str] | None
    basket_min_minor: tuple[str, int] | None
    line_min: tuple[str, int] | None
    matched: tuple[str, ...]
    multiplier: Fraction | None
    has_guard: bool


class CompiledProgram:
    def __init__(self, program: Program, version: int) -> None:
        self.program = program
        self.version = version
        self.rounding = program.policy.rounding
        self.default_place = _Place(ZoneInfo(program.default_timezone), "")
        self.places = {s.id: _Place(ZoneInfo(s.timezone), s.region or "") for s in program.stores}
        self.channels = frozenset(program.channels)
        self.base_rates: dict[str, list[tuple[str, int, int]]] = {}
        for rate in program.base_rates:
            self.base_rates.setdefault(rate.currency, []).append((rate.unit, rate.points, rate.per_minor))
        self.base_currency = program.fx.base_currency if program.fx else ""
        self.fx = {r.currency: Fraction(r.per_base) for r in program.fx.rates} if program.fx else {}
        self.fx_text = {r.currency: r.per_base for r in program.fx.rates} if program.fx else {}
        self.rules = [self._compile(r) for r in sorted(program.rules, key=lambda r: (r.priority, r.id))]
        self.group_modes = {g.id: g.mode for g in program.groups}
        self._thresholds: dict[tuple[str, str, int], int] = {}
        tiers = program.tiers
        self.tier_policy = (
            TierPolicy(tiers.metric_unit, tiers.window.value, tiers.downgrade_grace_days,
                       tuple((t.code, t.threshold) for t in tiers.levels))
            if tiers is not None else None
        )  # fmt: skip
        self._place_cache: dict[tuple[str, str, datetime], list[_Compiled]] = {}

    # Compilation ------------------------------------------------------------------------

    def _compile(self, rule: Rule) -> _Compiled:
        w = rule.when
        place: list[Callable[[str, str, str, datetime], bool]] = []
        member: list[Callable[[MemberContext, int], bool]] = []
        matched: list[str] = []
        if w.channels is not None:
            channels = frozenset(w.channels)
            place.append(lambda ch, st, rg, lt: ch in channels)
            matched.append(f"channel in {sorted(channels)}")
        if w.stores is not None:
            stores = frozenset(w.stores)
            place.append(lambda ch, st, rg, lt: st in stores)
            matched.append(f"store in {sorted(stores)}")
        if w.regions is not None:
            regions = frozenset(w.regions)
            place.append(lambda ch, st, rg, lt: rg in regions)
            matched.append(f"region in {sorted(regions)}")
        if w.days_of_week is not None:
            days = frozenset(DAYS.index(d.value) for d in w.days_of_week)
            place.append(lambda ch, st, rg, lt: lt.weekday() in days)
            matched.append(f"store-local day in {[d.value for d in w.days_of_week]}")
        if w.time_window is not None:
            start, end = _hhmm(w.time_window.start), _hhmm(w.time_window.end)
            if start < end:
                place.append(lambda ch, st, rg, lt: start <= lt.time() < end)
            else:
                place.append(lambda ch, st, rg, lt: lt.time() >= start or lt.time() < end)
            matched.append(f"store-local time in {w.time_window.start}-{w.time_window.end}")
        if w.date_range is not None:
            place.append(self._date_check(w.date_range.start, w.date_range.end))
            matched.append(f"campaign {w.date_range.start or '...'} to {w.date_range.end or '...'}")
        if w.tiers is not None:
            tiers = frozenset(w.tiers)
            member.append(lambda m, n: m.tier in tiers)
            matched.append(f"tier in {sorted(tiers)}")
        if w.segments is not None:
            segments = frozenset(w.segments)
            member.append(lambda m, n: not segments.isdisjoint(m.segments))
            matched.append(f"segment in {sorted(segments)}")
        if w.attributes:
            wanted = dict(w.attributes)
            member.append(lambda m, n: all(m.attributes.get(k) == val for k, val in wanted.items()))
            matched.append(f"attributes {wanted}")
        guard_ordinal = w.purchase_number
        if guard_ordinal is not None:
            probe = Guard(ordinal_equals=guard_ordinal.equals or 0, ordinal_every=guard_ordinal.every or 0)
            member.append(lambda m, n: probe.holds_for(n))
            matched.append(
                f"purchase number {guard_ordinal.equals}"
                if guard_ordinal.equals
                else f"every {guard_ordinal.every}th purchase"
            )
        categories = frozenset(w.categories) if w.categories is not None else None
        skus = frozenset(w.skus) if w.skus is not None else None
        if categories is not None:
            matched.append(f"category in {sorted(categories)}")
        if skus is not None:
            matched.append(f"sku in {sorted(skus)}")
        basket_min = (
            (w.basket_total_at_least.currency, w.basket_total_at_least.amount_minor)
            if w.basket_total_at_least
            else None
        )
        if basket_min:
            matched.append(f"basket total at least {format_minor(basket_min[1], basket_min[0])}")
        line_min = (
            (w.line_amount_at_least.currency, w.line_amount_at_least.amount_minor) if w.line_amount_at_least else None
        )
        if line_min:
            matched.append(f"line amount at least {format_minor(line_min[1], line_min[0])}")
        caps = rule.caps
        return _Compiled(
            rule, place, member, [], categories, skus, basket_min, line_min, tuple(matched),
            Fraction(rule.effect.multiplier) if rule.effect.multiplier is not None else None,
            guard_ordinal is not None or caps.per_member_per_day is not None or caps.per_member_per_campaign is not None,
        )  # fmt: skip

    @staticmethod
    def _date_check(start: datetime | None, end: datetime | None) -> Callable[[str, str, str, datetime], bool]:
        local = (start or end).tzinfo is None  # type: ignore[union-attr]

        def check(ch: str, st: str, rg: str, lt: datetime) -> bool:
            at = lt.replace(tzinfo=None) if local else lt
            return (start is None or at >= start) and (end is None or at < end)

        return check

    # Evaluation -------------------------------------------------------------------------

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

    def _convert(self, amount_minor: int, currency: str, to: str) -> int | None:
        """An amount in another currency of the program, via the base currency, floored; None when
        the program has no FX rate to get there (e.g. JPY earning at its own base rate)."""
        if currency == to:
            return amount_minor
        base = amount_minor
        if currency != self.base_currency:
            rate = self.fx.get(currency)
            if rate is None:
                return None
            base = amount_minor * scale(self.base_currency) * rate.denominator // (scale(currency) * rate.numerator)
        if to == self.base_currency:
            return base
        rate = self.fx.get(to)
        if rate is None:
            return None
        return base * scale(to) * rate.numerator // (scale(self.base_currency) * rate.denominator)

    def _candidates(self, basket: Basket, place: _Place, local: datetime) -> list[_Compiled]:
        # The UTC minute, not the wall-clock one: in a repeated DST hour two instants share the latter.
        key = (basket.channel, basket.store_id, local.astimezone(UTC).replace(second=0, microsecond=0))
        found = self._place_cache.get(key)
        if found is None:
            store, region = basket.store_id, place.region
            found = [
                r for r in self.rules if all(check(basket.channel, store, region, local) for check in r.place_checks)
            ]
            if len(self._place_cache) >= _PLACE_CACHE_MAX:
                self._place_cache.clear()
            self._place_cache[key] = found
        return found

    def evaluate(self, basket: Basket, member: MemberContext) -> Evaluation:
        self.validate(basket)
        if not member.tier and self.tier_policy is not None:
            member = replace(member, tier=effective_tier(self.tier_policy, member.qualification, basket.receipt_time))
        place = self.place_of(basket)
        local = basket.receipt_time.astimezone(place.tz)
        earn_currency, fx_rate, amounts = self._to_earn_currency(basket)
        mode = self.rounding
        base: dict[str, list[int]] = {}
        parts: list[Component] = []
        for unit, points, per_minor in self.base_rates[earn_currency]:
            per_line = [_round(a * points, per_minor, mode) for a in amounts]
            base[unit] = per_line
            detail = f"{points} {unit} per {format_minor(per_minor, earn_currency)}"
            parts += [
                Component("base", unit, p, i, f"{detail} on {format_minor(a, earn_currency)}")
                for i, (p, a) in enumerate(zip(per_line, amounts, strict=True))
            ]
        running = {unit: list(v) for unit, v in base.items()}
        ordinal = member.purchase_count + 1
        excluded: list[Excluded] = []
        done_groups: set[str] = set()
        candidates = self._candidates(basket, place, local)
        for compiled in candidates:
            group = compiled.rule.group
            if group is not None and self.group_modes.get(group) == GroupMode.BEST_OF:
                if group in done_groups:
                    continue
                done_groups.add(group)
                contenders = [c for c in candidates if c.rule.group == group]
                scored: list[tuple[_Compiled, list[Component]]] = []
                for contender in contenders:
                    got = self._apply(contender, basket, member, ordinal, amounts, local, base, running)
                    if got is not None:
                        scored.append((contender, got))
                if not scored:
                    continue
                best, best_parts = max(scored, key=lambda cr: (sum(p.points for p in cr[1]), -cr[0].rule.priority))
                for c, _ in scored:
                    if c is not best:
                        excluded.append(Excluded(c.rule.id, f"group {group} is best-of; {best.rule.id} pays more"))
            else:
                applied = self._apply(compiled, basket, member, ordinal, amounts, local, base, running)
                if applied is None:
                    continue
                best_parts = applied
            for part in best_parts:
                if part.line >= 0 and part.unit in running:
                    running[part.unit][part.line] += part.points
            parts += best_parts
        if member.counters is not None:
            parts = self._preview_guards(parts, member.counters, ordinal)
        policy = self.program.policy
        expires = basket.receipt_time + timedelta(days=policy.expiry_days) if policy.expiry_days else None
        release = basket.receipt_time + timedelta(days=policy.release_after_days) if policy.release_after_days else None
        return Evaluation(
            self.program.program, self.version, basket.currency, earn_currency,
            self.fx_text[basket.currency] if fx_rate is not None else "", tuple(amounts), tuple(parts), tuple(excluded),
            expires, release, local, policy, self.program.tiers, member.tier,
        )  # fmt: skip

    @staticmethod
    def _preview_guards(parts: list[Component], counters: dict[str, int], ordinal: int) -> list[Component]:
        granted, _ = apply_guards([(p.guard, p.points) for p in parts], counters, ordinal)
        out = []
        for part, grant in zip(parts, granted, strict=True):
            if grant.points != part.points:
                capped = f"{part.capped}; {grant.note}" if part.capped else grant.note
                part = replace(part, points=grant.points, capped=capped)
            out.append(part)
        return out

    def _guard_for(self, c: _Compiled, local: datetime) -> Guard | None:
        if not c.has_guard:
            return None
        rule = c.rule
        ordinal = rule.when.purchase_number
        eq, every = (ordinal.equals or 0, ordinal.every or 0) if ordinal else (0, 0)
        if rule.caps.per_member_per_day is not None:
            return Guard(f"{rule.id}:day:{local.date().isoformat()}", rule.caps.per_member_per_day, eq, every)
        if rule.caps.per_member_per_campaign is not None:
            return Guard(f"{rule.id}:campaign", rule.caps.per_member_per_campaign, eq, every)
        return Guard(ordinal_equals=eq, ordinal_every=every)

    def _apply(
        self, c: _Compiled, basket: Basket, member: MemberContext, ordinal: int, amounts: list[int],
        local: datetime, base: dict[str, list[int]], running: dict[str, list[int]],
    ) -> list[Component] | None:  # fmt: skip
        """The rule's components for this basket, or None when a condition does not hold."""
        for check in c.member_checks:
            if not check(member, ordinal):
                return None
        if c.basket_min_minor is not None:
            currency, minimum = c.basket_min_minor
            total = self._convert(basket.total_minor, basket.currency, currency)
            if total is None or total < minimum:
                return None
        lines = []
        for i, line in enumerate(basket.lines):
            if c.categories is not None and line.category not in c.categories:
                continue
            if c.skus is not None and line.sku not in c.skus:
                continue
            if c.line_min is not None:
                amount = self._convert(line.amount_minor, basket.currency, c.line_min[0])
                if amount is None or amount < c.line_min[1]:
                    continue
            lines.append(i)
        needs_lines = c.categories is not None or c.skus is not None or c.line_min is not None
        if needs_lines and not lines:
            return None
        rule, effect = c.rule, c.rule.effect
        guard = self._guard_for(c, local)
        parts: list[Component] = []
        if c.multiplier is not None:
            extra = c.multiplier - 1
            source = running if effect.compound else base
            unit_base = source.get(rule.unit)
            if unit_base is None:
                return None
            if effect.per == MultiplierScope.BASKET:
                total = sum(unit_base[i] for i in lines)
                points = _round(total * extra.numerator, extra.denominator, self.rounding)
                parts.append(
                    Component(
                        rule.id,
                        rule.unit,
                        points,
                        -1,
                        f"x{effect.multiplier} on {total} base {rule.unit} of the qualifying lines",
                        c.matched,
                        "",
                        guard,
                    )
                )
            else:
                for i in lines:
                    points = _round(unit_base[i] * extra.numerator, extra.denominator, self.rounding)
                    parts.append(
                        Component(
                            rule.id,
                            rule.unit,
                            points,
                            i,
                            f"x{effect.multiplier} on {unit_base[i]} {rule.unit}",
                            c.matched,
                            "",
                            guard,
                        )
                    )
        elif effect.bonus_points is not None:
            parts.append(
                Component(
                    rule.id,
                    rule.unit,
                    effect.bonus_points,
                    -1,
                    f"bonus {effect.bonus_points} {rule.unit}",
                    c.matched,
                    "",
                    guard,
                )
            )
        else:
            per_item = effect.bonus_points_per_item or 0
            for i in lines:
                qty = basket.lines[i].quantity
                parts.append(
                    Component(
                        rule.id,
                        rule.unit,
                        per_item * qty,
                        i,
                        f"{per_item} {rule.unit} x {qty} items",
                        c.matched,
                        "",
                        guard,
                    )
                )
        parts = self._cap(parts, rule)
        if c.basket_min_minor is not None:
            threshold = self._threshold_in(basket.currency, *c.basket_min_minor)
            parts = [replace(p, threshold_minor=threshold) for p in parts]
        return parts

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

    @staticmethod
    def _cap(parts: list[Component], rule: Rule) -> list[Component]:
        per_line, per_receipt = rule.caps.per_line, rule.caps.per_receipt
        if per_line is None and per_receipt is None:
            return parts
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
            out.append(
                Component(
                    part.rule_id, part.unit, points, part.line, part.detail, part.matched, "; ".join(notes), part.guard
                )
                if notes
                else part
            )
        return out
