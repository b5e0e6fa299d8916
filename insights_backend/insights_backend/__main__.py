"""``python -m insights_backend``: serves the app with uvicorn on 127.0.0.1:8000.

``HOST`` and ``PORT`` override the address, ``LOGGING_LEVEL`` the log level (``DEBUG`` shows one
``commons.cache`` line per cached request, with its key and HIT or MISS). A ``.env`` file in the
working directory is read first; ``CACHE_PREFIX`` defaults to ``ib-cache``.
"""

from __future__ import annotations

import logging

import uvicorn

from insights_backend.config import ServiceSettings, apply_service_environment


def main() -> None:
    """Applies the service's environment defaults, then runs the server until interrupted."""
    # Before anything reads settings: the cache's settings load when the routes are imported.
    apply_service_environment()
    settings = ServiceSettings()
    logging.basicConfig(
        level=settings.LOGGING_LEVEL, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    # At DEBUG the database driver logs every statement, drowning the cache's HIT/MISS lines.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, logging.getLogger().level))
    from insights_backend.app import app

    uvicorn.run(
        app,
        host=settings.HOST,
        port=settings.PORT,
        log_level=settings.LOGGING_LEVEL.lower(),
    )


if __name__ == "__main__":
    main()
