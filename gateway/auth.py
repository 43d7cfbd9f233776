"""Who is calling: a channel's API key (scopes, its channel and stores) or a member token.

Credentials come as `Authorization: Bearer <credential>` (or `X-API-Key`). A member token is a
signed, expiring JWT (HS256, audience `pointmesh-member`) that only ever reads its own member.
The channel and store a command acts for are stamped from the key, never taken on trust from
the body.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt
from fastapi import Request

from gateway.keys import ApiKey, KeyStore, KeyStoreUnavailable
from gateway.problems import bad_request, forbidden, unauthorized, unavailable
from pointmesh.config import Settings

log = logging.getLogger(__name__)

AUDIENCE = "pointmesh-member"
# HS256 keys shorter than the hash are open to offline guessing from one captured token.
MIN_SECRET_CHARS = 32


def member_token_secret(settings: Settings) -> str:
    """The secret member tokens are signed with: POINTMESH_MEMBER_TOKEN_SECRET, or else one
    generated once for this data directory and kept there (mode 0600), so a machine without
    the setting never signs with a secret anyone could know. Gateways behind one load balancer
    must share it, so they must set it; this is said at start."""
    if settings.member_token_secret:
        if len(settings.member_token_secret) < MIN_SECRET_CHARS:
            log.warning("POINTMESH_MEMBER_TOKEN_SECRET is shorter than %d characters: a captured member "
                        "token lets anyone guess it offline and sign tokens for any member", MIN_SECRET_CHARS)  # fmt: skip
        return settings.member_token_secret
    path = settings.data_dir / "gateway" / "member-token.secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Written whole under another name, then linked into place: a gateway and the CLI
        # starting together both end up with the one secret that got there first.
        draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    secret = path.read_text().strip()
    if len(secret) < MIN_SECRET_CHARS:
        raise RuntimeError(f"{path} holds no usable member-token secret; delete it to make a new one")
    log.warning("POINTMESH_MEMBER_TOKEN_SECRET is not set: member tokens are signed with the secret generated "
                "in %s. Every gateway behind one address needs the same secret: set it there.", path)  # fmt: skip
    return secret


@dataclass(frozen=True, slots=True)
class Principal:
    key: ApiKey | None = None
    member_id: str = ""
    # When a member token stops being valid (its exp claim); None for API keys.
    expires_at: datetime | None = None

    @property
    def channel(self) -> str:
        return self.key.channel if self.key else "member"

    @property
    def namespace(self) -> str:
        """Idempotency keys are scoped to the API key, so two clients' keys never collide."""
        return f"{self.key.channel}:{self.key.key_id}" if self.key else f"member:{self.member_id}"

    def require(self, scope: str) -> ApiKey:
        if self.key is None:
            raise forbidden(f"a member token cannot do this; it needs an API key with scope {scope}")
        if not self.key.allows(scope):
            raise forbidden(f"API key {self.key.key_id} lacks scope {scope} (it has {', '.join(self.key.scopes)})")
        return self.key

    def store_for(self, store_id: str, field: str = "store_id", *, required: bool = True) -> str:
        """The store a command acts for: one the key is bound to, never another, and never none
        for a key bound to stores where the store matters (a receipt filed under no store would
        not meet the same receipt filed under its store, and would earn twice; a spend screened
        without its store). `required=False`: a return (keyed by its purchase) or a quote may
        name none. `field` names where it was given."""
        key = self.key
        if key is None:
            raise forbidden("a member token cannot act for a store")
        if store_id and key.stores and store_id not in key.stores:
            raise forbidden(f"API key {key.key_id} may act for stores {', '.join(key.stores)}, not {store_id}")
        if not store_id and len(key.stores) == 1:
            return key.stores[0]
        if not store_id and key.stores and required:
            raise bad_request(
                f"body.{field}", f"is required: API key {key.key_id} acts for stores {', '.join(key.stores)}"
            )
        return store_id

    def may_act_on_hold(self, hold_id: str, channel: str, store_id: str) -> None:
        """A hold reserves points for one channel's checkout (and one store's, when it names
        one): only a key acting for that channel and store, or an admin key, reads, captures or
        voids it, so a hold id seen on one till is no use at another. A hold naming no channel
        (placed by an internal gRPC caller that gave none, or before 2026-12-06) stays open to
        any key with the scope."""
        key = self.require("redemptions:write")
        if not channel or key.allows("admin"):
            return
        if key.channel == channel and not (store_id and key.stores and store_id not in key.stores):
            return
        acts_for = f"channel {key.channel}" + (f", stores {', '.join(key.stores)}" if key.stores else "")
        raise forbidden(f"API key {key.key_id} acts for {acts_for}; hold {hold_id} was placed for another "
                        "channel or store")  # fmt: skip

    def may_read_member(self, member_id: str) -> None:
        if self.key is not None:
            self.require("members:read")
        elif self.member_id != member_id:
            raise forbidden("a member token reads only its own member")


