"""Bearer tokens: HS256 JWTs that carry who is calling.

Claims: ``tenant_id`` (a positive integer), ``sub`` (the username within the tenant), ``exp``, and
optionally ``role: "admin"``. Only a token whose signature, expiry and claims all check out yields
an :class:`Identity`; nothing else about a request (no header, no query parameter) names a tenant.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import jwt

__all__ = ["ALGORITHM", "Identity", "InvalidToken", "mint_token", "verify_token"]

ALGORITHM = "HS256"
ADMIN_ROLE = "admin"

# A username becomes part of a cache key between ':' separators.
_USERNAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


class InvalidToken(Exception):
    """The token is missing a claim, malformed, expired, or not signed with our secret."""


@dataclass(frozen=True, slots=True)
class Identity:
    """The verified caller."""

    tenant_id: int
    username: str
    is_admin: bool = False


def mint_token(identity: Identity, secret: str, *, expires_in_seconds: int = 86_400) -> str:
    """A signed token for ``identity``, valid for ``expires_in_seconds``."""
    now = int(time.time())
    claims: dict[str, object] = {
        "tenant_id": identity.tenant_id,
        "sub": identity.username,
        "iat": now,
        "exp": now + expires_in_seconds,
    }
    if identity.is_admin:
        claims["role"] = ADMIN_ROLE
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(token: str, secret: str) -> Identity:
    """The identity a token proves.

    Raises:
        InvalidToken: For any token that is not ours, not current, or lacks a valid claim.
    """
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub", "tenant_id"]}
        )
    except jwt.InvalidTokenError as exc:
        raise InvalidToken(str(exc)) from exc
    tenant_id, username = claims["tenant_id"], claims["sub"]
    # bool is an int subclass; a tenant id of True is no tenant id.
    if isinstance(tenant_id, bool) or not isinstance(tenant_id, int | str):
        raise InvalidToken("tenant_id must be a positive integer")
    if isinstance(tenant_id, str):
        if not tenant_id.isdigit():
            raise InvalidToken("tenant_id must be a positive integer")
        tenant_id = int(tenant_id)
    if tenant_id < 1:
        raise InvalidToken("tenant_id must be a positive integer")
    if not isinstance(username, str) or not _USERNAME.fullmatch(username):
        raise InvalidToken("sub must be a username of letters, digits and _.@-")
    return Identity(tenant_id, username, is_admin=claims.get("role") == ADMIN_ROLE)
