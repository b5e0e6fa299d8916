"""``/v1/tenant/config``: the caller's tenant configuration, cached per tenant.

The ``GET`` route is cached exactly as the caching guide's snippet shows, with fastapi-cache2's own
decorator; ``PUT`` replaces the configuration and then invalidates that tenant's entries only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, HTTPException, status
from fastapi_cache.decorator import cache

from commons.cache import cache_settings, invalidate_namespace, tenant_cache_key_builder
from insights_backend.auth import AUTHENTICATED_RESPONSES, CurrentIdentity
from insights_backend.models import TenantConfig
from insights_backend.routes.dependencies import Session
from insights_backend.schemas import ErrorOut, TenantConfigIn, TenantConfigOut

__all__ = ["router"]

NAMESPACE = "tenant_config"

router = APIRouter(prefix="/v1", tags=["tenant"], responses=AUTHENTICATED_RESPONSES)

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    status.HTTP_404_NOT_FOUND: {
        "model": ErrorOut,
        "description": "The caller's tenant has no configuration (e.g. no such tenant).",
    }
}


async def _load(session: Session, tenant_id: int) -> TenantConfig:
    config = await session.get(TenantConfig, tenant_id)
    if config is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="tenant has no configuration")
    return config


@router.get("/tenant/config", response_model=TenantConfigOut, responses=_NOT_FOUND)
@cache(
    expire=cache_settings().CACHE_TTL_SECONDS,
    namespace=NAMESPACE,
    key_builder=tenant_cache_key_builder,
)
async def get_tenant_config(identity: CurrentIdentity, session: Session) -> TenantConfigOut:
    """The configuration of the caller's tenant."""
    return TenantConfigOut.model_validate(await _load(session, identity.tenant_id))


@router.put(
    "/tenant/config",
    response_model=TenantConfigOut,
    responses={
        **_NOT_FOUND,
        status.HTTP_400_BAD_REQUEST: {
            "model": ErrorOut,
            "description": "The body cannot be read at all (e.g. it is not UTF-8); a body that "
            "is read but is not a valid configuration is a 422.",
        },
    },
)
async def put_tenant_config(
    update: TenantConfigIn, identity: CurrentIdentity, session: Session
) -> TenantConfigOut:
    """Replaces the configuration of the caller's tenant; its cached copies are dropped."""
    config = await _load(session, identity.tenant_id)
    for field, value in update.model_dump().items():
        setattr(config, field, value)
    config.updated_at = datetime.now(UTC).replace(tzinfo=None)
    await session.commit()
    # After the commit: a request that misses from here on reads the new row. The cache keeps this
    # invalidation through a Redis outage, so it is never lost (commons.cache.layer).
    await invalidate_namespace(NAMESPACE, tenant_id=identity.tenant_id)
    return TenantConfigOut.model_validate(config)
