"""rules_svc use cases: publish and look up program versions, evaluate and simulate baskets.

Evaluation is pure CPU on a compiled program held in memory; the version that applies is the
one in effect at the basket's receipt time, so a late receipt earns under the campaign that
was live when the customer paid.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from pointmesh.bounds import MAX_POINTS
from pointmesh.clock import Clock
from pointmesh.tiers import TierStanding, first_non_month, tier_standing
from rules_svc.domain import (
    BadRequest,
    Basket,
    Conflict,
    Evaluation,
    FailedPrecondition,
    MemberContext,
    NotFound,
    ProgramRejected,
    RulesError,
    VersionUnreadable,
)
from rules_svc.engine import CompiledProgram
from rules_svc.program import MAX_STORED_JSON_BYTES, Program, ProgramInvalid, Rule, load_program, validate_program
from rules_svc.redemption import RedemptionQuote, quote_redemption
from rules_svc.versions import PublishKey, VersionInfo, VersionStore

FORMATS = ("yaml", "json")


def _parse(document: str, fmt: str) -> tuple[CompiledProgram, str, str]:
    """A document -> (compiled draft, canonical JSON, its sha256), or ProgramRejected."""
    fmt = fmt or "yaml"
    if fmt not in FORMATS:
        raise BadRequest(f"format must be one of {list(FORMATS)}, got {fmt!r}", field="format")
    if not document.strip():
        raise BadRequest("the document is empty", field="document")
    try:
        program = load_program(document, fmt=fmt)
    except ProgramInvalid as exc:
        raise ProgramRejected(exc.errors) from None
    return _canonical(program)


def _canonical(program: Program) -> tuple[CompiledProgram, str, str]:
    canonical = json.dumps(program.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    encoded = canonical.encode()
    size = len(encoded)
    if size > MAX_STORED_JSON_BYTES:
        # YAML aliases and filled-in defaults make the stored JSON far larger than the source: a
        # version over the gRPC message limit could never be sent to a follower (GetProgram).
        raise ProgramRejected([(
            "",
            f"validated, the program is {size} bytes of JSON, over the {MAX_STORED_JSON_BYTES} bytes a "
            "version may hold (YAML aliases and defaults count once per use); make it smaller",
        )])  # fmt: skip
    return CompiledProgram(program, 0), canonical, hashlib.sha256(encoded).hexdigest()


def compile_stored(program: str, version: int, document_json: str) -> CompiledProgram:
    """A stored version's document, compiled as it is served; VersionUnreadable if this build
    cannot read it (a follower checks each version it copies with this before serving it)."""
    try:
        return CompiledProgram(validate_program(json.loads(document_json), stored=True), version)
    except (ProgramInvalid, ValueError, TypeError) as exc:
        raise VersionUnreadable(
            f"program {program} v{version} cannot be read by this rules_svc ({exc}); it was likely "
            "published by a newer release: retry once this replica runs it"
        ) from None


class RulesService:
    def __init__(self, versions: VersionStore, clock: Clock) -> None:
        self.versions = versions
        self.clock = clock
        self._index: dict[str, list[VersionInfo]] = {}
        self._compiled: dict[tuple[str, int], CompiledProgram] = {}
        # Versions this build cannot read, with why: a version never changes and neither does the
        # build while it runs, so every basket in its window is refused without parsing it again.
        self._unreadable: dict[tuple[str, int], str] = {}
        self._listings_started = self._listing_installed = 0

    async def refresh(self) -> None:
        """Re-reads the version list (other replicas may have published). Versions are only
        ever added, so a listing started later holds every version an earlier one does: one
        that finishes after a later-started one (a periodic refresh overtaken by a publish's)
        is dropped, or the version just published would vanish until the next refresh."""
        self._listings_started += 1
        started = self._listings_started
        infos = await asyncio.to_thread(self.versions.versions)
        if started < self._listing_installed:
            return
        self._listing_installed = started
        index: dict[str, list[VersionInfo]] = {}
        for info in infos:
            index.setdefault(info.program, []).append(info)
        for items in index.values():
            items.sort(key=lambda i: (i.effective_from, i.version))
        self._index = index

    async def publish(
        self, namespace: str, key: str, document: str, fmt: str, effective_from: datetime | None, published_by: str,
        *, backdated: bool = False, only_if_absent: bool = False,
    ) -> VersionInfo:  # fmt: skip
        """`backdated` and `only_if_absent` are for seeding a fresh installation: the API never
        publishes into the past."""
        if not key or len(key) > 128:
            raise BadRequest("an idempotency key of 1..128 characters is required", field="idempotency_key.key")
        now = self.clock.now()
        draft, canonical, sha = self._draft(document, fmt)
        existing = self._index.get(draft.program.program)
        if only_if_absent and existing:
            return max(existing, key=lambda i: i.version)
        fingerprint = hashlib.sha256(
            f"{sha}|{effective_from.isoformat() if effective_from else ''}|{published_by}".encode()
        ).hexdigest()
        if effective_from is not None and effective_from < now and not backdated:
            # A retry of a publish whose start has passed since returns what it published.
            done = await asyncio.to_thread(self.versions.published_with, namespace, key)
            if done is None:
                raise BadRequest(f"{effective_from.isoformat()} is in the past", field="effective_from")
            _same_publish(namespace, key, done[1], fingerprint)
            return done[0]
        info, used = await asyncio.to_thread(
            lambda: self.versions.publish(
                namespace=namespace, key=key, fingerprint=fingerprint, program=draft.program.program,
                document_json=canonical, sha256=sha, effective_from=effective_from or now,
                published_by=published_by, now=now,
            )
        )  # fmt: skip
        if used is not None:
            _same_publish(namespace, key, used, fingerprint)
        self._compiled[(info.program, info.version)] = CompiledProgram(draft.program, info.version)
        await self.refresh()
        return info

    def _draft(self, document: str, fmt: str) -> tuple[CompiledProgram, str, str]:
        """A document as publishing it would store it: what Simulate previews too, so a draft
        prices a basket there as Evaluate does once it is published."""
        draft, canonical, sha = _parse(document, fmt)
        if kept := self._campaign_starts_kept(draft.program):
            return _canonical(kept)
        return draft, canonical, sha

    def _campaign_starts_kept(self, draft: Program) -> Program | None:
        """The draft with each campaign-capped rule's start written as an earlier version wrote
        the same instant, if any differs only in how (an offset of +02:00 or Z): the start's text
        names the members' counters, and the same run made longer keeps counting (docs/rules.md,
        Caps). None when nothing changes."""
        earlier: dict[str, list[datetime]] = {}
        for info in self._index.get(draft.program, []):
            try:
                rules = self.compiled(info.program, info.version, info.effective_from).program.rules
            except VersionUnreadable:
                continue
            for rule in rules:
                if (start := _campaign_start(rule)) is not None:
                    earlier.setdefault(rule.id, []).append(start)
        changed = False
        rules_out = []
        for rule in draft.rules:
            start = _campaign_start(rule)
            same = [s for s in earlier.get(rule.id, ()) if start is not None and s == start]
            if start is not None and same and start.isoformat() not in {s.isoformat() for s in same}:
                assert rule.when.date_range is not None
                dates = rule.when.date_range.model_copy(update={"start": same[0]})
                rule = rule.model_copy(update={"when": rule.when.model_copy(update={"date_range": dates})})
                changed = True
            rules_out.append(rule)
        return draft.model_copy(update={"rules": rules_out}) if changed else None

    def all_versions(self) -> list[VersionInfo]:
        """Every program's versions, by program then version (what a follower copies)."""
        return sorted((i for infos in self._index.values() for i in infos), key=lambda i: (i.program, i.version))

    def list_versions(self, program: str) -> list[VersionInfo]:
        found = self._index.get(program)
        if not found:
            raise NotFound(f"program {program!r} has no published version", field="program")
        return sorted(found, key=lambda i: i.version)

    def version_info(
        self, program: str, version: int, at: datetime, *, at_field: str = "basket.receipt_time"
    ) -> VersionInfo:
        """The named version, or (version 0) the one in effect at `at`; `at_field` is the request
        field `at` came from, blamed when no version was in effect then."""
        infos = self.list_versions(program)
        if version < 0:
            raise BadRequest(f"must be 0 (in effect) or a version number, got {version}", field="version")
        if version:
            for info in infos:
                if info.version == version:
                    return info
            raise NotFound(f"program {program} has no version {version}", field="version")
        in_order = self._index[program]
        pos = bisect.bisect_right([i.effective_from for i in in_order], at)
        if pos == 0:
            raise FailedPrecondition(
                f"no version of program {program} was in effect at {at.isoformat()}; the first starts "
                f"{in_order[0].effective_from.isoformat()}",
                field=at_field,
            )
        return in_order[pos - 1]

    async def document(self, program: str, version: int) -> tuple[VersionInfo, str]:
        info = self.version_info(program, version, self.clock.now(), at_field="version")
        text = await asyncio.to_thread(self.versions.document, info.program, info.version)
        if text is None:
            raise NotFound(f"program {program} v{info.version} has no stored document", field="version")
        return info, text

    def compiled(
        self, program: str, version: int, at: datetime, *, at_field: str = "basket.receipt_time"
    ) -> CompiledProgram:
        """VersionUnreadable for a stored version this build cannot validate: versions published
        under older, looser checks validate (`stored=True`), so it is one from a newer release."""
        info = self.version_info(program, version, at, at_field=at_field)
        key = (info.program, info.version)
        found = self._compiled.get(key)
        if found is None:
            if key in self._unreadable:  # a fresh error each time: one raised again keeps every traceback
                raise VersionUnreadable(self._unreadable[key])
            text = self.versions.document(info.program, info.version)
            if text is None:
                raise NotFound(f"program {program} v{info.version} has no stored document", field="version")
            try:
                found = compile_stored(info.program, info.version, text)
            except VersionUnreadable as unreadable:
                self._unreadable[key] = unreadable.message
                raise
            self._compiled[key] = found
        return found

    def adopt(self, compiled: CompiledProgram) -> None:
        """Keeps a version compiled elsewhere (a follower's check of a copy) for serving."""
        self._compiled[(compiled.program.program, compiled.version)] = compiled

    def evaluate(self, program: str, version: int, basket: Basket, member: MemberContext) -> Evaluation:
        return self.compiled(program, version, basket.receipt_time).evaluate(basket, member)

    def evaluate_many(
        self, program: str, version: int, items: Sequence[tuple[Basket, MemberContext] | RulesError]
    ) -> list[Evaluation | RulesError]:
        return _each(items, lambda basket, member: self.evaluate(program, version, basket, member))

    def quote_redemption(
        self, program: str, at: datetime, currency: str, total_minor: int, available: int, wanted: int
    ) -> tuple[int, RedemptionQuote]:
        compiled = self.compiled(program, 0, at, at_field="at")
        return compiled.version, quote_redemption(compiled.program, currency, total_minor, available, wanted)

    def tier_status(self, program: str, qualification: Mapping[str, int], at: datetime) -> tuple[int, TierStanding]:
        """The standing `qualification` (credits by month of the program's zone) gives under the
        version in effect at `at`. A month past ±MAX_POINTS counts as that: no threshold is
        higher (at most 10^12), and a month of many purchases each within the bounds may pass it
        (refused, the member's tier could no longer be read at all)."""
        if (month := first_non_month(qualification)) is not None:
            raise BadRequest(f"{month!r} is not a month (YYYY-MM)", field=f"qualification[{month!r}]")
        qualification = {m: max(-MAX_POINTS, min(MAX_POINTS, credits)) for m, credits in qualification.items()}
        if at.year > LAST_YEAR:
            raise BadRequest(f"must be before the year {LAST_YEAR + 1}", field="at")
        compiled = self.compiled(program, 0, at, at_field="at")
        policy = compiled.tier_policy
        if policy is None:
            raise FailedPrecondition(f"program {program} v{compiled.version} has no tiers", field="program")
        return compiled.version, tier_standing(policy, qualification, at)

    def simulate(
        self, document: str, fmt: str, items: Sequence[tuple[Basket, MemberContext] | RulesError]
    ) -> list[Evaluation | RulesError]:
        draft, _canonical, _sha = self._draft(document, fmt)
        return _each(items, draft.evaluate)


LAST_YEAR = 9990  # a standing looks up to a few years ahead of `at`


def _same_publish(namespace: str, key: str, used: PublishKey, fingerprint: str) -> None:
    if used.fingerprint != fingerprint:
        raise Conflict(
            f"idempotency key {namespace}/{key} already published {used.program} v{used.version} "
            f"with another document at {used.created_at.isoformat()}",
            field="idempotency_key",
        )


def _each(
    items: Sequence[tuple[Basket, MemberContext] | RulesError], evaluate: Callable[[Basket, MemberContext], Evaluation]
) -> list[Evaluation | RulesError]:
    """Per-item outcomes of a batch: an item that failed to parse or to evaluate keeps its error."""
    out: list[Evaluation | RulesError] = []
    for item in items:
        if isinstance(item, RulesError):
            out.append(item)
            continue
        try:
            out.append(evaluate(*item))
        except RulesError as error:
            out.append(error)
    return out


def _campaign_start(rule: Rule) -> datetime | None:
    """The start (an instant, with its offset) of a rule capped per member per campaign."""
    dates = rule.when.date_range
    if rule.caps.per_member_per_campaign is None or dates is None or dates.start is None:
        return None
    return dates.start if dates.start.tzinfo is not None else None
