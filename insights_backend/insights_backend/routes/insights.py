"""``/v1/insights``: the tenant's insights, paginated and filterable, cached per tenant and query;
``/v1/insights/{insight_id}``: one insight, cached per tenant, and changed with ``PATCH``.

Tags say which entries show an insight: its detail entry is tagged ``insight:{insight_id}`` and
every list page ``insight-lists``. Changing insight 7 invalidates ``insight:7`` and
``insight-lists`` in the caller's tenant: the detail of every other insight stays cached.

Every query parameter is part of the cache key, in canonical order: ``?page=2&size=5`` and
``?size=5&page=2`` share one entry, ``?page=3&size=5`` has its own.

When the database fails, a page that went stale at most ``STALE_IF_ERROR_SECONDS`` ago is
answered instead (``stale_if_error``), never one a write invalidated.

``page`` and ``size`` are bounded in the signature, so an out-of-range value is a 422 that the
OpenAPI schema declares: the database computes ``OFFSET (page - 1) * size`` in 64-bit integers, and
an unbounded page number overflowed it (a 500).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, status
from sqlalchemy import func, or_, select

from commons.cache import cache, invalidate_tags
from insights_backend.auth import AUTHENTICATED_RESPONSES, CurrentIdentity
from insights_backend.models import Insight
from insights_backend.routes.dependencies import Session
from insights_backend.schemas import ErrorOut, InsightOut, InsightPage, InsightUpdate

__all__ = ["router"]

MAX_PAGE_SIZE = 100
#: Far beyond any tenant's data (a page past the end is simply empty), and small enough that the
#: offset ``(MAX_PAGE - 1) * MAX_PAGE_SIZE`` stays far inside SQLite's 64-bit integers.
MAX_PAGE = 1_000_000

#: While the database fails, a page that went stale at most this long ago is answered instead
#: (``X-FastAPI-Cache: STALE``): a list of insights a few minutes old beats an error page.
STALE_IF_ERROR_SECONDS = 300
#: The tag of every list page: a change to any insight may change what a page shows.
LISTS_TAG = "insight-lists"
#: Far beyond any id the database hands out, and inside SQLite's 64-bit integers.
MAX_INSIGHT_ID = 2**31 - 1

InsightId = Annotated[int, Path(ge=1, le=MAX_INSIGHT_ID, description="The insight's id.")]

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    status.HTTP_404_NOT_FOUND: {
        "model": ErrorOut,
        "description": "The caller's tenant has no insight of this id.",
    }
}

router = APIRouter(prefix="/v1", tags=["insights"], responses=AUTHENTICATED_RESPONSES)


def _contains(text: str) -> str:
    # The text is matched literally: LIKE's own wildcards in it are escaped.
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


@router.get("/insights", response_model=InsightPage)
@cache(namespace="insights", stale_if_error=STALE_IF_ERROR_SECONDS, tags=[LISTS_TAG])
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


def insight_tag(insight_id: int) -> str:
    """The tag of the entries that show the insight ``insight_id``."""
    return f"insight:{insight_id}"


async def _load(session: Session, tenant_id: int, insight_id: int) -> Insight:
    insight = await session.get(Insight, insight_id)
    if insight is None or insight.tenant_id != tenant_id:
        # Another tenant's insight is no different from a missing one.
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such insight")
    return insight


@router.get("/insights/{insight_id}", response_model=InsightOut, responses=_NOT_FOUND)
@cache(namespace="insight", tags=["insight:{insight_id}"])
async def get_insight(
    insight_id: InsightId, identity: CurrentIdentity, session: Session
) -> InsightOut:
    """One of the caller's tenant's insights."""
    return InsightOut.model_validate(await _load(session, identity.tenant_id, insight_id))


@router.patch(
    "/insights/{insight_id}",
    response_model=InsightOut,
    responses={
        **_NOT_FOUND,
        status.HTTP_400_BAD_REQUEST: {
            "model": ErrorOut,
            "description": "The body cannot be read at all (e.g. it is not UTF-8); a body that "
            "is read but is not a valid change is a 422.",
        },
    },
)
async def patch_insight(
    insight_id: InsightId, update: InsightUpdate, identity: CurrentIdentity, session: Session
) -> InsightOut:
    """Changes one insight; the cached entries that show it are dropped, and only those."""
    insight = await _load(session, identity.tenant_id, insight_id)
    for field, value in update.model_dump(exclude_none=True).items():
        setattr(insight, field, value)
    await session.commit()
    # After the commit: a request that misses from here on reads the new row. Kept through a
    # Redis outage like any invalidation (commons.cache.layer).
    await invalidate_tags(insight_tag(insight_id), LISTS_TAG, tenant_id=identity.tenant_id)
    return InsightOut.model_validate(insight)
