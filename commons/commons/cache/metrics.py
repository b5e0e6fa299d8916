"""Prometheus metrics of the cache (needs the ``metrics`` extra: ``prometheus-client``).

``init_cache()`` attaches :class:`PrometheusEvents` by default when ``prometheus_client`` can be
imported, so a service only has to expose them: ``app.include_router(metrics_router())`` serves
:func:`exposition_registry` at ``/metrics``. ``init_cache(events=...)`` chooses other hooks
instead.

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
  ``invalidate_namespace()`` and the entries they removed (on Redis, removed in the background
  after the call returned, counted when each removal ends).
- ``removals_pending``: background removals of invalidated entries waiting or running (their
  invalidations already hold; see ``background_removal.py``).
- ``backend_state{state}``: 1 for the current state (``redis``, ``memory``, ``degraded``,
  ``disabled``), 0 for the others.
- ``operation_duration_seconds{namespace,operation}``: a histogram of the time reads (``get``)
  and writes (``set``) spent on Redis. The in-memory tier's (a dictionary lookup, well under a
  microsecond) are not sampled.
- ``near_hits_total{namespace}``: reads from Redis answered by the near cache (no command sent);
  they are hits in ``hits_total`` too.
- ``near_invalidations_total``: invalidation messages Redis sent the near cache.
- ``near_entries`` and ``near_bytes``: what the near cache holds, entries and the bytes they are
  counted as against ``CACHE_NEAR_CACHE_MAX_BYTES`` (a cluster's primaries' near caches and the
  live workers' together), updated every third of ``CACHE_NEAR_CACHE_MAX_AGE_SECONDS``.
- ``near_flushes_total{reason}``: times the near cache was emptied, by reason (``tracking_lost``,
  ``silence``, ``reader_lost``, ``diverged``, ``server_flush``, ``clear``, ``moved``: see
  ``backends/redis/near_tracking.FlushReason``).

Several worker processes (``uvicorn --workers``, gunicorn): with ``PROMETHEUS_MULTIPROC_DIR`` set
before ``prometheus_client`` is first imported, every series is kept in that directory's files and
:func:`exposition_registry` adds up every process's, so ``/metrics`` answers the same totals
whichever worker serves it. ``backend_state`` then counts the live workers in each state.
"""

from __future__ import annotations

import atexit
import functools
import glob
import os
import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from fastapi import APIRouter, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from commons.cache.events import CacheEvents, LookupOutcome
from commons.cache.status import CacheState

__all__ = [
    "DURATION_BUCKETS",
    "PrometheusEvents",
    "exposition_registry",
    "metrics_router",
    "multiprocess_mode",
]

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

#: The counter each lookup outcome feeds, and the ``reason`` label of the bypasses.
_LOOKUP_SERIES: dict[str, tuple[str, str | None]] = {
    LookupOutcome.HIT: ("hits", None),
    LookupOutcome.STALE: ("stale_hits", None),
    LookupOutcome.MISS: ("misses", None),
    LookupOutcome.BYPASS_NO_IDENTITY: ("bypasses", "no_identity"),
    LookupOutcome.BYPASS_DISABLED: ("bypasses", "disabled"),
    LookupOutcome.BYPASS_CLIENT: ("bypasses", "client_policy"),
}
_LOOKUP_HELP = {
    "hits": "Requests answered from the cache.",
    "stale_hits": (
        "Requests answered from an expired entry kept by stale_ttl while it is refreshed."
    ),
    "misses": "Requests whose entry was missing: the handler ran.",
    "bypasses": (
        "Requests served without reading the cache, by reason "
        "(no_identity, disabled, client_policy)."
    ),
}


def _lookup_labels(name: str) -> list[str]:
    return ["namespace", "reason"] if name == "bypasses" else ["namespace"]


def _lookup_series(outcome: str, namespace: str) -> tuple[str, list[str]]:
    """The series a lookup outcome counts in, and its label values."""
    name, reason = _LOOKUP_SERIES[outcome]
    return name, [namespace] if reason is None else [namespace, reason]


_DURATION_HELP = "Time reads and writes spent on Redis."
_NEAR_HITS_HELP = "Reads from Redis answered by the near cache, with no command sent."
_DURATION_LABELS = ["namespace", "operation"]


