"""The service's own settings, and the cache defaults that make it this service.

The cache reads its settings (``CACHE_PREFIX``, ``REDIS_URL``, ...) from the environment through
``commons.cache.cache_settings()``. This service's defaults are applied to the environment, without
overriding anything already set, by :func:`apply_service_environment` in the entry points, before
any settings load: a ``.env`` file in the working directory first, then ``CACHE_PREFIX=ib-cache``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from dotenv import load_dotenv
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "DEVELOPMENT_JWT_SECRET",
    "SERVICE_CACHE_PREFIX",
    "ServiceSettings",
    "apply_service_environment",
]

#: The cache prefix of this service's keys, unless ``CACHE_PREFIX`` says otherwise.
SERVICE_CACHE_PREFIX = "ib-cache"

#: Signs development tokens when ``JWT_SECRET`` is unset. Never use it anywhere real: the service
#: logs a warning at start-up when it is in use.
DEVELOPMENT_JWT_SECRET = "insights-backend-development-secret-do-not-deploy"  # noqa: S105

LogLevel = Literal["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"]


class ServiceSettings(BaseSettings):
    """Settings of insights_backend; each field reads the environment variable of the same name."""

    # hide_input_in_errors: a refusal's text never carries what was given (JWT_SECRET).
    model_config = SettingsConfigDict(
        case_sensitive=True, extra="ignore", frozen=True, hide_input_in_errors=True
    )

    DATABASE_URL: str = Field(
        default="sqlite+aiosqlite:///./insights.db",
        description="SQLAlchemy async URL of the database; created and seeded when empty.",
    )
    JWT_SECRET: str = Field(
        default=DEVELOPMENT_JWT_SECRET,
        min_length=32,
        description="HS256 secret that bearer tokens are verified with.",
    )
    LOGGING_LEVEL: LogLevel = Field(
        default="INFO", description="Log level; DEBUG shows the cache's HIT/MISS line per request."
    )
    HOST: str = Field(default="127.0.0.1", description="Address the server listens on.")
    PORT: int = Field(default=8000, ge=1, le=65535, description="Port the server listens on.")
    WORKERS: int = Field(
        default=1,
        ge=1,
        description="Worker processes of python -m insights_backend (uvicorn --workers).",
    )

    @field_validator("LOGGING_LEVEL", mode="before")
    @classmethod
    def _level_in_any_case(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @property
    def uses_development_secret(self) -> bool:
        return self.JWT_SECRET == DEVELOPMENT_JWT_SECRET


def apply_service_environment(env_file: Path = Path(".env")) -> None:
    """Loads ``env_file`` if present and defaults ``CACHE_PREFIX`` to ``ib-cache``.

    Variables already set in the environment always win.
    """
    if env_file.is_file():
        load_dotenv(env_file, override=False)
    os.environ.setdefault("CACHE_PREFIX", SERVICE_CACHE_PREFIX)
