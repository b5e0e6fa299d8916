"""``/health`` and ``/metrics``: for load balancers and Prometheus, without authentication.

``/health`` answers 200 whenever the service can serve requests, including while the cache is
degraded (the cache then serves from memory; that is the point of its fallback), and reports the
cache's state. Only an unreachable database makes it 503. ``/metrics`` exposes prometheus_client's
default registry, where the cache registers its metrics, or with ``PROMETHEUS_MULTIPROC_DIR`` the
sum of every worker process's (``commons.cache.metrics.metrics_router``).
"""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Request, Response, status

from commons.cache import cache_status
from commons.cache.metrics import metrics_router
from insights_backend.database import Database
from insights_backend.schemas import HealthReport

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


# Prometheus text exposition of the cache's metrics (all workers' in multiprocess mode).
router.include_router(metrics_router())
