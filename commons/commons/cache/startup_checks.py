"""Mistakes a service can only be told about once it starts: ``init_cache()`` looks for them.

Each is one warning naming the route or variable and the fix; none stops the service.

- ``@cache`` written above ``@app.get(...)``: FastAPI registered the undecorated handler, so the
  route is never cached. The decorator records the handlers it wraps and their wrappers
  (:func:`record_wrapper`); a route whose endpoint is such a handler, while no route serves any
  of its wrappers, has them in the wrong order (one function mounted twice, uncached and cached,
  is not). Routes are found among the objects the garbage collector tracks, once per start (a
  few milliseconds; routes frozen by ``gc.freeze()`` before ``init_cache()`` are not seen).
- Several uvicorn workers without ``PROMETHEUS_MULTIPROC_DIR``: each worker counts alone, and
  ``/metrics`` shows whichever worker answers. The worker count is read where uvicorn reads it
  (``--workers`` on its command line, else ``WEB_CONCURRENCY``).
- Several uvicorn workers on the in-memory backend (no ``REDIS_URL``): each worker caches apart,
  and an invalidation reaches only the worker that makes it, so the others answer what it
  replaced until it expires.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import weakref
from contextlib import suppress
from pathlib import Path

from fastapi.routing import APIRoute

__all__ = ["record_wrapper", "warn_about_mistakes"]

logger = logging.getLogger("commons.cache")

#: The handlers ``@cache`` wrapped, and their wrappers (both held weakly: an app's routes and
#: handlers come and go, in tests above all).
_WRAPPERS: weakref.WeakKeyDictionary[object, weakref.WeakSet[object]] = weakref.WeakKeyDictionary()


def record_wrapper(handler: object, wrapper: object) -> None:
    """Records that ``@cache`` wrapped ``handler`` into ``wrapper``."""
    with suppress(TypeError):  # a callable that cannot be referred to weakly: not checked
        _WRAPPERS.setdefault(handler, weakref.WeakSet()).add(wrapper)


def warn_about_mistakes(*, metrics: bool, memory_only: bool) -> None:
    """Logs one warning per mistake found (see the module docstring); ``memory_only``: the cache
    is enabled with no ``REDIS_URL``."""
    routes = _routes()
    served = {id(route.endpoint) for route in routes}
    for route in routes:
        wrappers = _wrappers_of(route.endpoint)
        if wrappers is not None and not any(id(wrapper) in served for wrapper in wrappers):
            methods = ",".join(sorted(route.methods or ()))
            logger.warning(
                "@cache on %s %s is above the route decorator: FastAPI serves the undecorated "
                "handler and the route is never cached; put @cache below @app.%s(...)",
                methods,
                route.path,
                (sorted(route.methods or ("get",))[0]).lower(),
            )
    if metrics and "PROMETHEUS_MULTIPROC_DIR" not in os.environ and _uvicorn_workers() > 1:
        logger.warning(
            "%d uvicorn workers without PROMETHEUS_MULTIPROC_DIR: /metrics shows the counts "
            "of whichever worker answers; set it to an empty directory private to the service "
            "in the environment that starts uvicorn",
            _uvicorn_workers(),
        )
    if memory_only and _uvicorn_workers() > 1:
        logger.warning(
            "%d uvicorn workers on the in-memory cache (REDIS_URL is not set): each worker caches "
            "apart, and an invalidation reaches only the worker that makes it, so the others "
            "answer what it replaced until it expires; set REDIS_URL, or CACHE_ENABLED=false, "
            "or run one worker",
            _uvicorn_workers(),
        )


def _wrappers_of(endpoint: object) -> list[object] | None:
    """The wrappers ``@cache`` made of ``endpoint``; ``None`` if it wrapped none."""
    try:
        wrappers = _WRAPPERS.get(endpoint)
    except TypeError:
        return None
    return None if wrappers is None else list(wrappers)


def _routes() -> list[APIRoute]:
    # type(), not isinstance(): isinstance asks a weakref proxy for its __class__, which raises
    # once its referent is gone (and any object may be on the heap).
    return [item for item in gc.get_objects() if issubclass(type(item), APIRoute)]


def _uvicorn_workers() -> int:
    """How many workers the uvicorn that started this process runs (1 if none started it)."""
    if multiprocessing.parent_process() is None:
        return 1  # uvicorn spawns its workers: a process nobody spawned is the only one
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        raw = b""
    arguments = [part.decode(errors="replace") for part in raw.split(b"\0")]
    for index, argument in enumerate(arguments):
        if argument.startswith("--workers="):
            return _count(argument.partition("=")[2])
        if argument == "--workers" and index + 1 < len(arguments):
            return _count(arguments[index + 1])
    if any(argument == "--reload" for argument in arguments):
        return 1
    return _count(os.environ.get("WEB_CONCURRENCY", "1"))


def _count(text: str) -> int:
    return int(text) if text.isdigit() else 1
