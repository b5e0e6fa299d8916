"""``invalidate_namespace()`` and ``invalidate_tags()``: remove a namespace's entries, or the
entries carrying a tag, for all tenants, one, or one user.

It never blocks Redis and its cost does not grow with unrelated keys: see the index design in
``backends/redis/index.py``. Namespaces and ids are literal text: a quote, ``*``, ``?`` or ``[``
is no pattern and no script. During a Redis outage the invalidation is kept and applied before
Redis is read again (see ``removals.py``). Tags are literal text too: ``item:*`` reaches only the
entries tagged exactly ``item:*`` (see ``tags.py`` for how an invalidation by tag holds).
"""

from __future__ import annotations

import logging

from commons.cache.keyspace import check_namespace
from commons.cache.lifecycle import current_layer
from commons.cache.scope import InvalidationTarget, tag_namespace
from commons.cache.tags import check_tag

__all__ = ["invalidate_namespace", "invalidate_tags"]

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
    target = InvalidationTarget(namespace, *_ids(tenant_id, user_id))
    layer = current_layer()
    if layer is None:
        _not_initialised(f"invalidate_namespace({namespace!r})")
        return 0
    return await layer.invalidate(target)


async def invalidate_tags(
    *tags: str, tenant_id: str | int | None = None, user_id: str | int | None = None
) -> int:
    """Invalidates the cached entries carrying any of ``tags`` (``@cache(tags=...)``), in every
    namespace of this service's ``CACHE_PREFIX``.

    Args:
        tags: Literal tags (never patterns), e.g. ``"insight:7"``.
        tenant_id: Only this tenant's entries (including its users' entries); without it, the
            entries of every tenant and the global ones.
        user_id: Only this user's entries; needs ``tenant_id``.

    It returns once the invalidation holds: on Redis, once each tag's generation at that scope
    is retired (one command per tag, whatever the number of entries). The entries themselves are
    never served again and expire with their time to live.

    Returns:
        The number of entries removed before it returned (the in-memory tier's).

    Raises:
        ValueError: ``user_id`` without ``tenant_id``, or a tag that is empty, not text, or
            longer than ``tags.MAX_TAG_LENGTH`` characters (nothing is invalidated then).
    """
    ids = _ids(tenant_id, user_id)
    targets = [InvalidationTarget(tag_namespace(check_tag(tag)), *ids) for tag in tags]
    layer = current_layer()
    if layer is None:
        _not_initialised(f"invalidate_tags{tags!r}")
        return 0
    removed = 0
    for target in dict.fromkeys(targets):
        removed += await layer.invalidate(target)
    return removed


def _ids(tenant_id: str | int | None, user_id: str | int | None) -> tuple[str | None, str | None]:
    return (
        None if tenant_id is None else str(tenant_id),
        None if user_id is None else str(user_id),
    )


def _not_initialised(call: str) -> None:
    # Nothing is cached without a layer either, but a test or a service that forgot
    # init_cache() would otherwise believe its routes are cached and invalidated.
    logger.warning(
        "%s: init_cache() has not run, nothing is cached or removed; "
        "run it in the app's lifespan (in tests: `with TestClient(app)` runs the lifespan)",
        call,
    )
