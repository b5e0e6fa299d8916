"""The key builders: exact key formats, the canonical query digest, and failing closed.

Keys: two requests for different resources never share an entry, whatever their paths hold.

A path segment may carry any character once decoded (``?``, ``#``, ``\\``, ``%``). Two paths that
decode to different text are different resources, so they must get different keys, on both
decorators. An ordinary path keeps exactly the documented key format.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi_cache.decorator import cache as guide_cache
from fastapi_cache.types import KeyBuilder
from redis.asyncio import Redis
from starlette.requests import Request

from commons.cache import (
    CacheSettings,
    cache,
    close_cache,
    init_cache,
    keys,
    tenant_cache_key_builder,
    tenant_user_cache_key_builder,
)
from commons.cache.memo import HOT_REVIEW_EVERY, HOT_SMALL_ENTRIES
from commons.cache.scope import CacheScope, ScopedKey
from commons.utilities.context import bind_identity

from _support import client_for

NAMESPACE = "test-cache:tenant_config"  # "{prefix}:{namespace}", as fastapi-cache2 passes it
MD5_OF_A1_B2 = "ed04c91cf6f6ab5a01a31c0295c5da34"  # md5(b"a=1&b=2")
MD5_OF_NOTHING = "d41d8cd98f00b204e9800998ecf8427e"  # md5(b"")


def request_for(path: str, query: str = "") -> Request:
    return Request(
        {
            "type": "http",
            "method": "GET",
            "scheme": "http",
            "server": ("testserver", 80),
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query.encode(),
            "headers": [],
        }
    )


def tenant_key(path: str, query: str = "") -> ScopedKey:
    key = tenant_cache_key_builder(lambda: None, NAMESPACE, request=request_for(path, query))
    assert isinstance(key, ScopedKey)
    return key


def user_key(path: str, query: str = "") -> ScopedKey:
    key = tenant_user_cache_key_builder(lambda: None, NAMESPACE, request=request_for(path, query))
    assert isinstance(key, ScopedKey)
    return key


@pytest.fixture
def tenant_42() -> Iterator[None]:
    with bind_identity("42"):
        yield


@pytest.fixture
def tenant_42_user_7() -> Iterator[None]:
    with bind_identity("42", "7"):
        yield


@pytest.mark.usefixtures("tenant_42")
def test_tenant_key_is_prefix_namespace_tenant_path_and_query_md5() -> None:
    assert tenant_key("/tenant/config", "a=1&b=2") == (
        f"test-cache:tenant_config:tenant_42:/tenant/config:{MD5_OF_A1_B2}"
    )


@pytest.mark.usefixtures("tenant_42_user_7")
def test_user_key_adds_the_user_after_the_tenant() -> None:
    assert user_key("/users/me", "a=1&b=2") == (
        f"test-cache:tenant_config:tenant_42:user_7:/users/me:{MD5_OF_A1_B2}"
    )


@pytest.mark.usefixtures("tenant_42")
def test_a_request_without_query_uses_the_md5_of_the_empty_string() -> None:
    assert tenant_key("/tenant/config") == (
        f"test-cache:tenant_config:tenant_42:/tenant/config:{MD5_OF_NOTHING}"
    )


@pytest.mark.usefixtures("tenant_42")
def test_the_order_of_different_parameters_does_not_matter() -> None:
    assert tenant_key("/items", "b=2&a=1") == tenant_key("/items", "a=1&b=2")
    assert tenant_key("/items", "b=2&a=1").endswith(f":{MD5_OF_A1_B2}")


@pytest.mark.usefixtures("tenant_42")
def test_repeated_parameters_keep_the_order_the_client_sent() -> None:
    assert tenant_key("/items", "a=1&a=2") != tenant_key("/items", "a=2&a=1")
    assert tenant_key("/items", "a=1&b=0&a=2") == tenant_key("/items", "b=0&a=1&a=2")
    assert tenant_key("/items", "a=1&b=0&a=2") != tenant_key("/items", "a=2&b=0&a=1")


@pytest.mark.usefixtures("tenant_42")
def test_different_query_values_and_paths_give_different_keys() -> None:
    keys = {
        tenant_key("/items", "page=1"),
        tenant_key("/items", "page=2"),
        tenant_key("/items", "size=1"),
        tenant_key("/other", "page=1"),
    }
    assert len(keys) == 4


def test_different_tenants_get_different_keys_for_the_same_request() -> None:
    with bind_identity("a"):
        key_a = tenant_key("/tenant/config")
    with bind_identity("b"):
        key_b = tenant_key("/tenant/config")
    assert key_a != key_b
    assert ":tenant_a:" in key_a
    assert ":tenant_b:" in key_b


def test_different_users_of_one_tenant_get_different_keys() -> None:
    with bind_identity("t", "u1"):
        key_1 = user_key("/users/me")
    with bind_identity("t", "u2"):
        key_2 = user_key("/users/me")
    assert key_1 != key_2


def test_integer_ids_are_written_as_their_decimal_text() -> None:
    with bind_identity(42, 7):
        assert user_key("/me").startswith("test-cache:tenant_config:tenant_42:user_7:/me:")


@pytest.mark.usefixtures("tenant_42")
def test_keys_know_the_scope_they_belong_to() -> None:
    key = tenant_key("/tenant/config")
    assert key.cacheable
    assert key.scope is not None
    assert (key.scope.namespace, key.scope.tenant_id, key.scope.user_id) == (
        "tenant_config",
        "42",
        None,
    )


def test_missing_tenant_gives_an_uncacheable_key_that_says_why_and_the_usual_cause() -> None:
    key = tenant_key("/tenant/config")

    assert not key.cacheable
    assert key.reason is not None
    assert "no tenant bound" in key.reason
    assert "async def" in key.reason


@pytest.mark.parametrize("build", [tenant_key, user_key], ids=["tenant", "user"])
def test_missing_tenant_fails_closed_for_both_builders(build: Callable[[str], ScopedKey]) -> None:
    with bind_identity(None, "7"):
        key = build("/me")
    assert not key.cacheable
    assert key.reason is not None


@pytest.mark.usefixtures("tenant_42")
def test_missing_user_gives_an_uncacheable_user_key_that_says_why() -> None:
    key = user_key("/users/me")

    assert not key.cacheable
    assert key.reason is not None
    assert "no user bound" in key.reason


@pytest.mark.usefixtures("tenant_42")
def test_the_tenant_builder_does_not_need_a_user() -> None:
    assert tenant_key("/tenant/config").cacheable


def test_a_key_built_before_for_the_same_request_is_never_reused_across_scopes() -> None:
    """Keys are remembered per request shape; the memory must not blur tenants, users or kinds."""
    with bind_identity("42", "7"):
        first_user = user_key("/me", "a=1")
        first_tenant = tenant_key("/me", "a=1")
    with bind_identity("42", "8"):
        other_user = user_key("/me", "a=1")
    with bind_identity("43", "7"):
        other_tenant = user_key("/me", "a=1")
    with bind_identity("42"):
        without_user = user_key("/me", "a=1")  # same tenant, path and query as first_tenant
        tenant_again = tenant_key("/me", "a=1")

    assert len({first_user, first_tenant, other_user, other_tenant}) == 4
    assert not without_user.cacheable
    assert tenant_again == first_tenant
    assert tenant_again.scope == first_tenant.scope


@pytest.mark.parametrize("tenant_id", ["a:b", "a b", "a\tb", " a", "a\n", ":", "a\ud800"])
def test_a_tenant_id_with_a_colon_whitespace_or_a_lone_surrogate_is_refused(tenant_id: str) -> None:
    with bind_identity(tenant_id, "7"):
        keys = [tenant_key("/tenant/config"), user_key("/tenant/config")]
    assert not any(key.cacheable for key in keys)
    reason = "tenant id holds ':', whitespace or a lone surrogate"
    assert [key.reason for key in keys] == [reason] * 2


@pytest.mark.parametrize("user_id", ["u:1", "u 1", "u\r\n1", ":", "\udfff"])
def test_a_user_id_with_a_colon_whitespace_or_a_lone_surrogate_is_refused(user_id: str) -> None:
    with bind_identity("42", user_id):
        key = user_key("/users/me")
    assert not key.cacheable
    assert key.reason == "user id holds ':', whitespace or a lone surrogate"


def test_ids_with_other_punctuation_are_kept_literally() -> None:
    with bind_identity("acme-eu_1.*?[x]", "o'brien"):
        key = user_key("/users/me")
    assert key.cacheable
    assert key.startswith("test-cache:tenant_config:tenant_acme-eu_1.*?[x]:user_o'brien:/users/me:")


def test_no_request_gives_an_uncacheable_key() -> None:
    with bind_identity("42", "7"):
        key = tenant_cache_key_builder(lambda: None, NAMESPACE)
    assert isinstance(key, ScopedKey)
    assert not key.cacheable


@pytest.mark.parametrize(
    "builder", [tenant_cache_key_builder, tenant_user_cache_key_builder], ids=["tenant", "user"]
)
def test_builders_are_called_the_way_fastapi_cache2_calls_a_key_builder(
    builder: KeyBuilder,
) -> None:
    # fastapi_cache.decorator.cache: key_builder(func, f"{prefix}:{namespace}", request=...,
    # response=..., args=..., kwargs=...), and the result must be a str (or awaitable of one).
    async def endpoint(page: int) -> dict[str, int]:
        return {"page": page}

    with bind_identity("42", "7"):
        key = builder(
            endpoint,
            NAMESPACE,
            request=request_for("/items", "b=2&a=1"),
            response=None,
            args=(),
            kwargs={"page": 1},
        )
    assert isinstance(key, str)
    assert key.startswith("test-cache:tenant_config:tenant_42:")
    assert key.endswith(f":/items:{MD5_OF_A1_B2}")


@pytest.mark.usefixtures("tenant_42")
def test_remembered_keys_are_not_walked_by_the_garbage_collector() -> None:
    # The keys kept as objects are the process's: start them over, whatever earlier tests built.
    keys._hot_key_memo.clear()
    # A full collection walks every object the collector tracks: a key object (with its scope
    # and attributes) kept per remembered key made each one take 100-450 ms over 100k keys. Over
    # a working set larger than the keys kept as objects, only the most recent few stay objects:
    # remembering many more adds next to nothing.
    for n in range(2_000):
        tenant_key(f"/warmed/{n}")
    gc.collect()
    tracked_before = len(gc.get_objects())

    for n in range(2_000, 2_000 + 3 * HOT_REVIEW_EVERY):  # past the first review that judges
        tenant_key(f"/warmed/{n}")
    gc.collect()

    assert len(gc.get_objects()) - tracked_before < 10 * HOT_SMALL_ENTRIES  # not one per key


@pytest.mark.usefixtures("tenant_42")
def test_a_key_remembered_long_ago_comes_back_with_the_same_text_and_scope() -> None:
    first = tenant_key("/remembered", "b=2&a=1")
    for n in range(3_000):  # more than the keys kept as objects
        tenant_key(f"/others/{n}")

    again = tenant_key("/remembered", "a=1&b=2")

    assert again == first
    assert again.scope == first.scope == CacheScope("tenant_config", "42", None)


# -- paths that decode differently never share an entry --------------------------------------------


ACME = {"X-Test-Tenant": "acme"}

#: Pairs of (request path, the name it decodes to) whose names differ.
DISTINCT_PATHS = {
    "question-mark": (("/items/a%3Fb", "a?b"), ("/items/a%253Fb", "a%3Fb")),
    "hash": (("/items/a%23b", "a#b"), ("/items/a%2523b", "a%23b")),
    "backslash": (("/items/a%5Cb", "a\\b"), ("/items/a%255Cb", "a%5Cb")),
}
DECORATORS = ["commons_cache", "guide_cache"]


def build_app(make_identity_app: Callable[[], FastAPI], decorator: str) -> FastAPI:
    """``GET /items/{name:path}`` cached in namespace ``items``; it echoes the decoded name."""
    app = make_identity_app()
    cached: Callable[[Any], Any] = (
        cache(namespace="items")
        if decorator == "commons_cache"
        else guide_cache(namespace="items", key_builder=tenant_cache_key_builder)
    )

    @app.get("/items/{name:path}")
    @cached
    async def item(name: str) -> dict[str, str]:
        return {"name": name}

    return app


@pytest.mark.parametrize("decorator", DECORATORS)
@pytest.mark.parametrize("paths", DISTINCT_PATHS.values(), ids=list(DISTINCT_PATHS))
async def test_paths_that_decode_differently_never_share_an_entry(
    backend: CacheSettings,
    make_identity_app: Callable[[], FastAPI],
    decorator: str,
    paths: tuple[tuple[str, str], tuple[str, str]],
) -> None:
    """The second path is a different resource: a miss answered with its own name."""
    (first_path, first_name), (second_path, second_name) = paths
    app = build_app(make_identity_app, decorator)

    async with client_for(app) as client:
        first = await client.get(first_path, headers=ACME)
        second = await client.get(second_path, headers=ACME)
        first_again = await client.get(first_path, headers=ACME)

    assert first.status_code == second.status_code == 200
    assert (first.headers["X-FastAPI-Cache"], first.json()) == ("MISS", {"name": first_name})
    assert (second.headers["X-FastAPI-Cache"], second.json()) == ("MISS", {"name": second_name})
    assert (first_again.headers["X-FastAPI-Cache"], first_again.json()) == (
        "HIT",
        {"name": first_name},
    )


@pytest.mark.parametrize("decorator", DECORATORS)
async def test_an_ordinary_path_keeps_the_documented_key_format(
    redis_url: str,
    make_settings: Callable[..., CacheSettings],
    make_identity_app: Callable[[], FastAPI],
    decorator: str,
) -> None:
    """``/items/plain?x=1`` is stored under ``{prefix}:items:tenant_acme:/items/plain:{md5}``."""
    settings = make_settings(redis_url)
    await init_cache(settings)
    try:
        app = build_app(make_identity_app, decorator)
        async with client_for(app) as client:
            response = await client.get("/items/plain?x=1", headers=ACME)
    finally:
        await close_cache()

    md5 = hashlib.md5(b"x=1").hexdigest()
    expected = f"{settings.CACHE_PREFIX}:items:tenant_acme:/items/plain:{md5}"
    raw = Redis.from_url(redis_url)
    try:
        entries = {key.decode() async for key in raw.scan_iter(count=1000) if b":#" not in key}
    finally:
        await raw.aclose()
    assert response.json() == {"name": "plain"}
    assert entries == {expected}
