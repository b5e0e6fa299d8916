"""Bearer tokens: HS256 JWTs that carry who is calling.

Claims: ``tenant_id`` (a positive integer), ``sub`` (the username within the tenant), ``exp``, and
optionally ``role: "admin"``. Only a token whose signature, expiry and claims all check out yields
an :class:`Identity`; nothing else about a request (no header, no query parameter) names a tenant.

The identity feeds database queries and cache keys, so its parts are plain ASCII and bounded even in
a correctly signed token: ``tenant_id`` is an integer from 1 to 2**63-1 (SQLite's largest integer),
either a JSON number or its canonical ASCII decimal string (``"12"``; not ``"012"``, ``" 12"``, nor
non-ASCII digits that ``str.isdigit()`` accepts: ``"²"``, which ``int()`` then refuses, or ``"٣"``,
which it reads as 3); ``sub`` is 1 to 64 of ``A-Za-z0-9_.@-``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import jwt

__all__ = [
    "ALGORITHM",
    "MAX_TENANT_ID",
    "Identity",
    "InvalidToken",
    "mint_token",
    "verify_token",
]

ALGORITHM = "HS256"
ADMIN_ROLE = "admin"

#: The largest tenant id: tenant ids are SQLite INTEGERs (signed 64-bit); a larger one overflows the
#: query.
MAX_TENANT_ID = 2**63 - 1

# A tenant id sent as a string: ASCII digits in canonical form, at most 19 of them ([0-9] is ASCII
# only, unlike \d or str.isdigit()).
_TENANT_ID_TEXT = re.compile(r"[1-9][0-9]{0,18}")
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
    """A signed token for ``identity``, valid for ``expires_in_seconds``.

    Raises:
        ValueError: For an identity that :func:`verify_token` would refuse (see the module's
            docstring), rather than a token the service answers with 401.
    """
    try:
        _tenant_id(identity.tenant_id)
        _username(identity.username)
    except InvalidToken as exc:
        raise ValueError(str(exc)) from None
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
    return Identity(
        _tenant_id(claims["tenant_id"]),
        _username(claims["sub"]),
        is_admin=claims.get("role") == ADMIN_ROLE,
    )


def _tenant_id(claim: object) -> int:
    if isinstance(claim, str) and _TENANT_ID_TEXT.fullmatch(claim):
        claim = int(claim)
    # bool is an int subclass; a tenant id of True is no tenant id.
    if isinstance(claim, bool) or not isinstance(claim, int) or not 1 <= claim <= MAX_TENANT_ID:
        raise InvalidToken(f"tenant_id must be an integer from 1 to {MAX_TENANT_ID}")
    return claim


def _username(claim: object) -> str:
    if not isinstance(claim, str) or not _USERNAME.fullmatch(claim):
        raise InvalidToken("sub must be 1 to 64 ASCII letters, digits and _.@-")
    return claim
