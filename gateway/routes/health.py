"""Liveness (the process answers) and readiness (its dependencies answer)."""

from __future__ import annotations

import asyncio

import grpc
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import schemas as s
from gateway.deps import GatewayDep
from gateway.strict_json import StrictJsonRoute

router = APIRouter(tags=["health"], route_class=StrictJsonRoute)


@router.get("/healthz", response_model=s.Health, summary="Liveness")
async def healthz() -> s.Health:
    return s.Health(status="ok")


async def _grpc_health(target: str) -> str:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.aio.AioRpcError as error:
            return str(error.code().name)
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return name


@router.get("/readyz", response_model=s.Health, responses={503: {"model": s.Health}}, summary="Readiness")
async def readyz(gw: GatewayDep) -> JSONResponse:
    ledger, rules = await asyncio.gather(_grpc_health(gw.settings.ledger_addr), _grpc_health(gw.settings.rules_addr))
    try:
        await gw.hub.bus.ping()
        bus = "ok"
    except Exception as exc:  # any event-bus failure means not ready
        bus = type(exc).__name__
    checks = {"ledger": ledger, "rules": rules, gw.settings.event_bus: bus}
    ready = ledger == "SERVING" and rules == "SERVING" and bus == "ok"
    body = s.Health(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
