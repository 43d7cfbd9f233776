"""Fraud review through the gateway: a redemption held for review answers 202 with its hold,
the fraud desk lists, approves and rejects, and the POS can neither see nor decide reviews.

fraud_svc is not running here, so every screening is unscored and the configured policy
decides: redemptions of at least 2,000 points are held (fail closed), smaller ones paid.
(tests/screening/ covers real model verdicts.)"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from pointmesh.clock import ManualClock
from pointmesh.redis_server import RedisServer, free_port
from tests.conftest import start_ledger, start_rules, stop_ledger, stop_rules
from tests.gateway.conftest import GatewayUnderTest, start_gateway
from tests.gateway.test_api import enrol, idem, problem, purchase_body
from tests.gateway.test_auth_and_live import member_token, next_message
from tests.mesh.conftest import PROGRAM, START, Mesh


@pytest.fixture
async def screened_gw(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[GatewayUnderTest]:
    clock = ManualClock(START)
    port = free_port()
    rules = await start_rules(tmp_path / "rules", clock, rules_addr=f"127.0.0.1:{port}", rules_seed_file=str(PROGRAM))
    ledger = await start_ledger(
        tmp_path / "ledger", redis_server.url, clock, rules_addr=f"127.0.0.1:{port}", program="meshmart",
        fraud_screening=True, fraud_addr=f"127.0.0.1:{free_port()}", fraud_deadline_seconds=0.2,
        fraud_large_redemption_points=2_000,
    )  # fmt: skip
    running = await start_gateway(tmp_path / "gateway", Mesh(rules, ledger, clock, port, tmp_path), redis_server.url)
    yield running
    running.uvicorn.should_exit = True
    await running.task
    await stop_ledger(ledger)
    await stop_rules(rules)


async def funded_member(gw: GatewayUnderTest, client: httpx.AsyncClient, receipt: str) -> str:
    """A new member with the points of a 9,000.00 EUR purchase (enough for a held redemption)."""
    member = await enrol(client)
    bought = await client.post("/v1/purchases", json=purchase_body(gw, member, receipt, 900_000), headers=idem())
    assert bought.status_code == 201, bought.text
    return member


async def held_redemption(client: httpx.AsyncClient, member: str, points: int = 3_000) -> dict[str, Any]:
    """A redemption fraud screening holds for review (202), as answered."""
    held = await client.post("/v1/redemptions", json={"member_id": member, "points": points}, headers=idem())
    assert held.status_code == 202, held.text
    answer: dict[str, Any] = held.json()
    return answer


async def test_held_redemptions_are_approved_or_rejected_by_the_fraud_desk(screened_gw: GatewayUnderTest) -> None:
    gw = screened_gw
    async with gw.client("pos") as pos, gw.client("fraud_desk") as desk, gw.client("ops") as viewer:
        member = await enrol(pos)
        bought = await pos.post("/v1/purchases", json=purchase_body(gw, member, "R-1", 900_000), headers=idem())
        assert bought.status_code == 201 and bought.json()["screening"]["scored"] is False
        assert bought.json()["screening"]["reasons"] == ["unscored:fraud_svc_unavailable:allow"]
        start = (await pos.get(f"/v1/members/{member}/balance")).json()
        assert start["available_points"] >= 9_000

        small = await pos.post("/v1/redemptions", json={"member_id": member, "points": 500}, headers=idem())
        assert small.status_code == 201 and small.json()["status"] == "PAID" and small.json()["transaction_id"]
        ato = {"member_id": member, "points": 3_000, "context": {"device_id": "new-phone", "ip": "203.0.113.9"}}
        held = await pos.post("/v1/redemptions", json=ato, headers=idem())
        assert held.status_code == 202, held.text
        body = held.json()
        assert body["status"] == "HELD_FOR_REVIEW" and body["transaction_id"] == ""
        assert body["hold"]["points"] == 3_000 and body["hold"]["status"] == "PLACED"
        review_id = body["screening"]["review_id"]
        gw.mesh.clock.advance(timedelta(seconds=1))  # the queue is oldest first
        second = (await pos.post("/v1/redemptions", json={**ato, "points": 2_500}, headers=idem())).json()
        during = (await pos.get(f"/v1/members/{member}/balance")).json()
        assert during["reserved_points"] == 5_500 and during["available_points"] == start["available_points"] - 6_000

        problem(await pos.get("/v1/ops/reviews"), 403)
        problem(await viewer.post(f"/v1/ops/reviews/{review_id}/approve", json={}, headers=idem()), 403)
        listed = (await viewer.get("/v1/ops/reviews", params={"member_id": member})).json()
        assert [r["review_id"] for r in listed["reviews"]] == [review_id, second["screening"]["review_id"]]
        assert listed["reviews"][0]["kind"] == "REDEMPTION" and listed["reviews"][0]["status"] == "OPEN"

        approved = await desk.post(f"/v1/ops/reviews/{review_id}/approve", json={"note": "called the member"},
                                   headers=idem())  # fmt: skip
        assert approved.status_code == 200, approved.text
        decided = approved.json()
        assert decided["status"] == "APPROVED" and decided["note"] == "called the member"
        assert decided["decided_by"] and len(decided["outcome_transaction_ids"]) == 1
        # The note is optional: no body at all is a decision without one.
        rejected = await desk.post(f"/v1/ops/reviews/{second['screening']['review_id']}/reject", headers=idem())
        assert rejected.json()["status"] == "REJECTED"
        after = (await pos.get(f"/v1/members/{member}/balance")).json()
        assert after["reserved_points"] == 0
        assert after["balance_points"] == start["balance_points"] - 500 - 3_000
        again = problem(await desk.post(f"/v1/ops/reviews/{review_id}/reject", json={}, headers=idem()), 422)
        assert "already approved" in again["detail"]
        problem(await desk.post("/v1/ops/reviews/rv_nope/approve", json={}, headers=idem()), 400)
        naive = f"2026-01-01T00:00:00|{review_id}"  # a hand-made token without a UTC offset
        refused = problem(await viewer.get("/v1/ops/reviews", params={"page_token": naive}), 400)
        assert [e["field"] for e in refused["errors"]] == ["page_token"]
        assert (await viewer.get("/v1/ops/reviews", params={"member_id": member})).json()["reviews"] == []
        done = (await viewer.get("/v1/ops/reviews", params={"member_id": member, "status": "APPROVED"})).json()
        assert [r["review_id"] for r in done["reviews"]] == [review_id]


async def test_a_hold_is_screened_like_the_redemption_it_becomes(screened_gw: GatewayUnderTest) -> None:
    """Hold then capture spends points too: a large hold goes to review (fraud_svc is down
    here, so the fail-closed policy sends it), the POS cannot capture it, approval does."""
    gw = screened_gw
    async with gw.client("pos") as pos, gw.client("fraud_desk") as desk:
        member = await enrol(pos)
        await pos.post("/v1/purchases", json=purchase_body(gw, member, "H-1", 900_000), headers=idem())
        small = await pos.post("/v1/holds", json={"member_id": member, "points": 500}, headers=idem())
        assert small.status_code == 201 and small.json()["screening"]["scored"] is False
        ato = {"member_id": member, "points": 3_000, "context": {"device_id": "new-phone", "ip": "203.0.113.9"}}
        held = await pos.post("/v1/holds", json=ato, headers=idem())
        assert held.status_code == 202, held.text
        hold, review_id = held.json()["hold_id"], held.json()["screening"]["review_id"]
        assert held.json()["status"] == "PLACED" and review_id

        problem(await pos.post(f"/v1/holds/{hold}/capture", json={}, headers=idem()), 422)
        problem(await pos.post(f"/v1/holds/{hold}/void", headers=idem()), 422)
        approved = await desk.post(f"/v1/ops/reviews/{review_id}/approve", headers=idem())
        assert approved.status_code == 200, approved.text
        assert (await pos.get(f"/v1/holds/{hold}")).json()["status"] == "CAPTURED"


async def test_a_large_transfer_is_held_for_review_and_moves_once_approved(screened_gw: GatewayUnderTest) -> None:
    """fraud_svc is down, so the fail-closed policy for large spends holds the transfer: 202
    with the hold on the sender; approval moves the points, and the retried POST says so."""
    gw = screened_gw
    async with gw.client("pos") as pos, gw.client("fraud_desk") as desk:
        sender, recipient = await enrol(pos), await enrol(pos)
        await pos.post("/v1/purchases", json=purchase_body(gw, sender, "T-1", 900_000), headers=idem())
        before = (await pos.get(f"/v1/members/{recipient}/balance")).json()["balance_points"]
        body = {"source_member_id": sender, "destination_member_id": recipient, "points": 3_000,
                "context": {"device_id": "new-phone"}}  # fmt: skip
        key = idem()
        held = await pos.post("/v1/transfers", json=body, headers=key)
        assert held.status_code == 202, held.text
        assert held.json()["status"] == "HELD_FOR_REVIEW" and held.json()["debit"] is None
        assert held.json()["hold"]["points"] == 3_000 and held.json()["hold"]["member_id"] == sender
        review_id = held.json()["screening"]["review_id"]
        listed = (await desk.get("/v1/ops/reviews")).json()["reviews"]
        assert [(r["kind"], r["transfer_id"], r["counterparty_member_id"]) for r in listed if r["review_id"] == review_id] \
            == [("TRANSFER", held.json()["transfer_id"], recipient)]  # fmt: skip
        assert (await pos.get(f"/v1/members/{recipient}/balance")).json()["balance_points"] == before

        approved = await desk.post(f"/v1/ops/reviews/{review_id}/approve", headers=idem())
        assert approved.status_code == 200, approved.text
        assert (await pos.get(f"/v1/members/{recipient}/balance")).json()["balance_points"] == before + 3_000
        retried = await pos.post("/v1/transfers", json=body, headers=key)
        assert retried.status_code == 201 and retried.json()["status"] == "MOVED", retried.text
        assert retried.json()["credit"]["points"] == 3_000


async def test_a_retried_transfer_that_review_rejected_says_so_and_nothing_moved(screened_gw: GatewayUnderTest) -> None:
    gw = screened_gw
    async with gw.client("pos") as pos, gw.client("fraud_desk") as desk:
        sender, recipient = await enrol(pos), await enrol(pos)
        await pos.post("/v1/purchases", json=purchase_body(gw, sender, "T-2", 900_000), headers=idem())
        body = {"source_member_id": sender, "destination_member_id": recipient, "points": 3_000}
        key = idem()
        held = await pos.post("/v1/transfers", json=body, headers=key)
        assert held.status_code == 202, held.text
        rejected = await desk.post(f"/v1/ops/reviews/{held.json()['screening']['review_id']}/reject", headers=idem())
        assert rejected.status_code == 200, rejected.text
        retried = await pos.post("/v1/transfers", json=body, headers=key)
        assert retried.status_code == 200 and retried.json()["status"] == "REJECTED", retried.text
        assert retried.json()["hold"]["status"] == "VOIDED" and retried.json()["credit"] is None


async def test_a_retried_redemption_or_hold_says_where_its_review_left_it(screened_gw: GatewayUnderTest) -> None:
    """A till retries a redemption held for review after the fraud desk decided it (as after a
    timeout). It was answered the redemption as first held (202, hold PLACED, no transaction)
    when the hold was voided, or captured and the points spent; a retried hold likewise."""
    gw = screened_gw
    async with gw.client("pos") as pos, gw.client("fraud_desk") as desk:
        member = await funded_member(gw, pos, "R-retry")
        for approve, points in ((False, 3_000), (True, 2_500)):
            body, key = {"member_id": member, "points": points}, idem()
            held = await pos.post("/v1/redemptions", json=body, headers=key)
            assert held.status_code == 202, held.text
            review_id = held.json()["screening"]["review_id"]
            assert (await pos.post("/v1/redemptions", json=body, headers=key)).status_code == 202  # still open
            decision = "approve" if approve else "reject"
            decided = await desk.post(f"/v1/ops/reviews/{review_id}/{decision}", headers=idem())
            assert decided.status_code == 200, decided.text
            again = await pos.post("/v1/redemptions", json=body, headers=key)
            shown = again.json()
            if approve:
                assert (again.status_code, shown["status"], shown["hold"]) == (201, "PAID", None), again.text
                assert [shown["transaction_id"]] == decided.json()["outcome_transaction_ids"]
                assert shown["points"] == -points and shown["screening"]["review_id"] == review_id
            else:
                assert (again.status_code, shown["status"], shown["hold"]["status"]) == (200, "REJECTED", "VOIDED")
                assert shown["transaction_id"] == ""

        body, key = {"member_id": member, "points": 3_000}, idem()
        placed = await pos.post("/v1/holds", json=body, headers=key)
        assert placed.status_code == 202, placed.text
        approved = await desk.post(f"/v1/ops/reviews/{placed.json()['screening']['review_id']}/approve",
                                   headers=idem())  # fmt: skip
        again = await pos.post("/v1/holds", json=body, headers=key)
        assert (again.status_code, again.json()["status"]) == (200, "CAPTURED"), again.text
        # the tender the receipt the points paid for names
        assert [again.json()["transaction_id"]] == approved.json()["outcome_transaction_ids"]


async def test_a_review_note_as_long_as_the_api_documents_is_kept(screened_gw: GatewayUnderTest) -> None:
    """The API documents a decision's note as up to 500 characters; the ledger refused more than 200."""
    gw = screened_gw
    async with gw.client("pos") as pos, gw.client("fraud_desk") as desk:
        schema = (await pos.get("/openapi.json")).json()["components"]["schemas"]["ReviewDecision"]
        assert schema["properties"]["note"]["maxLength"] == 500
        member = await funded_member(gw, pos, "R-note")
        review_id = (await held_redemption(pos, member))["screening"]["review_id"]
        note = "member confirmed the new phone by call-back; " * 11
        assert 480 < len(note) <= 500
        got = await desk.post(f"/v1/ops/reviews/{review_id}/approve", json={"note": note}, headers=idem())
        assert got.status_code == 200, got.text
        assert got.json()["note"] == note
        other = (await held_redemption(pos, member))["screening"]["review_id"]
        too_long = problem(await desk.post(f"/v1/ops/reviews/{other}/reject", json={"note": note + "x" * 20},
                                           headers=idem()), 400)  # fmt: skip
        assert [e["field"] for e in too_long["errors"]] == ["body.note"]


