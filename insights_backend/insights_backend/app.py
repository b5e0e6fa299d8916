"""The application: ``create_app()`` and the module-level ``app`` that uvicorn serves.

The lifespan is the caching guide's (``init_cache()`` / ``close_cache()``) with the database opened
inside it: tables created and demo data seeded before the first request, the engine disposed after
the last.

The cache reads its settings from the environment; run the service through
``python -m insights_backend`` so that ``CACHE_PREFIX`` defaults to ``ib-cache`` (``config.py``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from commons.cache import PrivateCacheControlMiddleware, close_cache, init_cache
from commons.utilities.context import RequestContextMiddleware
from insights_backend.config import ServiceSettings
from insights_backend.database import open_database
from insights_backend.routes import admin, insights, operations, tenant_config, users

__all__ = ["app", "create_app"]

logger = logging.getLogger("insights_backend")


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """Builds the service.

    Args:
        settings: The service's settings; read from the environment by default. The cache's
            settings always come from the environment (``commons.cache.cache_settings()``).
    """
    settings = settings or ServiceSettings()
    if settings.uses_development_secret:
        logger.warning(
            "JWT_SECRET is not set: tokens are verified with the public development secret; "
            "set JWT_SECRET anywhere but on your own machine"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await init_cache()  # picks Redis or InMemory automatically
        try:
            async with open_database(settings.DATABASE_URL) as database:
                app.state.database = database
                yield
        finally:
            await close_cache()

    app = FastAPI(
        title="insights_backend",
        summary="Tenant configuration and insights, cached per tenant with commons.cache.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    # Every request starts with no tenant and no user bound; the auth dependency binds them.
    app.add_middleware(RequestContextMiddleware)
    # The guide-style route uses fastapi-cache2's decorator: keep its answers out of shared caches.
    app.add_middleware(PrivateCacheControlMiddleware)
    for module in (tenant_config, users, insights, admin, operations):
        app.include_router(module.router)
    return app


app = create_app()
