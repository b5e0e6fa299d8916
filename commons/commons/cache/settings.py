"""Typed settings, loaded from the environment once per process.

Every field is named exactly as its environment variable. A bad value raises
:class:`pydantic.ValidationError` (a ``ValueError``) when the settings load, and the message names
the variable, so a misconfigured service fails at start-up rather than on its first request.
"""

from __future__ import annotations

import inspect
import os
import re
import ssl
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.asyncio import connection
from redis.connection import parse_url

from commons.cache.memo import DEFAULT_HIT_MEMOS_MAX_BYTES

__all__ = [
    "REDIS_URL_SCHEMES",
    "CacheSettings",
    "cache_settings",
]

#: URL schemes accepted in ``REDIS_URL``.
REDIS_URL_SCHEMES = frozenset({"redis", "rediss", "unix"})

# ':' separates the parts of a key, glob characters would make the prefix a pattern in the tools
# operators reach for, and whitespace never survives a shell.
_FORBIDDEN_PREFIX_CHARACTERS = re.compile(r"[\s:*?\[\]{}]")


#: The longest time to live, stale window or client max-age (ten years, in seconds): an entry's
#: stored lifetime holds at most ten digits, and a longer one would be refused by every read.
LONGEST_LIFETIME_SECONDS = 315_360_000
#: The longest a Redis connection or command may be given: a request never waits longer on it.
LONGEST_REDIS_TIMEOUT_SECONDS = 60.0


#: Options of a Redis URL's query that would override a setting of ours, with the setting: the
#: URL's would win silently (a ``socket_timeout=5`` makes every black-holed read wait 5 s).
_URL_OPTIONS_OF_SETTINGS = {
    "socket_timeout": "REDIS_SOCKET_TIMEOUT_SECONDS",
    "socket_connect_timeout": "REDIS_CONNECT_TIMEOUT_SECONDS",
    "timeout": "REDIS_SOCKET_TIMEOUT_SECONDS",
    "max_connections": "REDIS_MAX_CONNECTIONS",
    "protocol": "(none: the cache picks the protocol of each connection)",
}


def _check_url_options(scheme: str, query: str) -> None:
    """Refuses a ``REDIS_URL`` query option that redis-py cannot read (``?db=abc``), that no
    connection of that scheme takes (a typo, ``ssl_cert_reqs`` on ``redis://``: redis-py hands it
    to the connection, which fails on every connect) or that would override one of our
    settings."""
    known = _connection_options(scheme)
    for name in parse_qs(query, keep_blank_values=True):
        if name in _URL_OPTIONS_OF_SETTINGS:
            raise ValueError(
                f"REDIS_URL: the option {name!r} is set by {_URL_OPTIONS_OF_SETTINGS[name]}, "
                "not in the URL"
            )
        if name not in known:
            raise ValueError(f"REDIS_URL: no {scheme}:// connection takes the option {name!r}")
    if query:
        try:
            parse_url(f"redis://localhost?{query}")  # type: ignore[no-untyped-call]
        except ValueError as exc:
            raise ValueError(f"REDIS_URL: {exc}") from None


