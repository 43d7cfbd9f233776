"""A caller that may not use a route hears 403 before anything else it sent is judged
(docs/gateway.md): every route checks its scope in a dependency, which FastAPI runs before it
validates the body, path and query, and the legacy upload reads its multipart body only after
that, where FastAPI would read a form parameter (up to 50 MiB, to disk) before any dependency."""

from __future__ import annotations

from typing import Any

from tests.gateway.conftest import GatewayUnderTest
from tests.gateway.test_api import enrol, problem
from tests.gateway.test_rest_edges import _exchange

TOO_LONG_ID = "x" * 100  # schemas.MAX_ID_LENGTH is 64
# Bodies, paths and queries each wrong in a way a caller allowed to call would hear as 400.
BAD_POSTS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/redemptions/quote", {"json": {}}),
    ("/v1/program/explain", {"json": {"total": "ten euros"}}),
    ("/v1/legacy/imports", {"data": {"not_a_file": "1"}}),
    ("/v1/legacy/imports?adapter=nope", {"files": {"file": ("x.csv", b"", "text/csv")}}),
    (f"/v1/members/{TOO_LONG_ID}/tokens", {}),
    ("/v1/purchases", {"json": {}}),
]
# (path, the key that lacks its scope)
BAD_GETS = [
    ("/v1/ops/reviews?status=NOPE", "reader"),
    ("/v1/ops/experiments/not%20an%20id", "reader"),
    ("/v1/challenges/c1/leaderboard?limit=0", "reader"),
    (f"/v1/holds/{TOO_LONG_ID}", "reader"),
    ("/v1/members/lookup?kind=&value=", "ops"),
    (f"/v1/purchases/{TOO_LONG_ID}", "ops"),
    ("/v1/members/m_1/history?page_size=9999", "ops"),
    (f"/v1/members/{TOO_LONG_ID}/progress", "ops"),
]


async def test_a_caller_without_the_scope_is_403_whatever_body_it_sent(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos, gw.client("reader") as reader, gw.client("ops") as ops:
        member = await enrol(pos)
        token = (await pos.post(f"/v1/members/{member}/tokens")).json()["token"]
        async with gw.client(token=token) as own:
            answers = [
                (who, path, (await client.post(path, **sent)).status_code)
                for who, client in (("reader key", reader), ("ops key", ops), ("member token", own))
                for path, sent in BAD_POSTS
            ]
            assert [answer for answer in answers if answer[2] != 403] == []
            # Keys without members:write may not opt a member in, whatever they send.
            for client in (reader, ops):
                problem(await client.post("/v1/challenges/c1/join", json={}), 403)
            # A member token may join its own member, so its body is read to see which.
            assert problem(await own.post("/v1/challenges/c1/join", json={}), 400)["errors"][0]["field"] == (
                "body.member_id"
            )
            problem(await own.post("/v1/challenges/c1/join", json={"member_id": "m_someone_else"}), 403)


async def test_a_caller_without_the_scope_is_403_whatever_path_or_query_it_sent(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos, gw.client("reader") as reader, gw.client("ops") as ops:
        clients = {"reader": reader, "ops": ops}
        answers = [(path, (await clients[who].get(path)).status_code) for path, who in BAD_GETS]
        assert [answer for answer in answers if answer[1] != 403] == []
        member, other = await enrol(pos), await enrol(pos)
        token = (await pos.post(f"/v1/members/{member}/tokens")).json()["token"]
        async with gw.client(token=token) as own:  # a member token reads only its own member
            problem(await own.get(f"/v1/members/{other}/history?page_size=9999"), 403)
            problem(await own.get(f"/v1/members/{member}/history?page_size=9999"), 400)


async def test_an_upload_by_a_key_without_legacy_write_is_403_before_its_body_is_read(gw: GatewayUnderTest) -> None:
    """Announcing 40 MiB (within the upload's 50 MiB) and sending only the part's head: answered at
    once. Before, the gateway waited for the whole body, spooled it to disk, then refused."""
    boundary = "b0undary"
    head = (
        f"POST /v1/legacy/imports?adapter=csv HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gw.keys['pos']}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {40 * 1024 * 1024}\r\n\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.csv"\r\n'
        f"Content-Type: text/csv\r\n\r\n"
    ).encode()
    status, _, body = await _exchange(gw, head, [])
    assert status.startswith(b"HTTP/1.1 403"), (status, body[:300])
    assert b"lacks scope legacy:write" in body
    # A client that sends all of a large body reads the 403 too, and the key that may upload still can.
    async with gw.client("pos") as pos, gw.client("franchise") as franchise:
        big = {"file": ("x.csv", b"x" * (8 * 1024 * 1024), "text/csv")}
        assert "legacy:write" in problem(await pos.post("/v1/legacy/imports", files=big), 403)["detail"]
        empty = await franchise.post("/v1/legacy/imports", files={"file": ("x.csv", b"", "text/csv")})
        assert empty.status_code == 200, empty.text
        assert problem(await franchise.post("/v1/legacy/imports", data={"x": "1"}), 400)["errors"][0]["field"] == (
            "body.file"
        )
