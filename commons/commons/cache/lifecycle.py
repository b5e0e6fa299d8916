"""Backend selection: ``init_cache()`` picks Redis or memory, ``close_cache()`` lets go.

The one piece of module state is the current :class:`~commons.cache.layer.CacheLayer`; calling
``init_cache()`` again closes it and builds a new one (tests and reloads do). fastapi-cache2 is
initialised alongside, with a backend that delegates to the current layer, so routes decorated with
``fastapi_cache.decorator.cache`` share keys, entries, fallback and invalidation with ours.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from fastapi_cache import FastAPICache

from commons.cache.backends.factory import memory_store, redis_store
from commons.cache.events import CacheEvents
from commons.cache.fastapi_cache_backend import LayerBackend
from commons.cache.http import CACHE_STATUS_HEADER
from commons.cache.keys import tenant_cache_key_builder
from commons.cache.layer import CacheLayer
from commons.cache.memo import set_hit_memos_budget
from commons.cache.settings import CacheSettings, cache_settings
from commons.cache.startup_checks import warn_about_mistakes
from commons.cache.status import CacheState, CacheStatus

__all__ = ["cache_status", "close_cache", "current_layer", "init_cache"]

logger = logging.getLogger("commons.cache")

_layer: CacheLayer | None = None
_closed_since = datetime.now(UTC)
#: Settings a test runs the cache with (``commons.testing.kit``): ``init_cache()`` without
#: settings takes them instead of the environment's, so a service's lifespan run by the test
#: (``with TestClient(app)``) keeps the test's cache rather than replacing it.
_test_settings: CacheSettings | None = None


def use_test_settings(settings: CacheSettings | None) -> None:
    """What ``init_cache()`` without settings uses until called with ``None`` (the testing
    kit's, for the length of one test)."""
    global _test_settings
    _test_settings = settings


def current_layer() -> CacheLayer | None:
    """The layer that ``init_cache()`` built, or ``None`` before it (or after ``close_cache()``)."""
    return _layer


async def init_cache(
    settings: CacheSettings | None = None, *, events: CacheEvents | None = None
) -> None:
    """Chooses and connects the backend; call it in the service's lifespan.

    - ``REDIS_URL`` set and Redis answers ``PING``: Redis.
    - ``REDIS_URL`` unset: the bounded in-memory backend.
    - ``REDIS_URL`` set but Redis does not answer: one warning, then the in-memory tier while Redis
      is probed in the background (state ``degraded``), or, with ``CACHE_FAIL_FAST=true``,
      :class:`~commons.cache.errors.CacheUnavailableError` so the service refuses to start.
    - ``CACHE_ENABLED=false``: nothing is cached at all.

    Args:
        settings: The settings to use; ``cache_settings()`` (the environment) by default, or
            during a test the testing kit's (``commons.testing.kit.cache_for_test``).
        events: Receives the cache's events. By default the Prometheus metrics of
            ``commons.cache.metrics`` when prometheus-client is installed (the ``metrics`` extra),
            else nothing.

    Raises:
        CacheUnavailableError: Redis is configured, unreachable, and CACHE_FAIL_FAST is true.
    """
    global _layer
    settings = settings or _test_settings or cache_settings()
    await close_cache()
    # Only the default Prometheus events count per process in a way PROMETHEUS_MULTIPROC_DIR
    # fixes; a caller's own events are theirs to aggregate.
    own_metrics = events is None
    events = events if events is not None else _default_events()
    # Before the stores and the layer are built: their memos take their shares of it.
    set_hit_memos_budget(settings.CACHE_HIT_MEMOS_MAX_BYTES)
    redis = None
    if settings.CACHE_ENABLED and settings.REDIS_URL is not None:
        redis = redis_store(settings, serving=events)
    layer = CacheLayer(
        settings,
        redis=redis,
        memory=memory_store(settings),
        events=events,
    )
    try:
        await layer.start()
    except BaseException:
        await layer.aclose()
        raise
    _layer = layer
    layer.events.state_changed(layer.state.value)
    FastAPICache.reset()
    FastAPICache.init(
        LayerBackend(current_layer),
        prefix=settings.CACHE_PREFIX,
        expire=settings.CACHE_TTL_SECONDS,
        key_builder=tenant_cache_key_builder,
        cache_status_header=CACHE_STATUS_HEADER,
        enable=settings.CACHE_ENABLED,
    )
    warn_about_mistakes(
        metrics=own_metrics and type(events) is not CacheEvents,
        memory_only=settings.CACHE_ENABLED and settings.REDIS_URL is None,
    )


async def close_cache() -> None:
    """Closes connections and stops background work. Safe to call twice."""
    global _layer, _closed_since
    layer, _layer = _layer, None
    if layer is not None:
        _closed_since = datetime.now(UTC)
        await layer.aclose()
        FastAPICache.reset()
        layer.events.state_changed(CacheState.DISABLED.value)


def _default_events() -> CacheEvents:
    """The Prometheus metrics when prometheus-client is installed; otherwise no-op hooks."""
    try:
        from commons.cache.metrics import PrometheusEvents
    except ModuleNotFoundError as exc:
        if exc.name != "prometheus_client":
            raise
        return CacheEvents()
    return PrometheusEvents()


def cache_status() -> CacheStatus:
    """Where cached responses are served from right now, why, and since when."""
    if _layer is None:
        return CacheStatus(
            backend=CacheState.DISABLED.value,
            reason="init_cache() has not run",
            since=_closed_since,
            redis_configured=False,
        )
    return _layer.status()