def _check_tls_files(ca_file: str | None, cert_file: str | None, key_file: str | None) -> None:
    """Refuses TLS files that do not load: each would fail every connection, which reads as an
    outage (the process starts degraded and stays so) rather than a mistake of the settings."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"REDIS_TLS_CA_FILE: no certificate loads from it ({exc})") from None
    if cert_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (ssl.SSLError, OSError) as exc:
            names = "REDIS_TLS_CERT_FILE" + (" and REDIS_TLS_KEY_FILE" if key_file else "")
            raise ValueError(
                f"{names}: no certificate and matching key load from them ({exc})"
            ) from None


def _connection_options(scheme: str) -> set[str]:
    """The keyword arguments a redis-py connection of ``scheme`` takes (a URL option is one)."""
    kind = {
        "rediss": connection.SSLConnection,
        "unix": connection.UnixDomainSocketConnection,
    }.get(scheme, connection.Connection)
    names: set[str] = set()
    for klass in kind.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names.update(
                name
                for name, parameter in inspect.signature(init).parameters.items()
                if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
                and name != "self"
            )
    return names


class CacheSettings(BaseSettings):
    """The cache's configuration; each field reads the environment variable of the same name."""

    # hide_input_in_errors: a refusal's text never carries what was given (a URL's password).
    model_config = SettingsConfigDict(
        case_sensitive=True, extra="ignore", frozen=True, hide_input_in_errors=True
    )

    CACHE_ENABLED: bool = Field(
        default=True,
        description="false turns caching off: every request runs its handler, nothing is stored.",
    )
    CACHE_PREFIX: str = Field(
        default="cache",
        description="Service-specific prefix of every key, e.g. ib-cache. "
        "No whitespace, ':', glob characters or braces.",
    )
    CACHE_TTL_SECONDS: int = Field(
        default=300,
        ge=1,
        le=LONGEST_LIFETIME_SECONDS,
        description="Default time to live of an entry, in seconds (at most ten years).",
    )
    REDIS_URL: str | None = Field(
        default=None,
        description="redis://, rediss:// or unix:// URL. Unset: the in-memory backend. Its "
        "query may not set what a setting sets (socket_timeout, socket_connect_timeout, "
        "max_connections, protocol).",
    )
    CACHE_FAIL_FAST: bool = Field(
        default=False,
        description="true: refuse to start when REDIS_URL is set and Redis does not answer.",
    )
    CACHE_MEMORY_MAX_ENTRIES: int = Field(
        default=10_000,
        ge=1,
        description="Bound of the in-memory backend (per process); least recently used go first.",
    )
    CACHE_MEMORY_MAX_BYTES: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Bytes held at most (per process) by each of the in-memory backend and the "
        "degraded tier, beside their entry bound; least recently used go first.",
    )
    CACHE_NEAR_CACHE: bool = Field(
        default=True,
        description="Keep Redis hits in process memory, kept coherent by Redis' client "
        "tracking (Redis 6+; on one server, and per primary on a cluster; not behind "
        "Sentinel). false: every hit reads Redis, which can be faster over a working set many "
        "times what it holds (see Operations, 'When the near cache pays').",
    )
    CACHE_NEAR_CACHE_MAX_ENTRIES: int = Field(
        default=1_000_000,
        ge=1,
        description="Keys the near cache holds at most (per process; entries and the scope "
        "generations they depend on); least recently used go first.",
    )
    CACHE_NEAR_CACHE_MAX_BYTES: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Bytes the near cache holds at most (per process), counted as what an entry "
        "costs in memory (its key, its value and the objects that hold them); least recently "
        "used go first, once full an entry comes in on its second read, and an entry above a "
        "sixty-fourth of it is not kept. On a cluster each primary's near cache gets its share. "
        "What repeated hits answered from it remember (up to 65,536 keys, their stored bytes "
        "counted though shared with the near cache) is bounded by it too, counted apart; the "
        "hit path's other memos come on top (CACHE_HIT_MEMOS_MAX_BYTES).",
    )
    CACHE_HIT_MEMOS_MAX_BYTES: int = Field(
        default=DEFAULT_HIT_MEMOS_MAX_BYTES,
        ge=1024 * 1024,
        description="Bytes the hit path's memos hold at most (per process, all routes together): "
        "what it remembers of the keys it answered lately (query digests, keys, parsed values, "
        "prepared answers, expiries, the objects of the hits answered most recently), so that a "
        "repeated hit is not worked out again. Split among them in fixed shares, counted as the "
        "bytes they hold. Besides the near cache's and the in-memory backend's bounds, not part "
        "of them (Operations, 'Memory a worker holds'); lower it with them to shrink a worker.",
    )
    CACHE_NEAR_CACHE_MAX_AGE_SECONDS: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="The longest the near cache answers an entry after a read of its scope's "
        "generations found them unchanged; every held generation is read again in the "
        "background every third of it (one command per 512 generations, whatever the number of "
        "entries). Bounds how stale an answer can be when tracking is fooled (a connection "
        "dropped silently, SWAPDB, a lost message).",
    )
    CACHE_NEAR_CACHE_VERIFY_SHARE: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="The share of near-cache hits also read from Redis in the background and "
        "compared; Redis holding other bytes under the same generations (a change no fill made, "
        "which nothing announces) empties the near cache, counted with reason diverged and "
        "logged once. 0 turns it off.",
    )
    REDIS_CONNECT_TIMEOUT_SECONDS: float = Field(
        default=0.5,
        gt=0,
        le=LONGEST_REDIS_TIMEOUT_SECONDS,
        description="Time allowed to open a connection to Redis (at most 60).",
    )
    REDIS_SOCKET_TIMEOUT_SECONDS: float = Field(
        default=0.5,
        gt=0,
        le=LONGEST_REDIS_TIMEOUT_SECONDS,
        description="Time allowed for each Redis command's reply (at most 60).",
    )
    REDIS_MAX_CONNECTIONS: int = Field(
        default=100,
        ge=1,
        description="Pooled connections to Redis per process, for invalidations, locks and "
        "writes (hits, and on one server fills, share one pipelined connection of their own); a "
        "request beyond them does "
        "not wait: it is answered by its handler, as on a miss. An invalidation waits for one, "
        "up to REDIS_SOCKET_TIMEOUT_SECONDS.",
    )
    CACHE_FAILURE_THRESHOLD: int = Field(
        default=3,
        ge=1,
        description="Consecutive Redis failures after which the cache stops calling Redis "
        "and serves from memory until Redis answers again.",
    )
    CACHE_SLOW_REDIS_SECONDS: float = Field(
        default=0,
        ge=0,
        description="Above 0: a read or write of Redis that took longer than this counts as a "
        "failure for CACHE_FAILURE_THRESHOLD (once such calls in a row span that long), and the "
        "recovery probe's PING must answer within it, so that a Redis answering just under "
        "REDIS_SOCKET_TIMEOUT_SECONDS does not cost every request nearly that timeout. Must be "
        "below it (half of it is a good start). 0 (the default): only failures count, because a "
        "process starved of CPU (a pod throttled at its CPU limit) sees its own calls as slow "
        "too, and while degraded an invalidation by another replica reaches this one only "
        "within CACHE_DEGRADED_TTL_SECONDS.",
    )
    CACHE_RECOVERY_INTERVAL_SECONDS: float = Field(
        default=2.0,
        gt=0,
        le=300,
        description="While Redis is unavailable, how often it is probed to return to it.",
    )
    CACHE_PENDING_INVALIDATIONS_MAX: int = Field(
        default=10_000,
        ge=1,
        description="Invalidations remembered during an outage before they are widened to "
        "whole namespaces.",
    )
    CACHE_INVALIDATION_JOURNAL: str | None = Field(
        default=None,
        description="A local directory where invalidations kept during a Redis outage are "
        "written (and flushed to disk) before the request that made them returns; the next "
        "start applies them to Redis before reading it, after a crash too. Unset: kept "
        "invalidations live in process memory only and die with the process "
        "(CACHE_FLUSH_AFTER_DEGRADED_START covers a restart during the outage).",
    )
    CACHE_FLUSH_AFTER_DEGRADED_START: bool = Field(
        default=True,
        description="Without CACHE_INVALIDATION_JOURNAL: a process that starts while Redis does "
        "not answer removes every entry of its CACHE_PREFIX once Redis answers, before reading "
        "it (a process stopped during the same outage may have kept invalidations that died with "
        "it): one wave of misses instead of old answers. Ignored with a journal.",
    )
    CACHE_DEGRADED_TTL_SECONDS: int = Field(
        default=30,
        ge=1,
        le=LONGEST_LIFETIME_SECONDS,
        description="While Redis is unavailable, the longest an entry lives in the in-memory "
        "tier: bounds how stale an answer can be after another replica's update.",
    )
    CACHE_LOCK_TIMEOUT_SECONDS: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="Longest a request waits for another one computing the same entry "
        "before it runs the handler itself (at most 3600).",
    )
    CACHE_DISTRIBUTED_LOCK: bool = Field(
        default=False,
        description="Default of @cache(distributed_lock=...): a short Redis lock so that "
        "replicas compute a missing entry once.",
    )
    CACHE_STALE_IF_ERROR_SECONDS: int = Field(
        default=0,
        ge=0,
        le=LONGEST_LIFETIME_SECONDS,
        description="Default of @cache(stale_if_error=...): when computing a fresh answer fails "
        "(the handler raises or answers 5xx), an entry stale for at most this many seconds is "
        "served instead (never an invalidated one). 0: never.",
    )
    CACHE_MAX_TAGS_PER_ENTRY: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Tags an entry may carry at most (@cache(tags=...)): each is one more "
        "generation per scope level that every read asks. More literal tags are refused when "
        "the route is decorated; more from a tags function: the answer is not stored (logged "
        "once per route).",
    )
    CACHE_HONOR_CLIENT_NO_CACHE: bool = Field(
        default=False,
        description="true: a request's Cache-Control: no-cache / no-store skips the stored "
        "entry. false: ignored, so no client can force recomputation.",
    )
    REDIS_CLUSTER: Literal["auto", "true", "false"] = Field(
        default="auto",
        description="Redis Cluster mode: auto (the node's HELLO reply says cluster), true or "
        "false. A cluster has database 0 only.",
    )
    REDIS_TLS_CA_FILE: str | None = Field(
        default=None,
        description="rediss:// only: PEM file of the CA that signed the server's certificate "
        "(default: the system's CAs).",
    )
    REDIS_TLS_CERT_FILE: str | None = Field(
        default=None,
        description="rediss:// only: PEM client certificate, for servers that require one.",
    )
    REDIS_TLS_KEY_FILE: str | None = Field(
        default=None,
        description="rediss:// only: PEM private key of REDIS_TLS_CERT_FILE.",
    )
    REDIS_TLS_CHECK_HOSTNAME: bool = Field(
        default=True,
        description="rediss:// only: false accepts a certificate issued for another host name "
        "(the chain is still verified).",
    )
    REDIS_SENTINELS: str | None = Field(
        default=None,
        description="Comma-separated host:port list of Sentinels; the master is then found "
        "through them (REDIS_URL still gives scheme, user, password and database).",
    )
    REDIS_SENTINEL_MASTER: str | None = Field(
        default=None,
        description="Name of the master the Sentinels monitor; required with REDIS_SENTINELS.",
    )

    @model_validator(mode="before")
    @classmethod
    def _only_known_names(cls, values: object) -> object:
        # extra="ignore" is for the environment; a keyword that is no setting is a mistake
        # (CacheSettings(enabled=False) would otherwise leave caching on, silently).
        if isinstance(values, dict):
            unknown = [name for name in values if name not in cls.model_fields]
            if unknown:
                raise ValueError("; ".join(_no_such_setting(str(name)) for name in unknown))
        return values

    @field_validator("CACHE_PREFIX")
    @classmethod
    def _prefix_is_one_plain_word(cls, value: str) -> str:
        if not value:
            raise ValueError("CACHE_PREFIX must not be empty")
        if _FORBIDDEN_PREFIX_CHARACTERS.search(value):
            raise ValueError(
                "CACHE_PREFIX must not contain whitespace, ':', glob characters (*?[]) or braces"
            )
        return value

    @field_validator("REDIS_URL", mode="before")
    @classmethod
    def _blank_url_means_unset(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("REDIS_URL")
    @classmethod
    def _url_is_a_redis_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in REDIS_URL_SCHEMES:
            raise ValueError(
                "REDIS_URL must start with redis://, rediss:// or unix:// "
                f"(got scheme {parts.scheme!r})"
            )
        _check_url_options(parts.scheme, parts.query)
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("REDIS_URL: a unix:// URL needs a socket path")
            return value
        if not parts.hostname:
            raise ValueError("REDIS_URL: a host is missing")
        try:
            parts.port  # noqa: B018  (parsing the port is the check)
        except ValueError as exc:
            raise ValueError(f"REDIS_URL: {exc}") from None
        database = parts.path.strip("/")
        if database and not database.isdigit():
            raise ValueError(f"REDIS_URL: the database must be a number (got {database!r})")
        return value

    @field_validator("REDIS_CLUSTER", mode="before")
    @classmethod
    def _cluster_mode_lowercase(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("REDIS_SENTINELS")
    @classmethod
    def _sentinels_are_host_port(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        for address in value.split(","):
            host, sep, port = address.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"REDIS_SENTINELS must be a comma-separated host:port list (got {address!r})"
                )
        return value

    @field_validator("REDIS_TLS_CA_FILE", "REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE")
    @classmethod
    def _tls_file_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not value.strip():
            return None
        if not Path(value).is_file():
            raise ValueError(f"{info.field_name}: no such file: {value}")
        return value

    @field_validator("CACHE_INVALIDATION_JOURNAL")
    @classmethod
    def _journal_is_a_writable_directory(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not Path(value).is_dir():
            raise ValueError(f"CACHE_INVALIDATION_JOURNAL: no such directory: {value}")
        if not os.access(value, os.W_OK | os.X_OK):
            raise ValueError(f"CACHE_INVALIDATION_JOURNAL: directory not writable: {value}")
        return value

    @model_validator(mode="after")
    def _redis_options_agree(self) -> CacheSettings:
        scheme = urlsplit(self.REDIS_URL).scheme if self.REDIS_URL else None
        tls_files = ("REDIS_TLS_CA_FILE", "REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE")
        for name in tls_files:
            if getattr(self, name) is not None and scheme != "rediss":
                raise ValueError(f"{name} is set but REDIS_URL is not a rediss:// URL")
        if self.REDIS_TLS_KEY_FILE is not None and self.REDIS_TLS_CERT_FILE is None:
            raise ValueError("REDIS_TLS_KEY_FILE is set without REDIS_TLS_CERT_FILE")
        _check_tls_files(self.REDIS_TLS_CA_FILE, self.REDIS_TLS_CERT_FILE, self.REDIS_TLS_KEY_FILE)
        if self.REDIS_SENTINELS is not None:
            if self.REDIS_URL is None:
                raise ValueError("REDIS_SENTINELS is set but REDIS_URL is not")
            if not self.REDIS_SENTINEL_MASTER:
                raise ValueError("REDIS_SENTINELS is set but REDIS_SENTINEL_MASTER is not")
            if self.REDIS_CLUSTER == "true":
                raise ValueError("REDIS_CLUSTER=true and REDIS_SENTINELS exclude each other")
        elif self.REDIS_SENTINEL_MASTER:
            raise ValueError("REDIS_SENTINEL_MASTER is set but REDIS_SENTINELS is not")
        slow = self.CACHE_SLOW_REDIS_SECONDS
        if slow >= self.REDIS_SOCKET_TIMEOUT_SECONDS:
            raise ValueError(
                f"CACHE_SLOW_REDIS_SECONDS ({slow}) must be below REDIS_SOCKET_TIMEOUT_SECONDS "
                f"({self.REDIS_SOCKET_TIMEOUT_SECONDS}): a call that slow has timed out already"
            )
        if self.REDIS_CLUSTER == "true" and scheme == "unix":
            raise ValueError("REDIS_CLUSTER=true needs a redis:// or rediss:// REDIS_URL")
        if self.REDIS_CLUSTER == "true" and self.REDIS_URL and _database_of(self.REDIS_URL):
            raise ValueError(
                "REDIS_CLUSTER=true needs database 0 in REDIS_URL (a cluster has no other)"
            )
        return self


def _no_such_setting(name: str) -> str:
    """Why ``name`` is refused, with the setting it most likely means."""
    upper = name.upper()
    meant = [
        field
        for field in (upper, f"CACHE_{upper}", f"REDIS_{upper}")
        if field in CacheSettings.model_fields
    ]
    if not meant:
        meant = [field for field in CacheSettings.model_fields if field.startswith(upper)]
    hint = f"did you mean {' or '.join(meant)}? " if meant else ""
    return (
        f"CacheSettings has no setting {name!r}: {hint}settings are named exactly as their "
        "environment variables"
    )


def _database_of(url: str) -> int:
    """The database a redis:// URL names (its path, or a ``db`` query parameter), 0 by default."""
    parts = urlsplit(url)
    named = parts.path.strip("/") or parse_qs(parts.query).get("db", ["0"])[0]
    return int(named) if named.isdigit() else 0


@lru_cache(maxsize=1)
def cache_settings() -> CacheSettings:
    """The process-wide settings, read from the environment on first use.

    ``cache_settings.cache_clear()`` makes the next call read the environment again.
    """
    return CacheSettings()
