"""FastAPI dependencies that authenticate a request and bind its identity for the cache.

:func:`authenticated` is ``async`` on purpose: FastAPI runs async dependencies in the request's own
task, so the tenant and user it binds with ``set_tenant_id`` / ``set_user_id`` are what the cache
key builders see in the endpoint. A sync dependency would run in a worker thread and the binding
would be lost (see ``commons.utilities.context``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from commons.utilities.context import set_tenant_id, set_user_id
from insights_backend.config import ServiceSettings
from insights_backend.tokens import Identity, InvalidToken, verify_token

__all__ = ["CurrentIdentity", "authenticated", "require_admin"]

_bearer = HTTPBearer(auto_error=False, description="A JWT from `python -m insights_backend.token`.")


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