def multiprocess_mode() -> bool:
    """Whether ``prometheus_client`` keeps values in ``PROMETHEUS_MULTIPROC_DIR`` files.

    ``prometheus_client`` decides once, when it is first imported; setting the variable later
    changes nothing, so this asks its value class rather than the environment.
    """
    return values.ValueClass is not values.MutexValue


def exposition_registry() -> CollectorRegistry:
    """The registry a ``/metrics`` endpoint exposes.

    The default registry in one process. In multiprocess mode, a fresh registry whose collector
    adds up the files of every process, live or dead, so that counters and histograms are the
    whole service's totals whichever worker answers the scrape.
    """
    if not multiprocess_mode():
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def metrics_router(path: str = "/metrics") -> APIRouter:
    """A router that serves :func:`exposition_registry` as Prometheus text at ``path``:
    ``app.include_router(metrics_router())``. Left out of the OpenAPI schema; protect it as the
    service's other operational routes are (it holds namespaces, never ids or keys)."""
    router = APIRouter()

    @router.get(path, include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(exposition_registry()), media_type=CONTENT_TYPE_LATEST)

    return router


class _RequestPath(Protocol):
    """Counts the events of every cached request: a lookup outcome, a Redis duration, a near
    hit."""

    def lookup(self, namespace: str, outcome: str) -> None: ...

    def timed(self, namespace: str, operation: str, seconds: float) -> None: ...

    def near_hit(self, namespace: str) -> None: ...


