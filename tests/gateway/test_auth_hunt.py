"""Holes a review found in the gateway's credentials and what it stamps on commands: a member-token
secret anyone could know, a multi-store key acting for no store, text no protobuf can carry, and
a caller without the scope told about a missing header before being told it may not."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest

from gateway.app import key_store
from gateway.auth import AUDIENCE, MemberTokens, member_token_secret
from gateway.keys import KeyRequestError
from pointmesh.clock import SystemClock
from pointmesh.config import load_settings
from tests.gateway.conftest import ALL_POS, GatewayUnderTest
from tests.gateway.test_api import enrol, idem, problem, purchase_body

PUBLISHED_DEFAULT = "pointmesh-dev-member-token-secret"  # what releases before 2026-12-05 signed with


async def test_a_token_signed_with_the_old_published_default_secret_is_refused(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        victim = await enrol(pos)
    now = gw.mesh.clock.now()
    claims = {
        "sub": victim,
        "aud": AUDIENCE,
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(hours=1)).timestamp()),
    }
    forged = jwt.encode(claims, PUBLISHED_DEFAULT, algorithm="HS256")

    async with gw.client(token=forged) as thief:
        for path in (f"/v1/members/{victim}", f"/v1/members/{victim}/balance", f"/v1/members/{victim}/history"):
            problem(await thief.get(path), 401)


def test_without_a_configured_secret_one_is_generated_once_per_data_directory(tmp_path: Path) -> None:
    settings = load_settings({}, data_dir=tmp_path)
    first = member_token_secret(settings)
    again = member_token_secret(load_settings({}, data_dir=tmp_path))  # a restart, or the CLI
    elsewhere = member_token_secret(load_settings({}, data_dir=tmp_path / "other"))
    configured = member_token_secret(load_settings({}, data_dir=tmp_path, member_token_secret="s" * 40))

    assert len(first) >= 32 and first != PUBLISHED_DEFAULT
    assert again == first and elsewhere != first
    assert configured == "s" * 40
    mode = stat.S_IMODE(os.stat(tmp_path / "gateway" / "member-token.secret").st_mode)
    assert mode == 0o600


async def test_a_key_bound_to_several_stores_must_say_which_one_it_acts_for(gw: GatewayUnderTest) -> None:
    """Filed under no store, a receipt would not meet the same receipt filed under its store,
    and would earn twice."""
    secret = key_store(gw.settings).create("pos", ALL_POS, ["HEL-01", "LIS-01"], "two stores")[0]
    async with gw.client("pos") as pos, gw.client(token=secret) as multi:
        member = await enrol(pos)
        unnamed = problem(await multi.post("/v1/purchases", json=purchase_body(gw, member, "MS-1", 1000),
                                           headers=idem()), 400)  # fmt: skip
        # Named as the client sent it (docs/gateway.md), as the length check names the same field.
        assert unnamed["errors"][0]["field"] == "body.store_id" and "HEL-01, LIS-01" in unnamed["errors"][0]["detail"]
        named = await multi.post("/v1/purchases", json=purchase_body(gw, member, "MS-1", 1000, store_id="HEL-01"),
                                 headers=idem())  # fmt: skip
        assert named.status_code == 201, named.text
        earned, purchase_id = named.json()["earned"]["points"], named.json()["purchase_id"]
        spend = {"member_id": member, "points": 1}
        unnamed = problem(await multi.post("/v1/redemptions", json=spend, headers=idem()), 400)
        assert unnamed["errors"][0]["field"] == "body.context.store_id"
        named = await multi.post("/v1/redemptions", json={**spend, "context": {"store_id": "LIS-01"}}, headers=idem())
        assert named.status_code == 201, named.text
        other = await multi.post("/v1/redemptions", json={**spend, "context": {"store_id": "OSL-01"}}, headers=idem())
        problem(other, 403)
        balance = (await pos.get(f"/v1/members/{member}/balance")).json()
        assert balance["balance_points"] == earned - 1  # the receipt earned once, one point spent once
        # A return is keyed by its purchase, so it may name no store (nor need one).
        back = {"lines": [{"line_index": 0, "quantity": 1}]}
        returned = await multi.post(f"/v1/purchases/{purchase_id}/returns", json=back, headers=idem())
        assert returned.status_code == 201, returned.text


async def test_text_no_message_can_carry_is_400_naming_the_field(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos:
        body = b'{"profile": {"language": "\\udfff"}}'
        response = await pos.post("/v1/members", content=body, headers={**idem(), "Content-Type": "application/json"})
        bad = problem(response, 400)
        assert bad["errors"][0]["field"].startswith("body.profile")


async def test_a_caller_without_the_scope_hears_403_whatever_headers_it_sent(gw: GatewayUnderTest) -> None:
    async with gw.client("pos") as pos, gw.client("reader") as reader:
        member = await enrol(pos)
        token = (await pos.post(f"/v1/members/{member}/tokens")).json()["token"]
        async with gw.client(token=token) as own:
            problem(await own.post("/v1/redemptions", json={"member_id": member, "points": 1}), 403)
        problem(await reader.post("/v1/purchases", json=purchase_body(gw, member, "NS-1", 100)), 403)
        problem(await reader.post("/v1/purchases", json=purchase_body(gw, member, "NS-1", 100),
                                  headers={"Idempotency-Key": "bad key with spaces"}), 403)  # fmt: skip
        missing = problem(await pos.post("/v1/redemptions", json={"member_id": member, "points": 1}), 400)
        assert missing["errors"][0]["field"] == "Idempotency-Key"  # with the scope: the header is what is wrong


def test_a_key_cannot_take_the_channel_name_the_ledger_keeps_receipts_under(gw: GatewayUnderTest) -> None:
    """Its keys' namespace would be 'purchase:<key id>', which reads as the ledger's receipt
    keys ('purchase:<program>'): a reused Idempotency-Key was answered as a receipt recorded
    with another body, naming receipt_id."""
    with pytest.raises(KeyRequestError, match="reserved"):
        key_store(gw.settings).create("purchase", ALL_POS, [], "a channel named purchase")


def test_a_token_from_a_gateway_a_second_ahead_is_not_refused_as_not_yet_valid() -> None:
    """Gateways behind one address share the secret; one whose clock is two seconds ahead issues
    a token the app uses at once through another: it was 401 "not yet valid (iat)"."""
    secret = "s" * 40
    ahead = MemberTokens(secret, timedelta(minutes=15), lambda: datetime.now(UTC) + timedelta(seconds=2))
    behind = MemberTokens(secret, timedelta(minutes=15), SystemClock().now)
    token, _ = ahead.issue("m_" + "0" * 28)
    assert behind.verify(token) == "m_" + "0" * 28


async def test_a_member_token_is_refused_once_its_stated_expiry_has_passed(gw: GatewayUnderTest) -> None:
    """No leeway past the `expires_at` the answer stated (it was 5 s): 3 s after it, 401."""
    async with gw.client("pos") as pos, gw.client("web") as web:
        member = await enrol(pos)
        issued = (await web.post(f"/v1/members/{member}/tokens")).json()
    expires_at = datetime.fromisoformat(issued["expires_at"])
    gw.mesh.clock.set(expires_at - timedelta(seconds=1))
    async with gw.client(token=issued["token"]) as app:
        assert (await app.get(f"/v1/members/{member}/balance")).status_code == 200
        gw.mesh.clock.set(expires_at)
        assert "expired" in problem(await app.get(f"/v1/members/{member}/balance"), 401)["detail"]
