"""Prometheus metrics of the cache (needs the ``metrics`` extra: ``prometheus-client``).

``init_cache()`` attaches :class:`PrometheusEvents` by default when ``prometheus_client`` can be
imported, so a service only has to expose the default registry (mount
``prometheus_client.make_asgi_app()`` at ``/metrics``). ``init_cache(events=...)`` chooses other
hooks instead.

The collectors are created once per registry and process, however often ``init_cache()`` runs;
every :class:`PrometheusEvents` feeds the same series. Labels are bounded: the namespace given to
``@cache``, an outcome, an operation or a state, never a tenant id, a user id or a key, so the
number of series does not grow with traffic.

Series (all prefixed ``commons_cache_``):

- ``hits_total{namespace}``, ``misses_total{namespace}``: lookups by cached routes.
- ``stale_hits_total{namespace}``: requests answered from an expired entry kept by ``stale_ttl``
  while one background refresh runs (not counted in ``hits_total``).
- ``bypasses_total{namespace,reason}``: requests served without the cache; ``reason`` is
  ``no_identity`` (no tenant or user to build a key from), ``disabled`` (``CACHE_ENABLED=false``)
  or ``client_policy`` (the client's ``Cache-Control``, with ``CACHE_HONOR_CLIENT_NO_CACHE``).
- ``backend_errors_total{namespace,operation}``: failed backend operations that the layer absorbed
  (``get``, ``set``, ``delete``, ``invalidate``, ``lock``, ``unlock``).
- ``invalidations_total{namespace}`` and ``invalidated_entries_total{namespace}``: calls of
  ``invalidate_namespace()`` and the entries they removed.
- ``backend_state{state}``: 1 for the current state (``redis``, ``memory``, ``degraded``,
  ``disabled``), 0 for the others.
- ``operation_duration_seconds{namespace,operation}``: a histogram of the time spent in the cache
  layer for reads (``get``) and writes (``set``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from commons.cache.events import CacheEvents, LookupOutcome
from commons.cache.status import CacheState

__all__ = ["DURATION_BUCKETS", "PrometheusEvents"]

#: Buckets of ``commons_cache_operation_duration_seconds``: a Redis round trip on a LAN takes a few
#: hundred microseconds, and the default timeouts cap an operation near a second.
DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

_BYPASS_REASONS = {
    LookupOutcome.BYPASS_NO_IDENTITY: "no_identity",
    LookupOutcome.BYPASS_DISABLED: "disabled",
    LookupOutcome.BYPASS_CLIENT: "client_policy",
}


@dataclass(frozen=True, slots=True)
class _Collectors:
    hits: Counter
    stale_hits: Counter
    misses: Counter
    bypasses: Counter
    backend_errors: Counter
    invalidations: Counter
    invalidated_entries: Counter
    state: Gauge
    duration: Histogram


@functools.cache
def _collectors(registry: CollectorRegistry) -> _Collectors:
    """The collectors of ``registry``, registered there on first use only."""
    return _Collectors(
        hits=Counter(
            "commons_cache_hits_total",
            "Requests answered from the cache.",
            ["namespace"],
            registry=registry,
        ),
        stale_hits=Counter(
            "commons_cache_stale_hits_total",
            "Requests answered from an expired entry kept by stale_ttl while it is refreshed.",
            ["namespace"],
            registry=registry,
        ),
        misses=Counter(
            "commons_cache_misses_total",
            "Requests whose entry was missing: the handler ran.",
            ["namespace"],
            registry=registry,
        ),
        bypasses=Counter(
            "commons_cache_bypasses_total",
            "Requests served without reading the cache, by reason "
            "(no_identity, disabled, client_policy).",
            ["namespace", "reason"],
            registry=registry,
        ),
        backend_errors=Counter(
            "commons_cache_backend_errors_total",
            "Backend operations that failed and were absorbed, by operation.",
            ["namespace", "operation"],
            registry=registry,
        ),
        invalidations=Counter(
            "commons_cache_invalidations_total",
            "Invalidations of a namespace (whole, one tenant or one user).",
            ["namespace"],
            registry=registry,
        ),
        invalidated_entries=Counter(
            "commons_cache_invalidated_entries_total",
            "Entries removed by invalidations.",
            ["namespace"],
            registry=registry,
        ),
        state=Gauge(
            "commons_cache_backend_state",
            "1 for the current state (redis, memory, degraded, disabled), 0 for the others.",
            ["state"],
            registry=registry,
        ),
        duration=Histogram(
            "commons_cache_operation_duration_seconds",
            "Time spent in the cache layer per operation.",
            ["namespace", "operation"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        ),
    )


class PrometheusEvents(CacheEvents):
    """Counts the cache's events in Prometheus collectors.

    Args:
        registry: Where the collectors live; the process-wide default registry unless given.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._metrics = _collectors(registry if registry is not None else REGISTRY)
        # Namespaces, outcomes and operations are few and fixed by the code: bounded memos.
        self._lookup_children: dict[tuple[str, str], Any] = {}
        self._timers: dict[tuple[str, str], Any] = {}
        for state in CacheState:
            # Every state is a series from the start, so a dashboard never sees a gap.
            self._metrics.state.labels(state=state.value)

    def lookup(self, namespace: str, outcome: str) -> None:
        # Hot path: the labelled child is looked up once per (outcome, namespace) and reused.
        child = self._lookup_children.get((outcome, namespace))
        if child is None:
            child = self._lookup_child(namespace, outcome)
            if child is None:
                return
            self._lookup_children[(outcome, namespace)] = child
        child.inc()

    def _lookup_child(self, namespace: str, outcome: str) -> Any:
        if outcome == LookupOutcome.HIT:
            return self._metrics.hits.labels(namespace=namespace)
        if outcome == LookupOutcome.STALE:
            return self._metrics.stale_hits.labels(namespace=namespace)
        if outcome == LookupOutcome.MISS:
            return self._metrics.misses.labels(namespace=namespace)
        if outcome in _BYPASS_REASONS:
            reason = _BYPASS_REASONS[outcome]
            return self._metrics.bypasses.labels(namespace=namespace, reason=reason)
        return None

    def backend_error(self, namespace: str, operation: str) -> None:
        self._metrics.backend_errors.labels(namespace=namespace, operation=operation).inc()

    def invalidated(self, namespace: str, removed: int) -> None:
        self._metrics.invalidations.labels(namespace=namespace).inc()
        self._metrics.invalidated_entries.labels(namespace=namespace).inc(max(removed, 0))

    def state_changed(self, state: str) -> None:
        for each in CacheState:
            self._metrics.state.labels(state=each.value).set(1 if each.value == state else 0)

    def timed(self, namespace: str, operation: str, seconds: float) -> None:
        child = self._timers.get((operation, namespace))
        if child is None:
            child = self._metrics.duration.labels(namespace=namespace, operation=operation)
            self._timers[(operation, namespace)] = child
        child.observe(seconds)
