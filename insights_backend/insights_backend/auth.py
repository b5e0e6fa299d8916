"""FastAPI dependencies that authenticate a request and bind its identity for the cache.

:func:`authenticated` is ``async`` on purpose: FastAPI runs async dependencies in the request's own
task, so the tenant and user it binds with ``set_tenant_id`` / ``set_user_id`` are what the cache
key builders see in the endpoint. A sync dependency would run in a worker thread and the binding
would be lost (see ``commons.utilities.context``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from commons.utilities.context import set_tenant_id, set_user_id
from insights_backend.config import ServiceSettings
from insights_backend.schemas import ErrorOut
from insights_backend.tokens import Identity, InvalidToken, verify_token

__all__ = [
    "ADMIN_RESPONSES",
    "AUTHENTICATED_RESPONSES",
    "CurrentIdentity",
    "authenticated",
    "require_admin",
]

#: The answers :func:`authenticated` adds to a route, for its OpenAPI ``responses``.
AUTHENTICATED_RESPONSES: dict[int | str, dict[str, Any]] = {
    status.HTTP_401_UNAUTHORIZED: {
        "model": ErrorOut,
        "description": "The bearer token is missing, malformed, expired, not ours, or its "
        "tenant_id or sub is invalid.",
        "headers": {
            "WWW-Authenticate": {
                "description": "Always `Bearer`.",
                "schema": {"type": "string", "const": "Bearer"},
            }
        },
    },
}

#: The answers :func:`require_admin` adds to a route: those of :func:`authenticated`, and 403.
ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTHENTICATED_RESPONSES,
    status.HTTP_403_FORBIDDEN: {
        "model": ErrorOut,
        "description": 'The token is valid but has no `role: "admin"`.',
    },
}

_bearer = HTTPBearer(
    auto_error=False, description="A JWT from `python -m insights_backend.dev_token`."
)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


async def authenticated(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Identity:
    """Verifies the bearer token and binds its tenant and user to the request's context.

    Raises:
        HTTPException: 401 when the token is missing or does not verify.
    """
    if credentials is None:
        raise _unauthorized("missing bearer token")
    settings: ServiceSettings = request.app.state.settings
    try:
        identity = verify_token(credentials.credentials, settings.JWT_SECRET)
    except InvalidToken as exc:
        raise _unauthorized(f"invalid token: {exc}") from None
    set_tenant_id(identity.tenant_id)
    set_user_id(identity.username)
    return identity


CurrentIdentity = Annotated[Identity, Depends(authenticated)]


async def require_admin(identity: CurrentIdentity) -> Identity:
    """Lets only tokens with ``role: "admin"`` through.

    Raises:
        HTTPException: 403 for an authenticated caller who is not an admin.
    """
    if not identity.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="admin role required")
    return identity
