"""The service's environment: prefix ib-cache by default, a .env file read, the shell winning."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from commons.cache import CacheSettings
from insights_backend.config import ServiceSettings, apply_service_environment


def test_the_cache_prefix_defaults_to_ib_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CACHE_PREFIX")

    apply_service_environment(Path("no-such-file.env"))

    assert CacheSettings().CACHE_PREFIX == "ib-cache"


def test_a_prefix_set_in_the_environment_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHE_PREFIX", "other-service")

    apply_service_environment(Path("no-such-file.env"))

    assert CacheSettings().CACHE_PREFIX == "other-service"


def test_a_dot_env_file_is_read_and_the_shell_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("CACHE_PREFIX=from-file\nCACHE_TTL_SECONDS=42\nLOGGING_LEVEL=debug\n")
    monkeypatch.delenv("CACHE_PREFIX")
    monkeypatch.setenv("CACHE_TTL_SECONDS", "7")
    monkeypatch.delenv("LOGGING_LEVEL", raising=False)  # restored (removed) after the test

    apply_service_environment(env_file)

    assert CacheSettings().CACHE_PREFIX == "from-file"
    assert CacheSettings().CACHE_TTL_SECONDS == 7
    assert ServiceSettings().LOGGING_LEVEL == "DEBUG"
    assert os.environ["LOGGING_LEVEL"] == "debug"


def test_a_short_jwt_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JWT_SECRET", "too-short")

    with pytest.raises(ValueError, match="JWT_SECRET"):
        ServiceSettings()
