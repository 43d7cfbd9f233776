"""The program as channels see it: the current rules, and what a receipt would earn and why."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter

from gateway import convert as cv
from gateway import schemas as s
from gateway.deps import Caller, GatewayDep, call, scoped
from gateway.keys import ApiKey
from gateway.strict_json import StrictJsonRoute
from pointmesh.errors import purchase_field
from pointmesh.v1 import rules_pb2

router = APIRouter(prefix="/v1/program", tags=["program"], route_class=StrictJsonRoute)
RULES = "rules_svc"


@router.get("", dependencies=[scoped("program:read")], summary="The program version in effect now, as JSON")
async def get_program(gw: GatewayDep) -> dict[str, Any]:
    got = await call(RULES, gw.rules.GetProgram(rules_pb2.GetProgramRequest(program=gw.settings.program)))
    return {"program": got.version.program, "version": got.version.version, "document": json.loads(got.document_json)}


@router.post("/explain", response_model=s.Explanation,
             summary="What a receipt would earn and why, rule by rule (writes nothing)")  # fmt: skip
async def explain(
    body: s.Explain, gw: GatewayDep, caller: Caller, api_key: Annotated[ApiKey, scoped("program:read")]
) -> s.Explanation:
    request = rules_pb2.EvaluateRequest(
        program=gw.settings.program,
        basket=cv.basket_pb(body, api_key.channel, caller.store_for(body.store_id, required=False)),
        member=rules_pb2.MemberContext(tier=body.tier),
    )
    # The body is a purchase's: rules_svc's basket fields are named as recording it names them.
    return cv.explanation((await call(RULES, gw.rules.Evaluate(request), purchase_field)).evaluation)
