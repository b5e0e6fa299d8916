"""``/v1/insights``: the tenant's insights, paginated and filterable, cached per tenant and query.

Every query parameter is part of the cache key, in canonical order: ``?page=2&size=5`` and
``?size=5&page=2`` share one entry, ``?page=3&size=5`` has its own.

When the database fails, a page that went stale at most ``STALE_IF_ERROR_SECONDS`` ago is
answered instead (``stale_if_error``), never one a write invalidated.

``page`` and ``size`` are bounded in the signature, so an out-of-range value is a 422 that the
OpenAPI schema declares: the database computes ``OFFSET (page - 1) * size`` in 64-bit integers, and
an unbounded page number overflowed it (a 500).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import func, or_, select

from commons.cache import cache
from insights_backend.auth import AUTHENTICATED_RESPONSES, CurrentIdentity
from insights_backend.models import Insight
from insights_backend.routes.dependencies import Session
from insights_backend.schemas import InsightOut, InsightPage

__all__ = ["router"]

MAX_PAGE_SIZE = 100
#: Far beyond any tenant's data (a page past the end is simply empty), and small enough that the
#: offset ``(MAX_PAGE - 1) * MAX_PAGE_SIZE`` stays far inside SQLite's 64-bit integers.
MAX_PAGE = 1_000_000

#: While the database fails, a page that went stale at most this long ago is answered instead
#: (``X-FastAPI-Cache: STALE``): a list of insights a few minutes old beats an error page.
STALE_IF_ERROR_SECONDS = 300

router = APIRouter(prefix="/v1", tags=["insights"], responses=AUTHENTICATED_RESPONSES)


def _contains(text: str) -> str:
    # The text is matched literally: LIKE's own wildcards in it are escaped.
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


@router.get("/insights", response_model=InsightPage)
@cache(namespace="insights", stale_if_error=STALE_IF_ERROR_SECONDS)
async def list_insights(
    identity: CurrentIdentity,
    session: Session,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE, description="1-based page number.")] = 1,
    size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Items per page.")] = 20,
    q: Annotated[
        str | None,
        Query(max_length=100, description="Only insights whose title or summary contains this."),
    ] = None,
) -> InsightPage:
    """The caller's tenant's insights, newest first."""
    condition = Insight.tenant_id == identity.tenant_id
    if q:
        pattern = _contains(q)
        condition = condition & or_(
            Insight.title.ilike(pattern, escape="\\"), Insight.summary.ilike(pattern, escape="\\")
        )
    total = await session.scalar(select(func.count()).select_from(Insight).where(condition)) or 0
    rows = await session.scalars(
        select(Insight)
        .where(condition)
        .order_by(Insight.created_at.desc(), Insight.id.desc())
        .offset((page - 1) * size)
        .limit(size)
    )
    return InsightPage(
        items=[InsightOut.model_validate(row) for row in rows],
        page=page,
        size=size,
        total=total,
        pages=-(-total // size),
        q=q,
    )
