"""Backend selection, where the caching guide's layout puts it: Redis with automatic fallback to
the in-memory tier, chosen by ``init_cache()`` and let go by ``close_cache()``.

``from commons.cache.cache import init_cache, close_cache`` imports them from here; the code lives
in ``lifecycle.py``. The package attribute ``commons.cache.cache`` stays the ``@cache``
decorator: ``commons/cache/__init__.py`` loads this module before it binds the decorator to that
name (see ``test_exported_members.py``).
"""

from __future__ import annotations

from commons.cache.lifecycle import cache_status, close_cache, current_layer, init_cache

__all__ = ["cache_status", "close_cache", "current_layer", "init_cache"]
