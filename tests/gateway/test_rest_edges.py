"""REST semantics at the edges of what a client may send or be told: bodies too large to read,
bodies that are not JSON, a 405's Allow, a date-time that is a number, and problems that name
the REST field (not the ledger's proto path) and no internal address or namespace."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from gateway.routes.legacy import MAX_UPLOAD_BYTES
from tests.gateway.conftest import GatewayUnderTest
from tests.gateway.test_api import enrol, idem, problem, purchase_body
from tests.gateway.test_edges import explain_body, fields_of

MAX_BODY_BYTES = 1024 * 1024  # gateway/app.py
CHUNK = 64 * 1024


async def _exchange(gw: GatewayUnderTest, head: bytes, chunks: list[bytes]) -> tuple[bytes, dict[str, str], bytes]:
    """Sends a request head and the given chunked-body chunks without ending the body, and
    returns the answer's status line, headers and body (a status line of b"" if none came
    within 5 s: the gateway is still waiting for the rest)."""
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))

    async def send() -> None:
        with contextlib.suppress(ConnectionError):  # the gateway may answer and close meanwhile
            for chunk in chunks:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()

    try:
        writer.write(head)
        sending = asyncio.ensure_future(send())
        try:
            head_in = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        except TimeoutError:
            return b"", {}, b""
        finally:
            sending.cancel()
        status, *lines = head_in.decode("latin-1").strip().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), timeout=5)
        return status.encode(), headers, body
    finally:
        writer.close()


def _problem_of(status: bytes, headers: dict[str, str], body: bytes, code: int) -> dict[str, Any]:
    assert status.startswith(b"HTTP/1.1 %d" % code), (status, body[:300])
    assert headers["content-type"].startswith("application/problem+json")
    out: dict[str, Any] = json.loads(body)
    assert out["status"] == code and out["type"] == "https://pointmesh.dev/problems/request-too-large"
    return out


async def test_a_declared_body_past_the_limit_is_413_before_any_of_it_is_read(gw: GatewayUnderTest) -> None:
    """Anonymous, announcing 10 GB and sending one byte: answered at once, not after the body
    (nor after 1 MiB of it). A client that sends all of a large body still reads the 413."""
    for path in ("/v1/members", "/v1/redemptions"):
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: 10000000000\r\n\r\n{{"
        ).encode()
        status, headers, body = await _exchange(gw, head, [])
        refused = _problem_of(status, headers, body, 413)
        assert refused["errors"] == [{"field": "body", "detail": f"larger than {MAX_BODY_BYTES} bytes"}]
    async with gw.client("pos") as pos:
        big = {"member_id": "m_1", "points": 1, "reference": "x" * (8 * MAX_BODY_BYTES)}
        refused = problem(await pos.post("/v1/redemptions", json=big, headers=idem()), 413)
        assert refused["type"].endswith("/request-too-large") and fields_of(refused) == ["body"]
        member = await enrol(pos)  # just under the limit, in one piece: read and judged
        near = {"member_id": member, "points": 1, "reference": "x" * (MAX_BODY_BYTES - 200)}
        assert (await pos.post("/v1/redemptions", json=near, headers=idem())).status_code == 400


async def test_a_chunked_body_past_the_limit_is_413_as_it_arrives(gw: GatewayUnderTest) -> None:
    head = (
        b"POST /v1/members HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    # Exactly the limit is still read; one byte more is refused without waiting for the end.
    status, headers, body = await _exchange(gw, head, [b"x" * CHUNK] * (MAX_BODY_BYTES // CHUNK) + [b"x"])
    _problem_of(status, headers, body, 413)

    async def small() -> AsyncIterator[bytes]:
        for part in (b'{"profile": ', b'{"language": "fi"}', b"}"):
            yield part

    async with gw.client("pos") as pos:  # a chunked body under the limit is counted, not refused
        got = await pos.post("/v1/members", content=small(),
                             headers={"Content-Type": "application/json", **idem()})  # fmt: skip
        assert got.status_code == 201, got.text


async def test_an_upload_past_its_limit_is_413_before_it_is_read(gw: GatewayUnderTest) -> None:
    """The legacy upload is bounded by the middleware too, at its own 50 MiB: an announced length
    is refused before the caller is known, and the body of a caller that may upload (the route
    reads it once the key's scope is checked) is refused as it passes the limit."""
    boundary = "b0undary"
    head = (
        f"POST /v1/legacy/imports?adapter=csv HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
    ).encode()
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.csv"\r\n'
        f"Content-Type: text/csv\r\n\r\n"
    ).encode()
    for declared in (MAX_UPLOAD_BYTES + 1, 10_000_000_000):  # announced, a part of it sent
        status, headers, body = await _exchange(gw, head + b"Content-Length: %d\r\n\r\n%s" % (declared, part), [])
        refused = _problem_of(status, headers, body, 413)
        assert refused["errors"] == [{"field": "body", "detail": f"larger than {MAX_UPLOAD_BYTES} bytes"}]
    # Chunked, no length announced: refused once the limit is passed, while the sender still sends.
    chunks = [part] + [b"x" * CHUNK] * (MAX_UPLOAD_BYTES // CHUNK)
    franchise = f"Authorization: Bearer {gw.keys['franchise']}\r\n".encode()
    status, headers, body = await _exchange(gw, head + franchise + b"Transfer-Encoding: chunked\r\n\r\n", chunks)
    _problem_of(status, headers, body, 413)
    # Past the 1 MiB of other requests but within its own limit: its anonymous sender refused.
    async with gw.client() as anonymous:
        data = b"x" * (2 * MAX_BODY_BYTES)
        got = await anonymous.post("/v1/legacy/imports", files={"file": ("x.csv", data, "text/csv")})
        assert problem(got, 401)["type"].endswith("/unauthenticated")


async def test_a_405_names_the_allowed_methods(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        got = await pos.get("/v1/redemptions")
        assert problem(got, 405)["type"].endswith("/method-not-allowed")
        assert got.headers["Allow"] == "POST"


async def test_any_body_that_is_not_json_is_invalid_request_naming_the_body(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        for raw, reason in [
            (b'{"member_id": "' + member.encode() + b'", "points": }', "Expecting value at character"),
            (b'{"member_id": "\xff\xfe", "points": 1}', "can't decode byte 0xff"),
            (b"[" * 100_000 + b"]" * 100_000, "recursion"),
        ]:
            got = await pos.post("/v1/redemptions", content=raw,
                                 headers={"Content-Type": "application/json", **idem()})  # fmt: skip
            body = problem(got, 400)
            assert body["type"].endswith("/invalid-request") and fields_of(body) == ["body"], body
            assert reason in body["errors"][0]["detail"] and body["detail"].startswith("body: not valid JSON"), body


async def test_a_503_names_the_service_not_its_address(gw: GatewayUnderTest) -> None:
    ledger_port = gw.settings.ledger_addr.rsplit(":", 1)[1]
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        await gw.mesh.stop_rules()
        got = await pos.post("/v1/program/explain", json=explain_body(gw.mesh.clock.now().isoformat()))
        assert problem(got, 503)["detail"] == "the rules engine is unavailable; retry shortly"
        assert got.headers["Retry-After"] == "1"
        await gw.mesh.ledger.app.stop(grace=0.1)
        for got in (
            await pos.get(f"/v1/members/{member}/balance"),
            await pos.post("/v1/purchases", json=purchase_body(gw, member, "D-1", 100), headers=idem()),
        ):
            body = problem(got, 503)
            assert body["detail"] == "the points ledger is unavailable; retry shortly", body
            assert "127.0.0.1" not in got.text and ledger_port not in got.text
            assert got.headers["Retry-After"] == "1" and body["type"].endswith("/service-unavailable")


async def test_a_bad_page_token_names_the_query_parameter(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        body = problem(await pos.get(f"/v1/members/{member}/history", params={"page_token": "garbage"}), 400)
        assert body["errors"] == [{"field": "page_token", "detail": "is not a token this API returned"}]
        assert body["detail"] == "page_token: is not a token this API returned"


async def test_a_conflict_names_the_header_or_the_receipt_not_the_namespace(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        await pos.post("/v1/purchases", json=purchase_body(gw, member, "C-1", 5000), headers=idem())
        key = idem()
        assert (
            await pos.post("/v1/redemptions", json={"member_id": member, "points": 5}, headers=key)
        ).status_code == 201
        clash = await pos.post("/v1/redemptions", json={"member_id": member, "points": 6}, headers=key)
        body = problem(clash, 409)
        said = f"{key['Idempotency-Key']!r} was already used for a different Redeem request"
        assert body["errors"] == [{"field": "Idempotency-Key", "detail": said}]
        assert body["detail"].startswith(f"Idempotency-Key: {said}. ") and "same request body" in body["detail"]
        assert "namespace" not in clash.text and "pos:" not in clash.text and "idempotency_key" not in clash.text
        assert body["original_operation"] == "Redeem"
        # The same receipt with another body and a fresh key: the receipt is at fault.
        again = await pos.post("/v1/purchases", json=purchase_body(gw, member, "C-1", 4000), headers=idem())
        body = problem(again, 409)
        assert fields_of(body) == ["receipt_id"] and "purchase:" not in again.text, body


async def test_a_number_is_not_a_date_time(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        for when in (1767600000, 1767600000.5, "1767600000", "2026-01-05T10:00:00+0200", "2026-01-05"):
            body = purchase_body(gw, member, "TS-1", 1000, receipt_time=when)
            refused = problem(await pos.post("/v1/purchases", json=body, headers=idem()), 400)
            assert fields_of(refused) == ["body.receipt_time"] and "RFC 3339" in refused["detail"], (when, refused)
            refused = problem(
                await pos.post("/v1/program/explain", json={**explain_body("x"), "receipt_time": when}), 400
            )
            assert fields_of(refused) == ["body.receipt_time"], (when, refused)
            redeem = {"member_id": member, "points": 1, "context": {"contact_changed_at": when}}
            refused = problem(await pos.post("/v1/redemptions", json=redeem, headers=idem()), 400)
            assert fields_of(refused) == ["body.context.contact_changed_at"], (when, refused)
        for when in ("2026-01-05T10:00:00Z", "2026-01-05T10:00:00.250+02:00"):
            got = await pos.post("/v1/program/explain", json=explain_body(when))
            assert got.status_code == 200, (when, got.text)
        assert (await pos.get(f"/v1/members/{member}/balance")).json()["balance_points"] == 0


async def test_a_date_time_may_have_a_space_for_its_t_but_must_have_seconds(gw: GatewayUnderTest) -> None:
    """RFC 3339 section 5.6 lets a space stand for the "T"; it never lets the seconds go."""
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        spaced = gw.mesh.clock.now().isoformat(sep=" ", timespec="seconds")
        got = await pos.post("/v1/purchases", json=purchase_body(gw, member, "SP-1", 1000, receipt_time=spaced),
                             headers=idem())  # fmt: skip
        assert got.status_code == 201, (spaced, got.text)
        for when in ("2026-01-05 08:00:00Z", "2026-01-05 08:00:00.5+02:00"):
            got = await pos.post("/v1/program/explain", json=explain_body(when))
            assert got.status_code == 200, (when, got.text)
        for when in ("2026-01-05T08:00Z", "2026-01-05 08:00+02:00"):
            refused = problem(await pos.post("/v1/program/explain", json=explain_body(when)), 400)
            assert fields_of(refused) == ["body.receipt_time"], (when, refused)
            assert "RFC 3339" in refused["detail"] and "seconds are required" in refused["detail"], (when, refused)


async def test_the_progress_of_a_member_that_does_not_exist_is_404_as_on_every_member_route(
    gw: GatewayUnderTest,
) -> None:
    missing = "m_0123456789abcdef0123456789ab"  # well-formed, never issued
    async with gw.client("pos") as pos:
        member = await enrol(pos)
        assert (await pos.get(f"/v1/members/{member}/progress")).status_code == 200
        for route in ("", "/balance", "/progress"):
            assert problem(await pos.get(f"/v1/members/{missing}{route}"), 404)["type"].endswith("/not-found")
