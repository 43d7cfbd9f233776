"""gRPC servicer for RulesService: protobuf in, use case, protobuf out. No policy here."""

from __future__ import annotations

import logging
from datetime import datetime

import grpc

from pointmesh.errors import rich_status, translating
from pointmesh.tier_status import tier_status_pb
from pointmesh.timestamps import from_timestamp
from pointmesh.v1 import common_pb2, rules_pb2, rules_pb2_grpc
from rules_svc import convert as cv
from rules_svc import domain as d
from rules_svc.game_service import GameService
from rules_svc.service import RulesService

log = logging.getLogger(__name__)
DOMAIN = "rules.pointmesh.dev"

ERROR_CODES: tuple[tuple[type[d.RulesError], grpc.StatusCode, str], ...] = (
    (d.ProgramRejected, grpc.StatusCode.INVALID_ARGUMENT, "PROGRAM_INVALID"),
    (d.BadRequest, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (d.NotFound, grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
    (d.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION"),
    (d.Conflict, grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT"),
    (d.VersionUnreadable, grpc.StatusCode.UNAVAILABLE, "VERSION_UNREADABLE"),
)


def code_of(error: d.RulesError) -> tuple[grpc.StatusCode, str]:
    for cls, code, reason in ERROR_CODES:
        if isinstance(error, cls):
            return code, reason
    return grpc.StatusCode.INTERNAL, "INTERNAL"


def error_status(error: d.RulesError) -> grpc.Status:
    code, reason = code_of(error)
    violations = error.violations if isinstance(error, d.ProgramRejected) else ()
    text = f"{error.field}: {error.message}" if error.field and not violations else error.message
    if violations:
        text = f"program refused with {len(violations)} problem(s): " + "; ".join(
            f"{p}: {m}" for p, m in violations[:10]
        )
    return rich_status(code, text, reason=reason, domain=DOMAIN, field=error.field, violations=violations)


def _results(outcomes: list[d.Evaluation | d.RulesError]) -> list[rules_pb2.EvaluateResult]:
    """Per item, its evaluation or its error: an evaluation no response can carry is that item's
    error, never the whole call's."""
    out = []
    for outcome in outcomes:
        if isinstance(outcome, d.Evaluation):
            try:
                out.append(rules_pb2.EvaluateResult(evaluation=cv.evaluation_pb(outcome)))
                continue
            except d.RulesError as error:
                outcome = error
        code, _reason = code_of(outcome)
        out.append(
            rules_pb2.EvaluateResult(
                error=rules_pb2.ItemError(code=code.name, message=outcome.message, field=outcome.field)
            )
        )
    return out


translated = translating(d.RulesError, error_status)


class RulesServicer(rules_pb2_grpc.RulesServiceServicer):
    def __init__(self, service: RulesService, game: GameService) -> None:
        self.service = service
        self.game = game

    def _at(self, request: rules_pb2.GetTierStatusRequest | rules_pb2.QuoteRedemptionRequest) -> datetime:
        """The request's `at`, or now when it has none."""
        if not request.HasField("at"):
            return self.service.clock.now()
        try:
            return from_timestamp(request.at)
        except ValueError as exc:
            raise d.BadRequest(str(exc), field="at") from None

    @translated
    async def GetMemberProgress(
        self, request: rules_pb2.GetMemberProgressRequest, context: grpc.aio.ServicerContext
    ) -> rules_pb2.GetMemberProgressResponse:
        found = await self.game.progress(request.program, request.member_id)
        return rules_pb2.GetMemberProgressResponse(
            items=[cv.game_progress_pb(item) for item in found.items], rewards_paid_points=found.paid_points,
            rewards_pending_points=found.pending_points,
        )  # fmt: skip

    @translated
    async def ListChallenges(
        self, request: rules_pb2.ListChallengesRequest, context: grpc.aio.ServicerContext
    ) -> rules_pb2.ListChallengesResponse:
        at = cv.optional_time(request, "at")
        return rules_pb2.ListChallengesResponse(
            challenges=[cv.challenge_pb(c) for c in self.game.challenges(request.program, at)]
        )

    @translated
    async def JoinChallenge(
        self, request: rules_pb2.JoinChallengeRequest, context: grpc.aio.ServicerContext
    ) -> rules_pb2.JoinChallengeResponse:
        joined = await self.game.join(request.program, request.challenge_id, request.member_id)
        return rules_pb2.JoinChallengeResponse(joined=joined)

    @translated
    async def GetExperimentReport(
        self, request: rules_pb2.GetExperimentReportRequest, context: grpc.aio.ServicerContext
    ) -> rules_pb2.GetExperimentReportResponse:
        found = await self.game.experiment_report(request.program, request.experiment_id)
        return cv.experiment_report_pb(found)

    @translated
    async def GetLeaderboard(
        self, request: rules_pb2.GetLeaderboardRequest, context: grpc.aio.ServicerContext
    ) -> rules_pb2.GetLeaderboardResponse:
        rows = await self.game.leaderboard(request.program, request.challenge_id, request.limit)
        return rules_pb2.GetLeaderboardResponse(entries=[cv.leaderboard_pb(rank, row) for rank, row in rows])

    @translated
    async def Evaluate(
        self, request: rules_pb2.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> rules_pb2.EvaluateResponse:
        result = self.service.evaluate(
            request.program, request.version, cv.basket(request.basket), cv.member(request.member)
        )
        return rules_pb2.EvaluateResponse(evaluation=cv.evaluation_pb(result))

    @translated
    async def EvaluateBatch(
        self, request: rules_pb2.EvaluateBatchRequest, context: grpc.aio.ServicerContext
    ) -> rules_pb2.EvaluateBatchResponse:
        items = [cv.item(m, i) for i, m in enumerate(request.items)]
        try:
            outcomes = self.service.evaluate_many(request.program, request.version, items)
        except Exception:  # a bug some basket trips, not a refusal: find it, answer the others
            log.exception("EvaluateBatch of %d items failed; evaluating them one by one", len(items))
            outcomes = [self._evaluate_alone(request.program, request.version, item) for item in items]
        return rules_pb2.EvaluateBatchResponse(results=_results(outcomes))

    def _evaluate_alone(
        self, program: str, version: int, item: tuple[d.Basket, d.MemberContext] | d.RulesError
    ) -> d.Evaluation | d.RulesError:
        """One item's outcome; a failure that is no RulesError is this item's INTERNAL error
        (the batch reports per item, so one basket never reads as rules_svc being down)."""
        try:
            return self.service.evaluate_many(program, version, [item])[0]
        except Exception as exc:
            log.exception("EvaluateBatch item failed")
            return d.RulesError(f"rules_svc failed on this basket: {type(exc).__name__}: {exc}")

    @translated
    async def Simulate(
        self, request: rules_pb2.SimulateRequest, context: grpc.aio.ServicerContext
    ) -> rules_pb2.SimulateResponse:
        items = [cv.item(m, i) for i, m in enumerate(request.items)]
        return rules_pb2.SimulateResponse(
            results=_results(self.service.simulate(request.document, request.format, items))
        )

    @translated
    async def PublishProgram(
        self, request: rules_pb2.PublishProgramRequest, context: grpc.aio.ServicerContext
    ) -> rules_pb2.PublishProgramResponse:
        namespace, key = cv.key_of(request.idempotency_key)
        effective = None
        if request.HasField("effective_from"):
            try:
                effective = from_timestamp(request.effective_from)
            except ValueError as exc:
                raise d.BadRequest(str(exc), field="effective_from") from None
        info = await self.service.publish(
            namespace, key, request.document, request.format, effective, request.published_by
        )
        return rules_pb2.PublishProgramResponse(version=cv.version_pb(info))

    @translated
    async def GetTierStatus(
        self, request: rules_pb2.GetTierStatusRequest, context: grpc.aio.ServicerContext
    ) -> rules_pb2.GetTierStatusResponse:
        at = self._at(request)
        version, standing = self.service.tier_status(request.program, dict(request.qualification), at)
        return rules_pb2.GetTierStatusResponse(status=tier_status_pb(request.program, version, standing))

    @translated
    async def GetProgram(
        self, request: rules_pb2.GetProgramRequest, context: grpc.aio.ServicerContext
    ) -> rules_pb2.GetProgramResponse:
        info, document = await self.service.document(request.program, request.version)
        return rules_pb2.GetProgramResponse(version=cv.version_pb(info), document_json=document)

    @translated
    async def ListVersions(
        self, request: rules_pb2.ListVersionsRequest, context: grpc.aio.ServicerContext
    ) -> rules_pb2.ListVersionsResponse:
        versions = self.service.list_versions(request.program) if request.program else self.service.all_versions()
        return rules_pb2.ListVersionsResponse(versions=[cv.version_pb(v) for v in versions])

    @translated
    async def QuoteRedemption(
        self, request: rules_pb2.QuoteRedemptionRequest, context: grpc.aio.ServicerContext
    ) -> rules_pb2.QuoteRedemptionResponse:
        at = self._at(request)
        currency = request.basket_total.currency
        version, q = self.service.quote_redemption(
            request.program, at, currency, request.basket_total.amount_minor, request.points_available,
            request.points_wanted,
        )  # fmt: skip
        return rules_pb2.QuoteRedemptionResponse(
            program=request.program, version=version, unit=q.unit, points=q.points,
            pays=common_pb2.Money(amount_minor=q.pays_minor, currency=currency),
            remaining=common_pb2.Money(amount_minor=q.remaining_minor, currency=currency), explanation=q.explanation,
        )  # fmt: skip