class _RequestPathCollector(Collector):
    """The series every cached request touches, counted in plain numbers, exposed when scraped.

    ``prometheus_client``'s own counters and histograms cost a hit several microseconds each
    (label resolution, a lock and a value object per sample); a hit's whole budget is tens of
    microseconds. Here an event is a dictionary update under one lock, and the exposition is
    built from those numbers at scrape time, in the same series and types. One process only: in
    multiprocess mode :class:`_MultiprocessRequestPath` takes its place.
    """

    def __init__(self) -> None:
        #: Held while the numbers below change or are read.
        self.lock = threading.Lock()
        #: (outcome, namespace) -> requests.
        self.lookups: dict[tuple[str, str], int] = {}
        #: (operation, namespace) -> per bucket counts (the last one is +Inf), and their sum.
        self.durations: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
        #: namespace -> reads answered by the near cache.
        self.near_hits: dict[str, int] = {}

    # The events of the request path take the lock with acquire() and release(): a ``with``
    # statement costs every request two bound-method objects (its __enter__ and __exit__).

    def lookup(self, namespace: str, outcome: str) -> None:
        key = (outcome, namespace)
        self.lock.acquire()
        try:
            self.lookups[key] = self.lookups.get(key, 0) + 1
        finally:
            self.lock.release()

    def timed(self, namespace: str, operation: str, seconds: float) -> None:
        key = (operation, namespace)
        self.lock.acquire()
        try:
            series = self.durations.get(key)
            if series is None:
                series = self.durations[key] = ([0] * (len(DURATION_BUCKETS) + 1), [0.0])
            series[0][bisect_left(DURATION_BUCKETS, seconds)] += 1
            series[1][0] += seconds
        finally:
            self.lock.release()

    def near_hit(self, namespace: str) -> None:
        self.lock.acquire()
        try:
            self.near_hits[namespace] = self.near_hits.get(namespace, 0) + 1
        finally:
            self.lock.release()

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            lookups = dict(self.lookups)
            durations = {
                key: (list(counts), total[0]) for key, (counts, total) in self.durations.items()
            }
            near_hits = dict(self.near_hits)
        families: dict[str, CounterMetricFamily] = {}
        for name, help_text in _LOOKUP_HELP.items():
            families[name] = CounterMetricFamily(
                f"commons_cache_{name}", help_text, labels=_lookup_labels(name)
            )
        for (outcome, namespace), count in sorted(lookups.items()):
            name, label_values = _lookup_series(outcome, namespace)
            families[name].add_metric(label_values, count)
        yield from families.values()
        histogram = HistogramMetricFamily(
            "commons_cache_operation_duration_seconds", _DURATION_HELP, labels=_DURATION_LABELS
        )
        bounds = [*(str(float(bound)) for bound in DURATION_BUCKETS), "+Inf"]
        for (operation, namespace), (counts, total) in sorted(durations.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(bounds, counts, strict=True):
                cumulative += count
                buckets.append((bound, float(cumulative)))
            histogram.add_metric([namespace, operation], buckets, total)
        yield histogram
        near = CounterMetricFamily("commons_cache_near_hits", _NEAR_HITS_HELP, labels=["namespace"])
        for namespace, count in sorted(near_hits.items()):
            near.add_metric([namespace], count)
        yield near


class _MultiprocessRequestPath:
    """The same series as ``prometheus_client`` metrics, whose values live in the files of
    ``PROMETHEUS_MULTIPROC_DIR``: numbers kept in a process's memory would reach only the scrapes
    that process happens to answer. A sample costs a few microseconds more; the labelled child of
    each series is kept, so that labels are resolved once.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counters = {
            name: Counter(
                f"commons_cache_{name}", help_text, _lookup_labels(name), registry=registry
            )
            for name, help_text in _LOOKUP_HELP.items()
        }
        self._histogram = Histogram(
            "commons_cache_operation_duration_seconds",
            _DURATION_HELP,
            _DURATION_LABELS,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._near_hits = Counter(
            "commons_cache_near_hits_total", _NEAR_HITS_HELP, ["namespace"], registry=registry
        )
        self._lookups: dict[tuple[str, str], Counter] = {}
        self._durations: dict[tuple[str, str], Histogram] = {}
        self._near_hits_by_namespace: dict[str, Counter] = {}

    def lookup(self, namespace: str, outcome: str) -> None:
        child = self._lookups.get((outcome, namespace))
        if child is None:
            name, label_values = _lookup_series(outcome, namespace)
            # Two threads may both get here: labels() hands both the same child.
            child = self._lookups[(outcome, namespace)] = self._counters[name].labels(*label_values)
        child.inc()

    def timed(self, namespace: str, operation: str, seconds: float) -> None:
        child = self._durations.get((operation, namespace))
        if child is None:
            child = self._durations[(operation, namespace)] = self._histogram.labels(
                namespace, operation
            )
        child.observe(seconds)

    def near_hit(self, namespace: str) -> None:
        child = self._near_hits_by_namespace.get(namespace)
        if child is None:
            child = self._near_hits_by_namespace[namespace] = self._near_hits.labels(namespace)
        child.inc()


def _forget_dead_processes() -> None:
    """Drops the state gauges of processes that are gone (a worker killed and replaced), so that
    ``backend_state`` counts live workers only. Their counters stay: totals include what dead
    workers counted. This process drops its own when it exits.
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = path[: -len(".db")].rpartition("_")[2]
        if pid.isdigit() and not _running(int(pid)):
            mark_process_dead(int(pid), directory)  # type: ignore[no-untyped-call]
    atexit.register(mark_process_dead, os.getpid(), directory)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass(frozen=True, slots=True)
class _Collectors:
    request_path: _RequestPath
    backend_errors: Counter
    invalidations: Counter
    invalidated_entries: Counter
    rejected_entries: Counter
    stale_on_error: Counter
    state: Gauge
    start_flushes: Counter
    near_invalidations: Counter
    near_flushes: Counter
    removals_pending: Gauge
    near_entries: Gauge
    near_bytes: Gauge


@functools.cache
def _collectors(registry: CollectorRegistry) -> _Collectors:
    """The collectors of ``registry``, registered there on first use only."""
    request_path: _RequestPath
    if multiprocess_mode():
        _forget_dead_processes()
        request_path = _MultiprocessRequestPath(registry)
    else:
        request_path = collector = _RequestPathCollector()
        registry.register(collector)
    return _Collectors(
        request_path=request_path,
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
        rejected_entries=Counter(
            "commons_cache_rejected_entries_total",
            "Stored values not served: not this cache's format, or another route version's.",
            ["namespace", "reason"],
            registry=registry,
        ),
        stale_on_error=Counter(
            "commons_cache_stale_if_error_total",
            "Stale entries served because computing a fresh answer failed (stale_if_error).",
            ["namespace"],
            registry=registry,
        ),
        state=_live_sum(
            "commons_cache_backend_state",
            "1 for the current state (redis, memory, degraded, disabled), 0 for the others; "
            "with several worker processes, the number of live workers in each state.",
            registry,
            labels=["state"],
        ),
        start_flushes=Counter(
            "commons_cache_start_flushes_total",
            "Flushes of the whole prefix kept by a start while Redis did not answer, without an "
            "invalidation journal (CACHE_FLUSH_AFTER_DEGRADED_START).",
            registry=registry,
        ),
        near_invalidations=Counter(
            "commons_cache_near_invalidations_total",
            "Invalidation messages Redis sent the near cache.",
            registry=registry,
        ),
        near_flushes=Counter(
            "commons_cache_near_flushes_total",
            "Times the near cache was emptied, by reason.",
            ["reason"],
            registry=registry,
        ),
        removals_pending=_live_sum(
            "commons_cache_removals_pending",
            "Background removals of invalidated entries waiting or running.",
            registry,
        ),
        near_entries=_live_sum(
            "commons_cache_near_entries", "Entries the near cache holds.", registry
        ),
        near_bytes=_live_sum(
            "commons_cache_near_bytes",
            "Bytes the near cache's entries are counted as against CACHE_NEAR_CACHE_MAX_BYTES.",
            registry,
        ),
    )


def _live_sum(
    name: str, documentation: str, registry: CollectorRegistry, labels: Sequence[str] = ()
) -> Gauge:
    """A gauge of one process's figure: with several workers, the live workers' added up (a
    dead worker's does not linger)."""
    return Gauge(name, documentation, labels, registry=registry, multiprocess_mode="livesum")


class PrometheusEvents(CacheEvents):
    """Counts the cache's events in Prometheus collectors.

    Args:
        registry: Where the collectors live; the process-wide default registry unless given.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._metrics = _collectors(registry if registry is not None else REGISTRY)
        self._request_path = self._metrics.request_path
        #: What each near cache of this process reported holding last: (entries, bytes).
        self._near_held: dict[int, tuple[int, int]] = {}
        for state in CacheState:
            # Every state is a series from the start, so a dashboard never sees a gap.
            self._metrics.state.labels(state=state.value)

    def lookup(self, namespace: str, outcome: str) -> None:
        if outcome in _LOOKUP_SERIES:
            self._request_path.lookup(namespace, outcome)

    def backend_error(self, namespace: str, operation: str) -> None:
        self._metrics.backend_errors.labels(namespace=namespace, operation=operation).inc()

    def invalidated(self, namespace: str, removed: int) -> None:
        self._metrics.invalidations.labels(namespace=namespace).inc()
        self._metrics.invalidated_entries.labels(namespace=namespace).inc(max(removed, 0))

    def removed_in_background(self, namespace: str, removed: int) -> None:
        self._metrics.invalidated_entries.labels(namespace=namespace).inc(max(removed, 0))

    def removals_pending(self, count: int) -> None:
        self._metrics.removals_pending.set(count)

    def near_cache_held(self, near_cache: int, entries: int, bytes_held: int) -> None:
        held = self._near_held
        if entries or bytes_held:
            held[near_cache] = (entries, bytes_held)
        else:
            held.pop(near_cache, None)
        self._metrics.near_entries.set(sum(entries for entries, _ in held.values()))
        self._metrics.near_bytes.set(sum(counted for _, counted in held.values()))

    def rejected_entry(self, namespace: str, reason: str) -> None:
        self._metrics.rejected_entries.labels(namespace=namespace, reason=reason).inc()

    def served_stale_on_error(self, namespace: str) -> None:
        self._metrics.stale_on_error.labels(namespace=namespace).inc()

    def state_changed(self, state: str) -> None:
        for each in CacheState:
            self._metrics.state.labels(state=each.value).set(1 if each.value == state else 0)

    def start_flush_kept(self) -> None:
        self._metrics.start_flushes.inc()

    def timed(self, namespace: str, operation: str, seconds: float) -> None:
        self._request_path.timed(namespace, operation, seconds)

    def near_cache_hit(self, namespace: str) -> None:
        self._request_path.near_hit(namespace)

    def near_cache_invalidation(self, keys: int) -> None:
        self._metrics.near_invalidations.inc()

    def near_cache_flushed(self, reason: str) -> None:
        self._metrics.near_flushes.labels(reason=reason).inc()