class MemberTokens:
    def __init__(self, secret: str, ttl: timedelta, now: Callable[[], datetime]) -> None:
        self._secret = secret
        self._ttl = ttl
        self._now = now

    def issue(self, member_id: str) -> tuple[str, datetime]:
        issued = self._now()
        exp = int((issued + self._ttl).timestamp())  # whole seconds, and the expiry stated is the token's
        claims = {"sub": member_id, "aud": AUDIENCE, "iat": int(issued.timestamp()), "exp": exp}
        return jwt.encode(claims, self._secret, algorithm="HS256"), datetime.fromtimestamp(exp, UTC)

    def verify(self, token: str) -> str:
        return self.verify_until(token)[0]

    def alive(self, expires_at: datetime | None) -> bool:
        """Whether a token verified earlier (with this expiry) would still pass now: a
        websocket outlives the handshake that checked it."""
        return expires_at is None or self._now() < expires_at

    def verify_until(self, token: str) -> tuple[str, datetime]:
        """The member a token names and when it expires."""
        try:
            # Expiry is checked against the gateway's clock below, as stated when issued, with no
            # leeway. `iat` is not checked: PyJWT reads it on the system clock, and a token a peer
            # gateway (sharing the secret) issued a second ahead would be refused as not yet valid.
            claims = jwt.decode(
                token, self._secret, algorithms=["HS256"], audience=AUDIENCE,
                options={"require": ["exp", "sub"], "verify_exp": False, "verify_iat": False},
            )  # fmt: skip
        except jwt.InvalidTokenError as exc:
            raise unauthorized(f"the member token is not valid: {exc}") from None
        expires = datetime.fromtimestamp(int(claims["exp"]), UTC)
        if not self.alive(expires):
            raise unauthorized("the member token has expired")
        return str(claims["sub"]), expires


def credential_of(headers: dict[str, str] | object) -> str:
    get = getattr(headers, "get")  # noqa: B009 - Request.headers and websocket headers both have .get
    auth = get("authorization") or ""
    if auth.lower().startswith("bearer "):
        return str(auth[7:].strip())
    return str(get("x-api-key") or "")


async def resolve(credential: str, keys: KeyStore, tokens: MemberTokens) -> Principal:
    if not credential:
        raise unauthorized("send an API key or a member token as 'Authorization: Bearer <credential>'")
    if credential.startswith("pmk_"):
        try:
            key = await keys.verify_async(credential)
        except KeyStoreUnavailable as exc:
            # Neither valid nor invalid: a 401 would make a client drop a good key.
            log.warning("API keys cannot be read: %s", exc)
            raise unavailable("the API key store") from None
        if key is None:
            raise unauthorized("the API key is not valid or was revoked")
        return Principal(key=key)
    member_id, expires = tokens.verify_until(credential)
    return Principal(member_id=member_id, expires_at=expires)


def principal_dependency(
    keys: Callable[[], KeyStore], tokens: Callable[[], MemberTokens]
) -> Callable[[Request], Awaitable[Principal]]:
    async def principal(request: Request) -> Principal:
        return await resolve(credential_of(request.headers), keys(), tokens())

    return principal
