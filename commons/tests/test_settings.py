"""CacheSettings: defaults, the environment, the singleton, and bad values refused at load time."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from commons.cache import CacheSettings, cache_settings

# -- defaults and the environment -------------------------------------------------------------


def test_defaults_cache_in_memory_under_the_prefix_cache_for_five_minutes() -> None:
    settings = cache_settings()

    assert settings.CACHE_ENABLED is True
    assert settings.CACHE_PREFIX == "cache"
    assert settings.CACHE_TTL_SECONDS == 300
    assert settings.REDIS_URL is None
    assert settings.CACHE_FAIL_FAST is False


def test_the_in_memory_backend_is_bounded_by_default() -> None:
    assert cache_settings().CACHE_MEMORY_MAX_ENTRIES >= 1


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHE_ENABLED", "false")
    monkeypatch.setenv("CACHE_PREFIX", "ib-cache")
    monkeypatch.setenv("CACHE_TTL_SECONDS", "42")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6380/2")
    monkeypatch.setenv("CACHE_FAIL_FAST", "true")
    monkeypatch.setenv("CACHE_MEMORY_MAX_ENTRIES", "17")

    settings = cache_settings()

    assert settings.CACHE_ENABLED is False
    assert settings.CACHE_PREFIX == "ib-cache"
    assert settings.CACHE_TTL_SECONDS == 42
    assert settings.REDIS_URL == "redis://127.0.0.1:6380/2"
    assert settings.CACHE_FAIL_FAST is True
    assert settings.CACHE_MEMORY_MAX_ENTRIES == 17


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("1", True), ("yes", True), ("false", False), ("0", False), ("no", False)],
)
def test_usual_spellings_of_booleans_are_understood(
    monkeypatch: pytest.MonkeyPatch, text: str, expected: bool
) -> None:
    monkeypatch.setenv("CACHE_ENABLED", text)
    monkeypatch.setenv("CACHE_FAIL_FAST", text)

    settings = cache_settings()

    assert settings.CACHE_ENABLED is expected
    assert settings.CACHE_FAIL_FAST is expected


def test_settings_are_loaded_once_and_shared() -> None:
    assert cache_settings() is cache_settings()


def test_a_changed_environment_is_seen_only_after_cache_clear(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = cache_settings()
    monkeypatch.setenv("CACHE_PREFIX", "am-cache")

    assert cache_settings().CACHE_PREFIX == "cache"

    cache_settings.cache_clear()
    reloaded = cache_settings()

    assert reloaded is not before
    assert reloaded.CACHE_PREFIX == "am-cache"


def test_settings_passed_explicitly_do_not_need_the_environment() -> None:
    settings = CacheSettings(CACHE_PREFIX="sm-cache", CACHE_TTL_SECONDS=5)

    assert settings.CACHE_PREFIX == "sm-cache"
    assert settings.CACHE_TTL_SECONDS == 5


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ("enabled", "CACHE_ENABLED"),
        ("ttl_seconds", "CACHE_TTL_SECONDS"),
        ("redis_url", "REDIS_URL"),
    ],
)
def test_a_setting_passed_by_another_name_is_refused_naming_the_right_one(
    given: str, named: str
) -> None:
    with pytest.raises(ValidationError) as failure:
        CacheSettings(**{given: "x"})

    assert given in str(failure.value)
    assert named in str(failure.value)


def test_a_name_that_is_no_setting_at_all_is_refused() -> None:
    with pytest.raises(ValidationError, match="CACHE_TTL"):
        CacheSettings(CACHE_TTL=5)  # type: ignore[call-arg]


# -- bad values fail when the settings load, naming the variable --------------------------------


def load_fails_naming(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as failure:
        cache_settings()
    assert variable in str(failure.value)


@pytest.mark.parametrize("value", ["-1", "0", "abc", "1.5", "", "300s"])
def test_a_ttl_that_is_not_a_positive_integer_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    load_fails_naming(monkeypatch, "CACHE_TTL_SECONDS", value)


def test_a_bad_value_is_a_value_error_for_callers_that_catch_those(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CACHE_TTL_SECONDS", "-5")

    with pytest.raises(ValueError, match="CACHE_TTL_SECONDS"):
        cache_settings()


@pytest.mark.parametrize(
    "value",
    [
        "",
        "ib cache",
        " ib-cache",
        "ib-cache\t",
        "ib\ncache",
        "ib:cache",
        "ib-cache*",
        "ib?cache",
        "ib[cache",
        "ib]cache",
    ],
)
def test_a_prefix_that_is_empty_or_not_one_plain_word_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    load_fails_naming(monkeypatch, "CACHE_PREFIX", value)


@pytest.mark.parametrize("value", ["ib-cache", "am_cache", "cache2", "svc.cache"])
def test_plain_prefixes_are_accepted(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CACHE_PREFIX", value)

    assert value == cache_settings().CACHE_PREFIX


@pytest.mark.parametrize(
    "value",
    [
        "http://x",
        "https://redis.example.com:6379",
        "localhost:6379",
        "127.0.0.1",
        "redis://",
        "redis://:6379",
        "redis://localhost:notaport",
        "redis://localhost:99999",
        "unix://",
    ],
)
def test_a_redis_url_that_is_not_a_redis_url_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    load_fails_naming(monkeypatch, "REDIS_URL", value)


@pytest.mark.parametrize(
    "value",
    [
        "redis://localhost:6379/0?db=abc",
        "redis://localhost:6379/0?socket_timeout=abc",
        "redis://localhost:6379/0?socket_timeout=5",
        "redis://localhost:6379/0?socket_connect_timeout=5",
        "redis://localhost:6379/0?max_connections=3",
        "unix:///tmp/redis.sock?protocol=3",
        "redis://localhost:6379/0?foo=bar",
        "redis://localhost:6379/0?ssl_cert_reqs=none",
        "unix:///tmp/redis.sock?ssl_ca_certs=/ca.pem",
    ],
)
def test_a_redis_url_option_unreadable_or_overriding_a_setting_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """A URL's ``socket_timeout`` would win over ``REDIS_SOCKET_TIMEOUT_SECONDS`` silently (a
    black-holed read would wait 5 s); ``db=abc``, a typo or an option of another scheme's
    connections would fail only in ``init_cache()`` (a ``TypeError`` naming no variable)."""
    load_fails_naming(monkeypatch, "REDIS_URL", value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("REDIS_SOCKET_TIMEOUT_SECONDS", "inf"),
        ("REDIS_SOCKET_TIMEOUT_SECONDS", "1e308"),
        ("REDIS_CONNECT_TIMEOUT_SECONDS", "inf"),
        ("CACHE_LOCK_TIMEOUT_SECONDS", "inf"),
        ("CACHE_TTL_SECONDS", "10000000000"),
        ("CACHE_STALE_IF_ERROR_SECONDS", "10000000000"),
        ("CACHE_DEGRADED_TTL_SECONDS", "10000000000"),
    ],
)
def test_an_endless_timeout_or_a_lifetime_past_ten_years_is_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """An endless Redis timeout would let a black-holed Redis hold a request for ever; a
    lifetime of eleven digits cannot be stored, and every entry would be refused when read."""
    load_fails_naming(monkeypatch, variable, value)


@pytest.mark.parametrize("value", ["", "   "])
def test_a_blank_redis_url_means_unset(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("REDIS_URL", value)

    assert cache_settings().REDIS_URL is None


@pytest.mark.parametrize(
    "value",
    [
        "redis://localhost",
        "redis://localhost:6379/0",
        "redis://user:secret@redis.internal:6380/3",
        "rediss://redis.example.com:6380",
        "rediss://redis.example.com:6380/0?ssl_cert_reqs=required",
        "redis://localhost:6379/0?health_check_interval=5&client_name=svc",
        "unix:///tmp/r.sock",
        "unix:///tmp/r.sock?db=2",
    ],
)
def test_redis_tls_and_unix_socket_urls_are_accepted(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("REDIS_URL", value)

    assert value == cache_settings().REDIS_URL


@pytest.mark.parametrize("variable", ["CACHE_ENABLED", "CACHE_FAIL_FAST"])
@pytest.mark.parametrize("value", ["maybe", "2", "enabled", "tru"])
def test_a_boolean_that_is_neither_true_nor_false_is_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    load_fails_naming(monkeypatch, variable, value)


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_the_memory_bound_must_be_a_positive_integer(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    load_fails_naming(monkeypatch, "CACHE_MEMORY_MAX_ENTRIES", value)


@pytest.mark.parametrize("value", ["0", "1048575", "lots"])
def test_the_hit_memos_budget_below_a_mebibyte_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    load_fails_naming(monkeypatch, "CACHE_HIT_MEMOS_MAX_BYTES", value)


@pytest.mark.parametrize("value", ["0.5", "2", "-0.1"])
def test_a_slow_threshold_not_below_the_socket_timeout_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("REDIS_SOCKET_TIMEOUT_SECONDS", "0.5")
    load_fails_naming(monkeypatch, "CACHE_SLOW_REDIS_SECONDS", value)


def test_slow_calls_count_as_failures_only_when_asked() -> None:
    assert CacheSettings().CACHE_SLOW_REDIS_SECONDS == 0


def test_an_invalidation_journal_that_is_not_a_directory_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CACHE_INVALIDATION_JOURNAL", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="CACHE_INVALIDATION_JOURNAL: no such directory"):
        CacheSettings()


def test_an_invalidation_journal_directory_is_accepted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CACHE_INVALIDATION_JOURNAL", str(tmp_path))
    assert str(tmp_path) == CacheSettings().CACHE_INVALIDATION_JOURNAL


def test_a_refusal_never_carries_the_password_in_redis_url() -> None:
    # A service prints the error as it is (python -m insights_backend does).
    with pytest.raises(ValidationError) as refused:
        CacheSettings(REDIS_URL="redis://:s3cret@127.0.0.1:6380/0?socket_timeout=1")

    assert "s3cret" not in str(refused.value)
    assert "REDIS_URL" in str(refused.value)
