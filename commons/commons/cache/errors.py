"""The cache's exceptions.

Tree::

    CacheError
    ├── CacheUnavailableError      init_cache() with CACHE_FAIL_FAST=true and Redis not answering
    └── BackendError               a backend operation failed; never reaches a request handler
        ├── BackendUnavailableError    Redis cannot be reached in time (refused, timeout, auth),
        │                              or cannot serve the command (CLUSTERDOWN, no node answers)
        ├── BackendBusyError           every pooled connection is in use (a burst, not an outage)
        │   └── BackendMovingError     a cluster slot is moving between nodes (a resharding)
        └── BackendRejectedError       Redis answered but refused the command (OOM, READONLY)

Configuration mistakes are :class:`pydantic.ValidationError` from :class:`CacheSettings`, raised
when the settings load. Backend errors are translated from redis-py and OS errors, those of the
cluster client included (which do not derive from ``RedisError``), in exactly one place
(``backends/redis/translation.py``); the layer above decides what a failure means.
"""

from __future__ import annotations

__all__ = [
    "BackendBusyError",
    "BackendError",
    "BackendMovingError",
    "BackendRejectedError",
    "BackendUnavailableError",
    "BackendUnconfirmedError",
    "CacheError",
    "CacheUnavailableError",
]


class CacheError(Exception):
    """Base of every exception the cache raises."""


class CacheUnavailableError(CacheError):
    """Redis is configured but did not answer at start-up, and CACHE_FAIL_FAST is true."""


class BackendError(CacheError):
    """A backend operation failed."""


class BackendUnavailableError(BackendError):
    """The backend could not be reached in time (refused, timed out, or refused our credentials),
    or cannot serve any command of the slot right now (a cluster that lost a shard)."""


class BackendUnconfirmedError(BackendUnavailableError):
    """The master applied an invalidation that no replica confirmed in time (``WAIT``): a
    failover could lose it, so it is kept and applied again; the master itself answers."""


class BackendBusyError(BackendError):
    """Every connection of the client's pool is in use: this process is busy, Redis is not down."""


class BackendMovingError(BackendBusyError):
    """A Redis Cluster slot is moving to another node and the command's redirects (``ASK``,
    ``MOVED``, ``TRYAGAIN``) did not settle: transient, as a busy pool is, and no outage."""


class BackendRejectedError(BackendError):
    """The backend answered but refused the command: out of memory, read-only replica, ..."""
