"""``python -m insights_backend``: serves the app with uvicorn on 127.0.0.1:8000.

``HOST`` and ``PORT`` override the address, ``WORKERS`` the number of worker processes (default 1),
``LOGGING_LEVEL`` the log level (``DEBUG`` shows one ``commons.cache`` line per cached request,
with its key and HIT or MISS). A ``.env`` file in the working directory is read first;
``CACHE_PREFIX`` defaults to ``ib-cache``.

Metrics of several workers: with ``PROMETHEUS_MULTIPROC_DIR`` set, every worker keeps its metrics
in files there and ``/metrics`` adds them up; the directory's ``*.db`` files are removed at
start-up (left over from an earlier run they would be counted again). With ``WORKERS`` above 1
and the variable unset, a fresh private temporary directory is used and removed on exit.

Several workers need ``REDIS_URL``: without it each worker would keep its own in-memory cache,
and an invalidation made by the worker that answered a PUT would never reach the others, which
would go on serving the old answer. The service refuses to start rather than serve stale data.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import ValidationError

from commons.cache import CacheSettings
from insights_backend.config import ServiceSettings, apply_service_environment
from insights_backend.database import open_database

#: What each worker process imports and serves.
APP = "insights_backend.app:app"
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging set-up plus the service's own lines at ``level``.

    Given to uvicorn rather than applied here, so that every worker process applies it too.
    """
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["service"] = {
        "format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    }
    config["handlers"]["service"] = {
        "class": "logging.StreamHandler",
        "formatter": "service",
        "stream": "ext://sys.stderr",
    }
    config["root"] = {"level": level, "handlers": ["service"]}
    # At DEBUG the database driver logs every statement, drowning the cache's HIT/MISS lines.
    aiosqlite_level = max(logging.INFO, logging.getLevelName(level))
    config["loggers"]["aiosqlite"] = {"level": logging.getLevelName(aiosqlite_level)}
    return config


@contextmanager
def metrics_directory(workers: int) -> Iterator[None]:
    """Prepares ``PROMETHEUS_MULTIPROC_DIR`` for the workers' metrics, before any of them starts.

    A directory given in the environment is created if missing and emptied of metric files; with
    several workers and none given, a fresh private one is made for this run and removed after.
    Must run before ``prometheus_client`` is imported: it reads the variable once, on import.
    """
    configured = os.environ.get(MULTIPROC_DIR)
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
        yield
        return
    if workers == 1:
        yield
        return
    private = tempfile.mkdtemp(prefix="insights-backend-metrics-")
    os.environ[MULTIPROC_DIR] = private
    try:
        yield
    finally:
        del os.environ[MULTIPROC_DIR]
        shutil.rmtree(private, ignore_errors=True)


async def prepare_database(url: str) -> None:
    """Creates and seeds the database once, before any worker starts.

    Each worker's lifespan does it too, but two workers seeding an empty database at the same time
    collide, and one of them fails to start.
    """
    async with open_database(url):
        pass


def workers_refusal(workers: int, cache: CacheSettings) -> str | None:
    """Why ``workers`` processes cannot serve with these cache settings, if they cannot."""
    if workers == 1 or not cache.CACHE_ENABLED or cache.REDIS_URL is not None:
        return None
    return (
        f"WORKERS={workers} needs REDIS_URL: each worker would keep its own in-memory cache and "
        "never see the others' invalidations (set REDIS_URL, or CACHE_ENABLED=false, or run "
        "WORKERS=1)"
    )


def main() -> None:
    """Applies the service's environment defaults, then runs the server until interrupted."""
    # Before anything reads settings: the cache's settings load when the routes are imported.
    apply_service_environment()
    try:
        settings = ServiceSettings()
        cache = CacheSettings()
    except ValidationError as error:
        raise SystemExit(f"insights_backend: invalid settings: {error}") from None
    refusal = workers_refusal(settings.WORKERS, cache)
    if refusal is not None:
        raise SystemExit(f"insights_backend: {refusal}")
    if settings.WORKERS > 1:
        asyncio.run(prepare_database(settings.DATABASE_URL))
    with metrics_directory(settings.WORKERS):
        uvicorn.run(
            APP,
            host=settings.HOST,
            port=settings.PORT,
            workers=settings.WORKERS,
            log_config=log_config(settings.LOGGING_LEVEL),
            log_level=settings.LOGGING_LEVEL.lower(),
        )


if __name__ == "__main__":
    main()
