"""The back office: programme totals and experiment results for ops keys, and the page
(`/backoffice`) that shows them with the fraud review queue. The page is static; everything
it shows comes from these routes and the review routes with the operator's own key."""

from __future__ import annotations

from datetime import UTC
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse
from google.protobuf.json_format import MessageToDict

from gateway import schemas as s
from gateway.deps import GatewayDep, call, scoped
from gateway.strict_json import StrictJsonRoute
from pointmesh.v1 import ledger_pb2, rules_pb2

router = APIRouter(tags=["ops"], route_class=StrictJsonRoute)
PAGE = (Path(__file__).resolve().parent.parent / "static" / "backoffice.html").read_text()


@router.get("/backoffice", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE)


@router.get("/v1/ops/totals", response_model=s.OpsTotals, dependencies=[scoped("ops:read")],
            summary="The programme's books by account class")  # fmt: skip
async def totals(gw: GatewayDep) -> s.OpsTotals:
    found = await call("ledger_svc", gw.ledger.GetTotals(ledger_pb2.GetTotalsRequest()))
    return s.OpsTotals(
        as_of=found.as_of.ToDatetime(tzinfo=UTC),
        totals={t.account_class: t.points for t in found.totals},
        differences=found.differences,
        held_points=found.held_points,
        unchecked=list(found.unchecked),
    )


@router.get("/v1/ops/experiments/{experiment_id}", response_model=s.ExperimentReport,
            dependencies=[scoped("ops:read")],
            summary="An A/B experiment's results per arm against control")  # fmt: skip
async def experiment(
    gw: GatewayDep,
    # Exactly the names a program may give an experiment (rules_svc/program.py NAME_RE, as
    # schemas.Name): 1..64 of letters, digits and `_.:-` in any position, `_double-vs-base` too.
    experiment_id: Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_.:\-]{1,64}$")],
) -> s.ExperimentReport:
    found = await call("rules_svc", gw.rules.GetExperimentReport(
        rules_pb2.GetExperimentReportRequest(program=gw.settings.program, experiment_id=experiment_id)))  # fmt: skip
    return s.ExperimentReport.model_validate(
        MessageToDict(found, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    )
