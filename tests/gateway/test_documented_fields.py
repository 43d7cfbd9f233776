"""What the OpenAPI document promises and which field a refusal names agree with what the
gateway does: the Idempotency-Key every write needs, text limits, the names of the fields the
caller sent (explain's basket, lookup's query), and a purchase's screening store."""

from __future__ import annotations

from typing import Any

import httpx

from tests.gateway.conftest import GatewayUnderTest
from tests.gateway.test_api import enrol, idem, problem, purchase_body


def _fields(body: dict[str, Any]) -> list[str]:
    return [e["field"] for e in body.get("errors", [])]


def _money(minor: int, currency: str) -> dict[str, Any]:
    return {"amount_minor": minor, "currency": currency}


async def _document(gw: GatewayUnderTest) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=gw.url) as anonymous:
        doc: dict[str, Any] = (await anonymous.get("/openapi.json")).json()
    return doc


async def test_every_post_documents_the_idempotency_key_it_refuses_to_run_without(gw: GatewayUnderTest) -> None:
    """Documented `required: false` on the 10 write POSTs, so a client generated from the
    document could leave it out, and every call it made was refused."""
    doc = await _document(gw)
    documented = {
        f"{method.upper()} {path}": parameter.get("required", False)
        for path, item in doc["paths"].items()
        for method, operation in item.items()
        for parameter in operation.get("parameters", [])
        if parameter["in"] == "header" and parameter["name"].lower() == "idempotency-key"
    }
    assert len(documented) >= 10 and all(documented.values()), documented
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        missing = problem(await pos.post("/v1/redemptions", json={"member_id": member, "points": 1}), 400)
        assert _fields(missing) == ["Idempotency-Key"]


async def test_texts_as_long_as_the_document_allows_are_taken_and_longer_ones_refused_by_name(
    gw: GatewayUnderTest,
) -> None:
    """The document allowed 256 characters of a reference or reason; the ledger took 200, and
    a text within the document was refused. A timeout over the ledger's maximum says it in
    seconds (it said "7 days, 0:00:00")."""
    schemas = (await _document(gw))["components"]["schemas"]
    limits = {
        (name, field): schemas[name]["properties"][field]["maxLength"]
        for name, field in (("Redeem", "reference"), ("PlaceHold", "reference"), ("Transfer", "reason"))
    }
    assert set(limits.values()) == {200}, limits
    async with gw.client("pos") as pos:
        member, other = await enrol(pos), await enrol(pos)
        bought = await pos.post("/v1/purchases", json=purchase_body(gw, member, "TXT-1", 100_000), headers=idem())
        assert bought.status_code == 201, bought.text

        def bodies(text: str) -> dict[str, tuple[str, dict[str, Any]]]:
            return {
                "reference": ("/v1/redemptions", {"member_id": member, "points": 1, "reference": text}),
                "hold reference": ("/v1/holds", {"member_id": member, "points": 1, "reference": text}),
                "reason": ("/v1/transfers", {"source_member_id": member, "destination_member_id": other,
                                             "points": 1, "reason": text}),
            }  # fmt: skip

        for what, (path, body) in bodies("r" * 200).items():
            taken = await pos.post(path, json=body, headers=idem())
            assert taken.status_code == 201, (what, taken.text)
        for what, (path, body) in bodies("r" * 201).items():
            refused = problem(await pos.post(path, json=body, headers=idem()), 400)
            assert _fields(refused) == [f"body.{what.split()[-1]}"], (what, refused)
        too_long = problem(await pos.post("/v1/holds", json={"member_id": member, "points": 1,
                                                             "timeout_seconds": 8 * 86400}, headers=idem()), 400)  # fmt: skip
        assert _fields(too_long) == ["timeout_seconds"]
        assert "between 1 and 604800 seconds" in too_long["detail"], too_long


