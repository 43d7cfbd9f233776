"""rules_svc as a follower of one leader instance, so evaluation scales across pods while the
state that must be single stays in one place.

Published program versions and gamification progress live in the leader's SQLite files. On
Kubernetes every pod has its own disk: replicas that each kept their own files would each
publish their own version 7, a campaign would reach a third of the tills, and a member's
purchases would be counted by whichever pod's consumer got them. A follower
(`POINTMESH_RULES_LEADER_ADDR` set) therefore:

* copies the leader's versions into its own store (ListVersions, then GetProgram for the ones
  it lacks) at start and on every reload, and evaluates, simulates, quotes and lists from that
  copy, so the hot path never waits on the leader and keeps working while it is away; a version
  it cannot compile (a newer leader's, mid-rollout) is copied all the same and answers
  UNAVAILABLE for the receipts in its window, as the leader does;
* forwards what writes or reads the single state (PublishProgram and the gamification calls)
  to the leader with the caller's deadline and metadata, and relays the leader's status and
  error details unchanged; after a publish it copies at once, so the caller's next Evaluate on
  the same pod sees the new version;
* runs no gamification consumer and seeds nothing (the leader does both).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from pointmesh.timestamps import from_timestamp
from pointmesh.v1 import rules_pb2, rules_pb2_grpc
from rules_svc.domain import VersionUnreadable
from rules_svc.engine import CompiledProgram
from rules_svc.game_service import GameService
from rules_svc.server import RulesServicer
from rules_svc.service import RulesService, compile_stored
from rules_svc.versions import VersionInfo, VersionStore

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Message)


class DivergedFromLeader(ValueError):
    """This instance's rules directory holds history of its own (it was once a leader, or its
    leader lost its own): a version the leader does not have, or has otherwise."""


class LeaderMirror:
    """Copies the leader's program versions into this instance's store."""

    def __init__(self, leader: rules_pb2_grpc.RulesServiceStub, store: VersionStore, service: RulesService) -> None:
        self.leader = leader
        self.store = store
        self.service = service
        self._skipped: set[tuple[str, int]] = set()  # versions left out, logged once each
        # Versions held here that the leader's last listing lacked: foreign only if the next
        # one lacks them too (a leader re-reading its index may list a moment-old one).
        self._unlisted: set[tuple[str, int]] = set()

    async def pull(self) -> int:
        """Copies every version this store lacks, then re-reads the index; returns how many.
        DivergedFromLeader if a version here differs from the leader's under the same number, or
        is one the leader did not list twice running (the leader never deletes one, so it is
        history of this directory's own, which would price receipts as no other replica does).

        A version is compiled before it is stored and kept compiled for serving. One this build
        cannot read (a newer leader's, mid-rollout) is stored as the leader has it and answers
        UNAVAILABLE for the receipts in its window, as the leader does, so the replica a ledger
        reaches never decides what a receipt earns. One the leader cannot send (over the message
        limit) is left out and asked for again on the next pull; the ones after it still come."""
        listing = await self.leader.ListVersions(rules_pb2.ListVersionsRequest())
        held = {(i.program, i.version): i.sha256 for i in await asyncio.to_thread(self.store.versions)}
        unlisted = set(held) - {(pb.program, pb.version) for pb in listing.versions}
        foreign, self._unlisted = sorted(unlisted & self._unlisted), unlisted
        if foreign:
            program, version = foreign[0]
            raise DivergedFromLeader(f"{program} v{version} here is a version the leader does not have "
                                     f"({len(foreign)} such); this instance's rules directory has history of "
                                     "its own: empty it")  # fmt: skip
        copied = 0
        for pb in listing.versions:
            sha = held.get((pb.program, pb.version))
            if sha == pb.sha256:
                continue
            if sha is not None:
                raise DivergedFromLeader(f"{pb.program} v{pb.version} here has sha256 {sha}, the leader's "
                                         f"{pb.sha256}; this instance's rules directory has history of its own: "
                                         "empty it")  # fmt: skip
            fetched = await self._fetch(pb)
            if fetched is None:
                continue
            compiled, document = fetched
            info = VersionInfo(pb.program, pb.version, from_timestamp(pb.published_at),
                               from_timestamp(pb.effective_from), pb.published_by, pb.sha256)  # fmt: skip
            copied += await asyncio.to_thread(self.store.copy, info, document)
            if compiled is not None:
                self.service.adopt(compiled)
        await self.service.refresh()
        if copied:
            log.info("copied %d program version(s) from the leader", copied)
        return copied

    async def _fetch(self, pb: rules_pb2.ProgramVersion) -> tuple[CompiledProgram | None, str] | None:
        """One leader version, compiled (None if this build cannot read it, logged), with its
        document; None (logged once) if the leader cannot send it (RESOURCE_EXHAUSTED: over the
        message limit)."""
        request = rules_pb2.GetProgramRequest(program=pb.program, version=pb.version)
        try:
            found = await self.leader.GetProgram(request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            if (pb.program, pb.version) not in self._skipped:
                self._skipped.add((pb.program, pb.version))
                log.error("not copying %s v%d: the leader cannot send it: %s %s", pb.program, pb.version,
                          exc.code().name, exc.details())  # fmt: skip
            return None
        try:
            return compile_stored(pb.program, pb.version, found.document_json), found.document_json
        except VersionUnreadable as exc:
            log.error("copied %s v%d, which this release cannot read: its receipts wait (UNAVAILABLE): %s",
                      pb.program, pb.version, exc.message)  # fmt: skip
            return None, found.document_json

    async def pull_until_ready(self, retry_seconds: float = 2.0) -> None:
        """At start: a follower with no copy yet has nothing to evaluate with, so it waits for
        the leader; one with a copy (a restarted container) starts on it and catches up later.
        A copy that contradicts the leader stops the start (ValueError)."""
        while True:
            try:
                await self.pull()
                if self._unlisted:  # held here, not listed by the leader: foreign if the next listing agrees
                    await asyncio.sleep(retry_seconds)
                    await self.pull()
                return
            except grpc.aio.AioRpcError as exc:
                if await asyncio.to_thread(self.store.versions):
                    log.warning("leader unreachable (%s); serving the versions copied before", exc.code().name)
                    await self.service.refresh()
                    return
                log.warning("waiting for the rules leader: %s %s", exc.code().name, exc.details())
            await asyncio.sleep(retry_seconds)


class FollowerServicer(RulesServicer):
    """RulesServicer that forwards the calls on single state to the leader."""

    def __init__(self, service: RulesService, game: GameService, mirror: LeaderMirror) -> None:
        super().__init__(service, game)
        self.mirror = mirror
        self.leader = mirror.leader

    async def PublishProgram(
        self, request: rules_pb2.PublishProgramRequest, context: grpc.aio.ServicerContext
    ) -> rules_pb2.PublishProgramResponse:
        published: rules_pb2.PublishProgramResponse = await _forward(self.leader.PublishProgram, request, context)
        try:
            await self.mirror.pull()
        except Exception:  # published all the same: the caller hears so, the next reload copies it
            log.exception("copying the version just published failed")
        return published

    async def GetMemberProgress(
        self, request: rules_pb2.GetMemberProgressRequest, context: grpc.aio.ServicerContext
    ) -> rules_pb2.GetMemberProgressResponse:
        return await _forward(self.leader.GetMemberProgress, request, context)

    async def JoinChallenge(
        self, request: rules_pb2.JoinChallengeRequest, context: grpc.aio.ServicerContext
    ) -> rules_pb2.JoinChallengeResponse:
        return await _forward(self.leader.JoinChallenge, request, context)

    async def GetLeaderboard(
        self, request: rules_pb2.GetLeaderboardRequest, context: grpc.aio.ServicerContext
    ) -> rules_pb2.GetLeaderboardResponse:
        return await _forward(self.leader.GetLeaderboard, request, context)

    async def GetExperimentReport(
        self, request: rules_pb2.GetExperimentReportRequest, context: grpc.aio.ServicerContext
    ) -> rules_pb2.GetExperimentReportResponse:
        return await _forward(self.leader.GetExperimentReport, request, context)


async def _forward(call: Callable[..., Awaitable[R]], request: Message, context: grpc.aio.ServicerContext) -> R:
    """One call to the leader on the caller's remaining deadline and metadata (trace context,
    credentials); the leader's failure is the caller's, code, message and details alike."""
    metadata = [(k, v) for k, v in context.invocation_metadata() or () if not k.startswith((":", "grpc-"))]
    try:
        return await call(request, timeout=context.time_remaining(), metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        details = exc.details() or ""
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            details = f"rules leader: {details}"
        await context.abort(exc.code(), details, tuple(exc.trailing_metadata() or ()))
        raise  # abort raises; this keeps type checkers and readers sure nothing returns
