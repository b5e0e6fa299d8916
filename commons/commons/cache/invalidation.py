"""``invalidate_namespace()``: remove a namespace's entries, for all tenants, one, or one user.

It never blocks Redis and its cost does not grow with unrelated keys: see the index design in
``backends/redis/index.py``. Namespaces and ids are literal text: a quote, ``*``, ``?`` or ``[``
is no pattern and no script. During a Redis outage the invalidation is kept and applied before
Redis is read again (see ``layer.py``).
"""

from __future__ import annotations

import logging

from commons.cache.keyspace import check_namespace
from commons.cache.lifecycle import current_layer
from commons.cache.scope import InvalidationTarget

__all__ = ["invalidate_namespace"]

logger = logging.getLogger("commons.cache")


async def invalidate_namespace(
    namespace: str, *, tenant_id: str | int | None = None, user_id: str | int | None = None
) -> int:
    """Removes the cached entries of ``namespace``.

    Args:
        namespace: The namespace given to ``@cache(namespace=...)``, without the prefix.
        tenant_id: Only this tenant's entries (including its users' entries).
        user_id: Only this user's entries; needs ``tenant_id``.

    It returns once the invalidation holds: on Redis, once the scope's generation is retired
    (one command, whatever the number of entries); the old entries, which are never served
    again, are removed from Redis afterwards in the background (``background_removal.py``).

    Returns:
        The number of entries removed before it returned: the in-memory tier's (Redis' are
        counted in ``commons_cache_invalidated_entries_total`` once removed).

    Raises:
        ValueError: ``user_id`` without ``tenant_id``, or a namespace holding ``:`` (no route
            can have one: ``@cache`` refuses it).
    """
    check_namespace(namespace)
    target = InvalidationTarget(
        namespace,
        None if tenant_id is None else str(tenant_id),
        None if user_id is None else str(user_id),
    )
    layer = current_layer()
    if layer is None:
        # Nothing is cached without a layer either, but a test or a service that forgot
        # init_cache() would otherwise believe its routes are cached and invalidated.
        logger.warning(
            "invalidate_namespace(%r): init_cache() has not run, nothing is cached or removed; "
            "run it in the app's lifespan (in tests: `with TestClient(app)` runs the lifespan)",
            namespace,
        )
        return 0
    return await layer.invalidate(target)
