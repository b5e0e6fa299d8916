"""``/v1/admin/tenants``: every tenant, for tokens with ``role: "admin"`` only (not cached)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from sqlalchemy import select

from insights_backend.auth import ADMIN_RESPONSES, require_admin
from insights_backend.models import Tenant
from insights_backend.routes.dependencies import Session
from insights_backend.schemas import TenantOut

__all__ = ["router"]

router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=ADMIN_RESPONSES,
)


@router.get("/tenants", response_model=list[TenantOut])
async def list_tenants(session: Session) -> list[TenantOut]:
    """All tenants of the service."""
    tenants = await session.scalars(select(Tenant).order_by(Tenant.id))
    return [TenantOut.model_validate(tenant) for tenant in tenants]
