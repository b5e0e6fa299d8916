"""``/v1/users/me``: the caller's own profile, cached per tenant and user."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from sqlalchemy import select

from commons.cache import cache, tenant_user_cache_key_builder
from insights_backend.auth import AUTHENTICATED_RESPONSES, CurrentIdentity
from insights_backend.models import User
from insights_backend.routes.dependencies import Session
from insights_backend.schemas import ErrorOut, UserOut

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["users"], responses=AUTHENTICATED_RESPONSES)


@router.get(
    "/users/me",
    response_model=UserOut,
    responses={
        status.HTTP_404_NOT_FOUND: {
            "model": ErrorOut,
            "description": "The token's user does not exist in its tenant.",
        }
    },
)
@cache(namespace="users_me", key_builder=tenant_user_cache_key_builder)
async def get_me(identity: CurrentIdentity, session: Session) -> UserOut:
    """The authenticated user's profile."""
    user = await session.scalar(
        select(User).where(User.tenant_id == identity.tenant_id, User.username == identity.username)
    )
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="user not found in this tenant")
    return UserOut.model_validate(user)