async def test_explain_names_the_fields_the_caller_sent_as_recording_the_same_receipt_does(
    gw: GatewayUnderTest,
) -> None:
    """Explain passed on rules_svc's own names (`basket.currency`, `basket.total_minor`) where
    recording the same receipt names the body's (`total.currency`, `total.amount_minor`)."""
    now = gw.mesh.clock.now().isoformat()

    def basket(total: dict[str, Any], line: dict[str, Any], when: str = now) -> dict[str, Any]:
        return {"total": total, "lines": [{"sku": "a", "quantity": 1, "amount": line}], "receipt_time": when}

    cases = [
        (basket(_money(1000, "ABC"), _money(1000, "ABC")), 400, "total.currency"),
        (basket(_money(5, "EUR"), _money(1000, "EUR")), 400, "total.amount_minor"),
        (basket(_money(1000, "EUR"), _money(1000, "USD")), 400, "lines[0].amount.currency"),
        (basket(_money(1000, "EUR"), _money(1000, "EUR"), "1900-01-01T00:00:00Z"), 422, "receipt_time"),
    ]
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        for n, (body, status, field) in enumerate(cases):
            recorded = problem(await pos.post("/v1/purchases", json={**body, "member_id": member,
                                                                     "receipt_id": f"EX-{n}"}, headers=idem()), status)  # fmt: skip
            assert _fields(recorded) == [field], recorded
            explained = problem(await pos.post("/v1/program/explain", json=body), status)
            assert _fields(explained) == [field], explained
            assert explained["detail"].startswith(f"{field}: "), explained


async def test_a_lookup_refused_by_the_ledger_names_the_query_parameter_sent(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        bad_kind = problem(await pos.get("/v1/members/lookup", params={"kind": "loyalty card", "value": "1"}), 400)
        assert _fields(bad_kind) == ["kind"], bad_kind
        blank = problem(await pos.get("/v1/members/lookup", params={"kind": "card", "value": " "}), 400)
        assert _fields(blank) == ["value"], blank


async def test_a_purchase_is_screened_at_its_own_store_only(gw: GatewayUnderTest) -> None:
    """The pos key is bound to HEL-01. A purchase whose context named LIS-01 was recorded, the
    context's store silently replaced; the same context on a redemption is refused (403)."""
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        bought = await pos.post("/v1/purchases", json=purchase_body(gw, member, "CTX-1", 5000), headers=idem())
        assert bought.status_code == 201, bought.text
        spend = await pos.post("/v1/redemptions", json={"member_id": member, "points": 1,
                                                        "context": {"store_id": "LIS-01"}}, headers=idem())  # fmt: skip
        problem(spend, 403)
        elsewhere = purchase_body(gw, member, "CTX-2", 5000, context={"store_id": "LIS-01"})
        problem(await pos.post("/v1/purchases", json=elsewhere, headers=idem()), 403)
        here = purchase_body(gw, member, "CTX-3", 5000, context={"store_id": "HEL-01", "device_id": "till-7"})
        assert (await pos.post("/v1/purchases", json=here, headers=idem())).status_code == 201


async def test_a_captured_hold_names_its_transaction_so_the_receipt_can_name_it_as_tender(gw: GatewayUnderTest) -> None:
    """Paying with points through a hold: the capture's answer named no transaction, so a till
    could not name it as the receipt's tender, and a return never gave the points back."""
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        await pos.post("/v1/purchases", json=purchase_body(gw, member, "T-0", 5000), headers=idem())
        hold = (await pos.post("/v1/holds", json={"member_id": member, "points": 100}, headers=idem())).json()
        captured = await pos.post(f"/v1/holds/{hold['hold_id']}/capture", json={"points": 0}, headers=idem())
        assert captured.status_code == 200, captured.text
        tender = captured.json()["transaction_id"]
        assert tender.startswith("tx_"), captured.json()
        bought = await pos.post(
            "/v1/purchases", json=purchase_body(gw, member, "T-1", 4000, tender_transaction_id=tender), headers=idem()
        )
        assert bought.status_code == 201, bought.text
        back = await pos.post(f"/v1/purchases/{bought.json()['purchase_id']}/returns",
                              json={"lines": [{"line_index": 0, "quantity": 1}]}, headers=idem())  # fmt: skip
        assert back.json()["tender_recredited_points"] == 100