async def test_a_members_live_stream_shows_a_review_without_the_fraud_desks_reasons_or_note(
    screened_gw: GatewayUnderTest,
) -> None:
    """REST keeps the review queue behind ops:read; the member's own stream (a member token, or a
    call-centre key with members:read) says a review is open or decided on what, and nothing the
    fraud team wrote or used to decide."""
    gw = screened_gw
    async with gw.client("pos") as pos, gw.client("fraud_desk") as desk:
        member = await enrol(pos)
        bought = await pos.post("/v1/purchases", json=purchase_body(gw, member, "R-1", 900_000), headers=idem())
        assert bought.status_code == 201, bought.text
        token = await member_token(gw, member)
        async with connect(f"{gw.ws_url}/v1/members/{member}/live?token={token}") as ws:
            assert json.loads(await ws.recv())["type"] == "subscribed"
            held = await pos.post("/v1/redemptions", json={"member_id": member, "points": 3_000,
                                                           "context": {"device_id": "new-phone"}}, headers=idem())  # fmt: skip
            assert held.status_code == 202, held.text
            review_id = held.json()["screening"]["review_id"]
            note = "suspected account takeover: SIM swap reported by the carrier"
            decided = await desk.post(f"/v1/ops/reviews/{review_id}/reject", json={"note": note}, headers=idem())
            assert decided.status_code == 200, decided.text
            opened = await next_message(ws, "review_opened", within=5)
            closed = await next_message(ws, "review_decided", within=5)
    for shown in (opened, closed):
        assert shown["details"]["review_id"] == review_id and shown["details"]["points"] == "3000", shown
        assert set(shown["details"]) <= {"review_id", "kind", "status", "points", "subject_ids", "purchase_id"}
    assert closed["details"]["status"] == "REVIEW_STATUS_REJECTED"
    assert note not in json.dumps([opened, closed])


async def test_a_hold_held_for_review_belongs_to_the_till_that_placed_it(screened_gw: GatewayUnderTest) -> None:
    """docs/gateway.md: a hold records the channel and store of the key that placed it, and
    any other key gets 403. The hold a redemption sent to review got named none, so another
    store's key read it."""
    gw = screened_gw
    async with gw.client("pos") as helsinki, gw.client("pos_lisbon") as lisbon:
        hold = (await held_redemption(helsinki, await funded_member(gw, helsinki, "RH-1")))["hold"]
        assert (hold["channel"], hold["store_id"]) == ("pos", "HEL-01"), hold
        problem(await lisbon.get(f"/v1/holds/{hold['hold_id']}"), 403)
        assert (await helsinki.get(f"/v1/holds/{hold['hold_id']}")).status_code == 200
