"""The served OpenAPI document says what the gateway really answers: an answer a route documents
itself is not overwritten with the Problem schema, and 413 and 429 are listed where they can
happen. Each real answer below is validated against the operation's documented schema."""

from __future__ import annotations

import json
from typing import Any

import httpx
from jsonschema import Draft202012Validator

from gateway.legacy.webhook import sign
from tests.conftest import stop_ledger
from tests.gateway.conftest import GatewayUnderTest
from tests.gateway.test_api import idem


async def documented(gw: GatewayUnderTest) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=gw.url) as anonymous:
        doc: dict[str, Any] = (await anonymous.get("/openapi.json")).json()
    return doc


def assert_documented(doc: dict[str, Any], path: str, method: str, response: httpx.Response) -> None:
    """`response` is one the document lists for the operation, by status, media type and schema."""
    answers = doc["paths"][path][method]["responses"]
    assert str(response.status_code) in answers, f"{method.upper()} {path}: {response.status_code} is undocumented"
    media_type = response.headers["content-type"].split(";")[0]
    content = answers[str(response.status_code)]["content"]
    assert media_type in content, f"{response.status_code} is documented as {list(content)}, sent as {media_type}"
    schema = {**content[media_type]["schema"], "components": doc["components"]}
    Draft202012Validator(schema).validate(response.json())


async def test_a_webhook_s_quarantine_report_is_documented_as_the_report_it_is(gw: GatewayUnderTest) -> None:
    doc = await documented(gw)
    body = json.dumps({
        "type": "purchase", "id": "evt-1", "card_number": "4000-0001", "receipt_id": "W-1",
        "time": gw.mesh.clock.now().isoformat(), "currency": "EUR",
        "lines": [{"sku": "S", "category": "misc", "quantity": 1, "amount": 20}],  # a number, not a string
    }).encode()  # fmt: skip
    stamp = str(int(gw.mesh.clock.now().timestamp()))
    headers = {"X-Signature": sign(gw.settings.webhook_secret.encode(), body, timestamp=stamp),
               "X-Signature-Timestamp": stamp, "Content-Type": "application/json"}  # fmt: skip
    async with gw.client() as vendor:
        refused = await vendor.post("/v1/legacy/webhooks/acme", content=body, headers=headers)
    assert refused.status_code == 422 and refused.json()["quarantined"][0]["field"] == "$.lines[0].amount"
    assert_documented(doc, "/v1/legacy/webhooks/{vendor}", "post", refused)
    for status in ("200", "202"):
        content = doc["paths"]["/v1/legacy/webhooks/{vendor}"]["post"]["responses"][status]["content"]
        assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/ImportReport"}


async def test_readiness_keeps_its_own_503_and_problems_stay_problems(gw: GatewayUnderTest) -> None:
    doc = await documented(gw)
    async with gw.client("reader") as reader:
        assert_documented(doc, "/v1/members/{member_id}", "get", await reader.get("/v1/members/m_nobody"))
    await stop_ledger(gw.mesh.ledger)
    async with gw.client() as anonymous:
        not_ready = await anonymous.get("/readyz")
    assert not_ready.status_code == 503
    assert_documented(doc, "/readyz", "get", not_ready)


async def test_413_is_documented_where_a_body_can_be_too_large_and_429_where_a_service_is_called(
    gw: GatewayUnderTest,
) -> None:
    doc = await documented(gw)
    async with gw.client("pos") as pos:
        too_large = await pos.post("/v1/purchases", content=b"{" + b" " * (1024 * 1024) + b"}",
                                   headers={**idem(), "Content-Type": "application/json"})  # fmt: skip
    assert too_large.status_code == 413
    assert_documented(doc, "/v1/purchases", "post", too_large)
    paths = doc["paths"]
    assert "413" in paths["/v1/legacy/imports"]["post"]["responses"]
    # The webhook refuses a large body with 400 (field body), as docs/legacy.md says: never a 413.
    assert "413" not in paths["/v1/legacy/webhooks/{vendor}"]["post"]["responses"]
    # Any method's body is bounded, a GET's too: refused 413, which its operation lists.
    async with gw.client("reader") as reader:
        get_too_large = await reader.request("GET", "/v1/members/m_0a1b2c3d4e5f60718293a4b5c6d7",
                                             content=b" " * (1024 * 1024 + 1))  # fmt: skip
    assert_documented(doc, "/v1/members/{member_id}", "get", get_too_large)
    for path, method in [("/v1/members/{member_id}", "get"), ("/v1/purchases", "post"), ("/v1/challenges", "get"),
                         ("/v1/ops/reviews", "get"), ("/v1/program/explain", "post")]:  # fmt: skip
        assert paths[path][method]["responses"]["429"]["content"]["application/problem+json"]
    assert "429" not in paths["/healthz"]["get"]["responses"]
    assert "429" not in paths["/v1/legacy/imports"]["post"]["responses"]  # an import stopped by it is a 503
