"""commons.cache: the multi-tenant response cache shared by the FastAPI services.

Import everything from here::

    from commons.cache import cache, init_cache, close_cache, invalidate_namespace, invalidate_tags

``invalidate_namespace()`` is re-exported here as the guide describes; it and
``invalidate_tags()`` live in ``invalidation.py``.
"""

# Loaded first: importing a submodule binds it as an attribute of its package, so this module,
# which the caching guide names ``commons.cache.cache``, must be bound before the decorator
# takes its name below (see ``cache.py``).
import commons.cache.cache as _backend_selection
from commons.cache.decorator import cache
from commons.cache.errors import (
    BackendError,
    BackendRejectedError,
    BackendUnavailableError,
    CacheError,
    CacheUnavailableError,
)
from commons.cache.events import CacheEvents, LookupOutcome
from commons.cache.invalidation import invalidate_namespace, invalidate_tags
from commons.cache.keys import (
    global_cache_key_builder,
    tenant_cache_key_builder,
    tenant_user_cache_key_builder,
)
from commons.cache.lifecycle import cache_status, close_cache, init_cache
from commons.cache.middleware import PrivateCacheControlMiddleware
from commons.cache.settings import CacheSettings, cache_settings
from commons.cache.status import CacheState, CacheStatus

del _backend_selection

__all__ = [
    "BackendError",
    "BackendRejectedError",
    "BackendUnavailableError",
    "CacheError",
    "CacheEvents",
    "CacheSettings",
    "CacheState",
    "CacheStatus",
    "CacheUnavailableError",
    "LookupOutcome",
    "PrivateCacheControlMiddleware",
    "cache",
    "cache_settings",
    "cache_status",
    "close_cache",
    "global_cache_key_builder",
    "init_cache",
    "invalidate_namespace",
    "invalidate_tags",
    "tenant_cache_key_builder",
    "tenant_user_cache_key_builder",
]
