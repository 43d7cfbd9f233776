"""fraud_svc use cases: score (rules, then model), batch score, churn, offers, model reload.

The models sit in slots swapped atomically: a request already running keeps the model it
started with, a reload that fails validation leaves the serving model in place.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Counter
from redis.exceptions import RedisError

from fraud_svc.churn import check_activity, predict_churn
from fraud_svc.decide import DecisionConfig, decide
from fraud_svc.domain import (
    FUTURE_SKEW,
    MAX_LATENESS,
    BadRequest,
    ChurnPrediction,
    Decision,
    FraudError,
    MemberActivity,
    ModelUnavailable,
    RowFailed,
    TxContext,
    TxKind,
    Verdict,
)
from fraud_svc.features import FeatureRow, featurize, featurize_stream
from fraud_svc.model import Model, artifacts, load_artifact
from fraud_svc.offers import CatalogueOffer, ChosenOffer, choose
from fraud_svc.velocity import Velocity
from pointmesh.bounds import MAX_AMOUNT_MINOR, MAX_POINTS
from pointmesh.clock import Clock, SystemClock

MAX_BATCH = 10_000


log = logging.getLogger(__name__)
DECISIONS = Counter("pointmesh_fraud_decisions_total", "Fraud decisions, by verdict and call (single, batch).",
                    ["verdict", "call"])  # fmt: skip


@dataclass
class ModelSlot:
    kind: str
    models_dir: Path
    model: Model | None = None

    def read(self, path: str = "", *, fall_back: bool = False, check: Callable[[Model], object] | None = None) -> Model:
        """The artifact at `path` (else the newest of this kind), validated, and accepted by
        `check` (the fraud slot's thresholds); nothing is served from it yet. `fall_back`
        (start-up) tries older artifacts when the newest is refused: a half-copied new model or
        one with unusable thresholds must not keep the service from starting on the one before.
        Without it a refusal by `check` propagates as raised (a reload's BadRequest)."""
        if path:
            return _checked(load_artifact(Path(path), kind=self.kind), check)
        candidates = artifacts(self.models_dir, self.kind)
        if not candidates:
            raise ModelUnavailable(f"no {self.kind} artifact under {self.models_dir}", field="path")
        refused: list[str] = []
        for candidate in candidates if fall_back else candidates[:1]:
            try:
                model = load_artifact(candidate, kind=self.kind)
                try:
                    _checked(model, check)
                except BadRequest as exc:
                    if not fall_back:
                        raise
                    raise ModelUnavailable(f"{candidate}: {exc.field or 'metadata'}: {exc.message}") from exc
            except ModelUnavailable as exc:
                refused.append(str(exc))
                if fall_back:
                    log.error("refusing %s artifact %s: %s", self.kind, candidate.name, exc)
                continue
            if refused:
                log.error("serving the older %s artifact %s; %d newer refused", self.kind, candidate.name,
                          len(refused))  # fmt: skip
            return model
        raise ModelUnavailable("; ".join(refused), field="path")


def _checked(model: Model, check: Callable[[Model], object] | None) -> Model:
    if check is not None:
        check(model)
    return model


@dataclass(frozen=True, slots=True)
class Serving:
    """The fraud model and the thresholds that go with it, swapped as one: a request never
    sees a new model with old thresholds or the reverse."""

    model: Model | None
    config: DecisionConfig


def _config_of(model: Model | None, overrides: Mapping[str, Any]) -> DecisionConfig:
    if model is None:
        return DecisionConfig.from_mapping(overrides)
    return DecisionConfig.from_model_metadata(model.metadata, **overrides)


# Identities key the velocity state in Redis, kept for a window's retention: bounded like the
# ledger bounds them, so an oversized one is refused rather than stored.
MAX_IDENTITY = 128
_IDENTITIES = ("member_id", "channel", "store_id", "device_id", "ip", "card_hash", "employee_card",
               "counterparty_member_id")  # fmt: skip
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SKEW_TEXT = f"{FUTURE_SKEW // timedelta(minutes=1)} minutes"


def check(ctx: TxContext, now: datetime, path: str = "transaction") -> TxContext:
    """Refuses (BadRequest naming the field under `path`: "transaction", or "transactions[i]"
    for a batch item) a transaction the velocity state must not record. `now` is fraud_svc's
    clock: event time drives every window, so it is held to the span the platform accepts."""
    if not ctx.event_id or len(ctx.event_id) > 128:
        raise BadRequest("1..128 characters required", field=f"{path}.event_id")
    if not ctx.member_id:
        raise BadRequest("is required", field=f"{path}.member_id")
    for name in _IDENTITIES:
        if len(getattr(ctx, name)) > MAX_IDENTITY:
            raise BadRequest(f"at most {MAX_IDENTITY} characters", field=f"{path}.{name}")
    _check_times(ctx, now, path)
    _check_amounts(ctx, path)
    if ctx.kind == TxKind.TRANSFER and not ctx.counterparty_member_id:
        raise BadRequest("a transfer names the other member", field=f"{path}.counterparty_member_id")
    return ctx


def _check_times(ctx: TxContext, now: datetime, path: str) -> None:
    """An event dated ahead would trim the history of every key it touches to its own time, so
    the next events at that store, card or device would be judged on nothing; one older than
    MAX_LATENESS is later than anything the platform accepts and would age a member's devices."""
    at = ctx.occurred_at
    if at.tzinfo is None:
        raise BadRequest("is required, with a time zone", field=f"{path}.occurred_at")
    if at > now + FUTURE_SKEW:
        raise BadRequest(f"{at.isoformat()} is more than {_SKEW_TEXT} ahead of fraud_svc's clock ({now.isoformat()})",
                         field=f"{path}.occurred_at")  # fmt: skip
    # The ledger refuses what is older than MAX_LATENESS by its own clock: past that bound by
    # the skew two clocks may differ by (or the time the request took to get here), so whatever
    # it accepted is scored, never left to its policy (a blocked device's spend paid unscored).
    if at < now - MAX_LATENESS - FUTURE_SKEW:
        raise BadRequest(f"{at.isoformat()} is more than {MAX_LATENESS.days} days (and {_SKEW_TEXT} of clock skew) "
                         f"before fraud_svc's clock ({now.isoformat()})", field=f"{path}.occurred_at")  # fmt: skip
    # Both may come after the event: a late receipt of a member who joined, or changed their
    # phone number, since. Neither is recorded; they are bounded as moments that have happened.
    for name in ("contact_changed_at", "member_since"):
        moment = getattr(ctx, name)
        if moment is None:
            continue
        if moment.tzinfo is None:
            raise BadRequest("needs a time zone", field=f"{path}.{name}")
        if not _EPOCH <= moment <= now + FUTURE_SKEW:
            raise BadRequest(f"must lie between 1970-01-01 and {_SKEW_TEXT} ahead of fraud_svc's clock "
                             f"({now.isoformat()}), got {moment.isoformat()}", field=f"{path}.{name}")  # fmt: skip


def _check_amounts(ctx: TxContext, path: str) -> None:
    """Amounts and points are summed over windows in Redis's Lua, whose numbers are doubles: a
    value within the platform's bounds (pointmesh.bounds, far below 2**53) is exact there."""
    if ctx.points < 0:
        raise BadRequest(f"must not be negative, got {ctx.points}", field=f"{path}.points")
    if ctx.points > MAX_POINTS:
        raise BadRequest(f"must be at most {MAX_POINTS}, got {ctx.points}", field=f"{path}.points")
    if ctx.amount_minor < 0:
        raise BadRequest(f"must not be negative, got {ctx.amount_minor}", field=f"{path}.amount.amount_minor")
    if ctx.amount_minor > MAX_AMOUNT_MINOR:
        raise BadRequest(f"must be at most {MAX_AMOUNT_MINOR} minor units, got {ctx.amount_minor}",
                         field=f"{path}.amount.amount_minor")  # fmt: skip
    if abs(ctx.balance_points) > MAX_POINTS:
        raise BadRequest(f"must lie within -{MAX_POINTS}..{MAX_POINTS}, got {ctx.balance_points}",
                         field=f"{path}.balance_points")  # fmt: skip


def check_member(activity: MemberActivity, as_of: datetime, now: datetime) -> None:
    """Refuses (BadRequest naming the field) a ChurnScore or Offers request whose numbers no
    ledger could have sent (churn.check_activity), or counted `as_of` ahead of fraud_svc's clock:
    every "days since" is measured to it."""
    if not activity.member_id or len(activity.member_id) > MAX_IDENTITY:
        raise BadRequest(f"1..{MAX_IDENTITY} characters required", field="activity.member_id")
    if as_of > now + FUTURE_SKEW:  # first: the activity's times are checked against as_of
        raise BadRequest(f"{as_of.isoformat()} is more than {_SKEW_TEXT} ahead of fraud_svc's clock ({now.isoformat()})",
                         field="as_of")  # fmt: skip
    check_activity(activity, as_of)


def _row_failed(index: int, exc: Exception) -> RowFailed:
    log.error("scoring transactions[%d] failed", index, exc_info=exc)
    return RowFailed(f"fraud_svc failed on this transaction ({type(exc).__name__})", field=f"transactions[{index}]")


def _decide_chunk(
    contexts: Sequence[TxContext], rows: list[FeatureRow], model: Model | None, config: DecisionConfig
) -> list[Decision]:
    if model is None:
        return [decide(ctx, row, None, (), config) for ctx, row in zip(contexts, rows, strict=True)]
    scores = model.predict(np.asarray([r.values for r in rows], dtype=np.float64)).tolist()
    decisions = [decide(ctx, row, score, (), config, model_version=model.version)
                 for ctx, row, score in zip(contexts, rows, scores, strict=True)]  # fmt: skip
    flagged = [k for k, d in enumerate(decisions) if d.verdict != Verdict.ALLOW]
    if flagged:
        reasons = model.explain_many(np.asarray([rows[k].values for k in flagged], dtype=np.float64))
        for k, why in zip(flagged, reasons, strict=True):
            decisions[k] = decide(contexts[k], rows[k], scores[k], why, config, model_version=model.version)
    return decisions


class FraudService:
    def __init__(
        self, velocity: Velocity, fraud: ModelSlot, churn: ModelSlot, *, overrides: Mapping[str, Any] | None = None,
        catalogue: tuple[CatalogueOffer, ...] = (), clock: Clock | None = None,
    ) -> None:  # fmt: skip
        self.velocity = velocity
        self.clock = clock or SystemClock()
        self.fraud = fraud
        self.churn = churn
        self.overrides = dict(overrides or {})
        self.catalogue = catalogue
        self.serving = Serving(fraud.model, self._config(fraud.model))

    def _config(self, model: Model | None) -> DecisionConfig:
        return _config_of(model, self.overrides)

    async def score(self, ctx: TxContext) -> Decision:
        decision = await self._decide(ctx)
        DECISIONS.labels(decision.verdict.value, "single").inc()
        return decision

    async def _decide(self, ctx: TxContext) -> Decision:
        check(ctx, self.clock.now())
        features = await featurize(ctx, self.velocity)
        serving = self.serving
        model, config = serving.model, serving.config
        if model is None:
            return decide(ctx, features, None, (), config)
        score = float(model.predict(features.array())[0])
        decision = decide(ctx, features, score, (), config, model_version=model.version)
        if decision.verdict == Verdict.ALLOW:
            return decision  # explanations cost ~1.5 ms a row; only held or refused ones need them
        return decide(ctx, features, score, model.explain(features), config, model_version=model.version)

    async def score_batch(self, items: Sequence[TxContext | FraudError]) -> list[Decision | FraudError]:
        if len(items) > MAX_BATCH:
            raise BadRequest(f"at most {MAX_BATCH} transactions per batch", field="transactions")
        out: list[Decision | FraudError | None] = [None] * len(items)
        valid: list[tuple[int, TxContext]] = []
        now = self.clock.now()
        for i, item in enumerate(items):
            try:
                if isinstance(item, FraudError):
                    raise item
                valid.append((i, check(item, now, f"transactions[{i}]")))
            except FraudError as error:
                out[i] = error
            except Exception as exc:
                out[i] = _row_failed(i, exc)
        try:
            decided: list[Decision | FraudError] = list(await self._decide_many([c for _, c in valid]))
        except (FraudError, RedisError, OSError, TimeoutError):
            raise  # fraud_svc's own state is away: every row would fail alike, slowly
        except Exception as exc:
            # A fault on one row must not leave the whole batch unscored: each row alone, so
            # only the one it is on fails (velocity counts each event id once, so rows the batch
            # counted already are not counted twice).
            log.warning("scoring a batch of %d failed (%s); scoring its rows one by one", len(valid), exc)
            decided = [await self._decide_alone(i, ctx) for i, ctx in valid]
        for (i, _), decision in zip(valid, decided, strict=True):
            if isinstance(decision, Decision):
                DECISIONS.labels(decision.verdict.value, "batch").inc()
            out[i] = decision
        return [x for x in out if x is not None]

    async def _decide_alone(self, index: int, ctx: TxContext) -> Decision | FraudError:
        try:
            return await self._decide(ctx)
        except FraudError as error:
            return error
        except Exception as exc:
            return _row_failed(index, exc)

    async def _decide_many(self, contexts: list[TxContext]) -> list[Decision]:
        """In order, chunk by chunk as the velocity store answers (so the model scores one chunk
        while Redis computes the next), with the model the batch started with; explanations
        (SHAP) only for the rows that are held or refused."""
        if not contexts:
            return []
        serving = self.serving
        model, config = serving.model, serving.config
        decisions: list[Decision] = []
        async with aclosing(featurize_stream(contexts, self.velocity)) as chunks:
            async for rows in chunks:
                done = len(decisions)
                decisions += _decide_chunk(contexts[done : done + len(rows)], rows, model, config)
        return decisions

    def churn_score(self, activity: MemberActivity, as_of: datetime) -> ChurnPrediction:
        check_member(activity, as_of, self.clock.now())
        model = self.churn.model
        if model is None:
            raise ModelUnavailable("no churn model is loaded", field="model")
        return predict_churn(model, activity, as_of)

    def offers(self, activity: MemberActivity, as_of: datetime) -> tuple[ChurnPrediction, list[ChosenOffer]]:
        prediction = self.churn_score(activity, as_of)
        return prediction, choose(self.catalogue, prediction.probability, activity.segment, activity.spend_90d_minor)

    async def reload(self, kind: str, path: str) -> tuple[str, str]:
        slot = {"fraud": self.fraud, "churn": self.churn}.get(kind)
        if slot is None:
            raise BadRequest(f"must be 'fraud' or 'churn', got {kind!r}", field="model")
        fresh = await asyncio.to_thread(slot.read, path, check=self.check_model)
        previous = self._install(slot, fresh)
        return fresh.version, previous

    def configure(self, overrides: Mapping[str, Any]) -> None:
        """New threshold/rule overrides over the serving model's metadata (checked first)."""
        serving = self.serving
        config = _config_of(serving.model, overrides)
        self.overrides, self.serving = dict(overrides), Serving(serving.model, config)

    def load_at_start(self) -> None:
        for slot in (self.fraud, self.churn):
            self._install(slot, slot.read(fall_back=True, check=self.check_model))

    def check_model(self, model: Model) -> None:
        """Refuses (BadRequest) a fraud model whose metadata thresholds, with the operator's
        overrides on top, are not a valid configuration; a churn model has none."""
        if model.kind == "fraud":
            self._config(model)

    def _install(self, slot: ModelSlot, fresh: Model) -> str:
        """Serves `fresh` once everything about it is checked (the fraud thresholds in its
        metadata too); a refusal leaves the serving model and thresholds as they were."""
        previous = slot.model.version if slot.model else ""
        if slot is self.fraud:
            serving = Serving(fresh, self._config(fresh))
            slot.model, self.serving = fresh, serving
        else:
            slot.model = fresh
        return previous
