"""Test helpers shared by the services: real Redis servers, started and stopped by the tests.

``current_layer()`` is the testing-only door to the running cache layer (what ``init_cache()``
built), for tests that inspect or age what the cache holds; services use the public API of
``commons.cache`` instead.
"""

from commons.cache.lifecycle import current_layer

__all__ = ["current_layer"]
