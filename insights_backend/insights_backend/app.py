"""The application: ``create_app()`` and the module-level ``app`` that uvicorn serves.

The lifespan runs ``init_cache()`` / ``close_cache()`` (``docs/service-guide.md``) with the
database opened inside it: tables created and demo data seeded before the first request, the
engine disposed after the last. Its start-up ends with ``gc.collect(); gc.freeze()`` (see
``_freeze_start_up_heap``).

The cache reads its settings from the environment; run the service through
``python -m insights_backend`` so that ``CACHE_PREFIX`` defaults to ``ib-cache`` (``config.py``).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from commons.cache import PrivateCacheControlMiddleware, close_cache, init_cache
from commons.utilities.context import RequestContextMiddleware
from insights_backend.config import ServiceSettings
from insights_backend.database import open_database
from insights_backend.routes import admin, insights, operations, tenant_config, users

__all__ = ["app", "create_app"]

logger = logging.getLogger("insights_backend")


#: The methods a 405's ``Allow`` header may name, in the order it names them.
_HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    """A 405 whose ``Allow`` lists every method of the path.

    Starlette answers 405 from the first route whose path matches, so ``Allow`` named only that
    route's methods: ``GET`` for ``/v1/tenant/config``, whose ``PUT`` is another route. Each method
    is tried against every route instead.
    """
    assert isinstance(exc, StarletteHTTPException)
    allowed = [
        method
        for method in _HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in request.app.router.routes
        )
    ]
    if allowed:
        exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
    return await http_exception_handler(request, exc)


def _freeze_start_up_heap() -> None:
    """Moves everything start-up allocated out of the garbage collector's reach.

    Modules, routes, settings and the cache's objects live as long as the process, yet every full
    collection walks them: about 107,000 objects, 110-125 ms per collection on the benchmark
    machine, charged to whichever requests are in flight. Awaiting Redis keeps request objects
    alive long enough to be promoted, so Redis hits trigger such collections and their p99 was 6-9
    times the floor's; frozen, it is 8-10 ms against the floor's 6-7.5 ms. The collection first
    frees start-up's garbage, so that nothing dead is frozen.
    """
    gc.collect()
    gc.freeze()


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
                _freeze_start_up_heap()
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
    app.add_exception_handler(405, _method_not_allowed)
    # Every request starts with no tenant and no user bound; the auth dependency binds them.
    app.add_middleware(RequestContextMiddleware)
    # One route uses fastapi-cache2's own decorator: keep its answers out of shared caches.
    app.add_middleware(PrivateCacheControlMiddleware)
    for module in (tenant_config, users, insights, admin, operations):
        app.include_router(module.router)
    return app


app = create_app()
