"""The API's request and response bodies."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

__all__ = [
    "ErrorOut",
    "HealthReport",
    "InsightOut",
    "InsightPage",
    "InsightUpdate",
    "TenantConfigIn",
    "TenantConfigOut",
    "TenantOut",
    "UserOut",
]


def _as_utc(value: datetime) -> datetime:
    # The database keeps naive UTC; say so on the wire.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]


class ErrorOut(BaseModel):
    """An error answer (401, 403, 404): what went wrong, in words."""

    detail: str = Field(examples=["missing bearer token"])


class _FromRow(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class TenantConfigIn(BaseModel):
    """A tenant's new configuration (``PUT`` replaces all of it)."""

    display_name: str = Field(min_length=1, max_length=100)
    timezone: str = Field(min_length=1, max_length=64, examples=["Europe/Berlin"])
    currency: str = Field(pattern=r"^[A-Z]{3}$", examples=["EUR"])
    features: list[str] = Field(default_factory=list, max_length=50)


class TenantConfigOut(_FromRow):
    """A tenant's configuration."""

    tenant_id: int
    display_name: str
    timezone: str
    currency: str
    features: list[str]
    updated_at: UtcDatetime


class UserOut(_FromRow):
    """The authenticated user's profile."""

    id: int
    tenant_id: int
    username: str
    email: str
    full_name: str


class InsightOut(_FromRow):
    """One insight."""

    id: int
    title: str
    summary: str
    category: str
    impact: float
    created_at: UtcDatetime


class InsightUpdate(BaseModel):
    """Changes to one insight (``PATCH``: the fields given are replaced, the others kept)."""

    # Strict: ``"impact": false`` or ``"1.5"`` is a 422, as the schema's types say.
    model_config = ConfigDict(strict=True)

    title: str | None = Field(default=None, min_length=1, max_length=200)
    summary: str | None = Field(default=None, max_length=2000)
    impact: float | None = Field(default=None, ge=0, le=1_000_000, allow_inf_nan=False)


class InsightPage(BaseModel):
    """One page of a tenant's insights, newest first."""

    items: list[InsightOut]
    page: int
    size: int
    total: int
    pages: int
    q: str | None = None


class TenantOut(_FromRow):
    """A tenant, as the admin list shows it."""

    id: int
    name: str
    plan: str
    created_at: UtcDatetime


class HealthReport(BaseModel):
    """The service's status and where its cache serves from."""

    status: str
    database: str
    cache: dict[str, object]
