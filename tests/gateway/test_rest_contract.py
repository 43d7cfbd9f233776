"""REST contract: a problem type keeps one title (RFC 9457), a history page_token is good only
for the listing that returned it, and a JSON body naming a member twice is refused."""

from __future__ import annotations

import importlib
import pkgutil

from fastapi.routing import APIRoute

from gateway import routes
from gateway.strict_json import StrictJsonRoute
from tests.gateway.conftest import GatewayUnderTest
from tests.gateway.test_api import enrol, idem, problem, purchase_body


async def test_one_problem_type_has_one_title(gw: GatewayUnderTest) -> None:
    """RFC 9457 3.1.3: a problem type's title "SHOULD NOT change from occurrence to occurrence".
    A client showing `title` for not-found gets two spellings of one problem."""
    async with gw.client("pos") as pos:
        no_route = problem(await pos.get("/v1/no-such-route"), 404)
        no_member = problem(await pos.get("/v1/members/m_0a1b2c3d4e5f60718293a4b5c6d7"), 404)
        assert no_route["type"] == no_member["type"] == "https://pointmesh.dev/problems/not-found"
        assert no_route["title"] == no_member["title"], (no_route["title"], no_member["title"])


async def test_a_history_page_token_of_another_member_is_refused_naming_it(gw: GatewayUnderTest) -> None:
    """A token from member A's history, sent for member B, pages B's history from A's position:
    B's newer entries are silently left out (or the page is empty), where the token should be
    refused as one this listing did not return (400 naming page_token)."""
    async with gw.client("pos") as pos:
        alice, bob = await enrol(pos), await enrol(pos)
        for member, receipt in ((alice, "A-1"), (alice, "A-2"), (bob, "B-1"), (bob, "B-2")):
            got = await pos.post("/v1/purchases", json=purchase_body(gw, member, receipt, 1000), headers=idem())
            assert got.status_code == 201, got.text
        everything = (await pos.get(f"/v1/members/{bob}/history")).json()["entries"]
        first = (await pos.get(f"/v1/members/{alice}/history", params={"page_size": 1})).json()
        assert first["next_page_token"]
        foreign = await pos.get(f"/v1/members/{bob}/history", params={"page_token": first["next_page_token"]})
        shown = [e["entry_id"] for e in foreign.json().get("entries", [])] if foreign.status_code == 200 else []
        assert foreign.status_code == 400, (
            f"bob has {len(everything)} entries; alice's token showed {len(shown)} of them: {foreign.text[:300]}"
        )
        assert problem(foreign, 400)["errors"][0]["field"] == "page_token"


async def test_a_body_naming_a_field_twice_is_refused_not_read_as_its_last_value(gw: GatewayUnderTest) -> None:
    """`{"points": 1, "points": 1000}`: parsers disagree on which one counts (RFC 8259 4; I-JSON,
    RFC 7493, forbids it), so a proxy, WAF or till log that reads the first sees 1 point spent
    while the ledger spends 1,000. Ambiguous input is a 400 naming the member, nothing written."""
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        got = await pos.post("/v1/purchases", json=purchase_body(gw, member, "DUP-1", 5000), headers=idem())
        assert got.status_code == 201, got.text
        before = (await pos.get(f"/v1/members/{member}/balance")).json()["available_points"]
        raw = b'{"member_id": "%s", "points": 1, "points": 100}' % member.encode()
        spent = await pos.post("/v1/redemptions", content=raw,
                               headers={**idem(), "Content-Type": "application/json"})  # fmt: skip
        after = (await pos.get(f"/v1/members/{member}/balance")).json()["available_points"]
        assert spent.status_code == 400, f"{spent.status_code}: spent {before - after} points: {spent.text[:200]}"
        refused = problem(spent, 400)
        assert refused["errors"][0]["field"] == "body"
        assert "'points' more than once" in refused["detail"], refused
        assert after == before


def test_every_router_parses_bodies_refusing_repeated_members() -> None:
    """The check lives in each router's route class; a router declared without it would read
    repeated members as their last value again."""
    modules = [importlib.import_module(f"gateway.routes.{m.name}") for m in pkgutil.iter_modules(routes.__path__)]
    found = [
        (m.__name__, r) for m in modules if hasattr(m, "router") for r in m.router.routes if isinstance(r, APIRoute)
    ]
    assert len({name for name, _ in found}) >= 9  # every router but the websockets one
    assert [(name, r.path) for name, r in found if not isinstance(r, StrictJsonRoute)] == []
