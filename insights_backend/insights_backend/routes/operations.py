"""``/health`` and ``/metrics``: for load balancers and Prometheus, without authentication.

``/health`` answers 200 whenever the service can serve requests, including while the cache is
degraded (the cache then serves from memory; that is the point of its fallback), and reports the
cache's state. Only an unreachable database makes it 503. ``/metrics`` exposes
prometheus_client's default registry, where the cache registers its metrics, and exists only when
prometheus_client is installed.
"""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Request, Response, status

from commons.cache import cache_status
from insights_backend.database import Database
from insights_backend.schemas import HealthReport

try:
    import prometheus_client
except ImportError:  # the metrics extra is optional
    prometheus_client = None  # type: ignore[assignment]

__all__ = ["router"]

router = APIRouter(tags=["operations"])


@router.get(
    "/health",
    response_model=HealthReport,
    responses={
        status.HTTP_503_SERVICE_UNAVAILABLE: {
            "model": HealthReport,
            "description": "The database does not answer.",
        }
    },
)
async def health(request: Request, response: Response) -> HealthReport:
    """The service's status and the cache's state (backend, reason, since, ...)."""
    database: Database = request.app.state.database
    database_ok = await database.answers()
    if not database_ok:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return HealthReport(
        status="ok" if database_ok else "unavailable",
        database="ok" if database_ok else "unreachable",
        cache=dataclasses.asdict(cache_status()),
    )


if prometheus_client is not None:

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        """Prometheus text exposition of the default registry."""
        return Response(
            prometheus_client.generate_latest(),
            media_type=prometheus_client.CONTENT_TYPE_LATEST,
        )
