"""The public surface: exactly the names services and tests are meant to import."""

from __future__ import annotations

import importlib

import pytest

import commons.cache
import commons.utilities.context

PUBLIC_CACHE_API = {
    # configuration
    "CacheSettings",
    "cache_settings",
    # lifecycle and state
    "init_cache",
    "close_cache",
    "cache_status",
    "CacheStatus",
    "CacheState",
    # caching routes
    "cache",
    "tenant_cache_key_builder",
    "tenant_user_cache_key_builder",
    "global_cache_key_builder",
    "invalidate_namespace",
    "invalidate_tags",
    "PrivateCacheControlMiddleware",
    # metrics hooks
    "CacheEvents",
    "LookupOutcome",
    # errors
    "CacheError",
    "CacheUnavailableError",
    "BackendError",
    "BackendUnavailableError",
    "BackendRejectedError",
}

PUBLIC_CONTEXT_API = {
    "get_tenant_id",
    "set_tenant_id",
    "get_user_id",
    "set_user_id",
    "bind_identity",
    "RequestContextMiddleware",
}


def test_commons_cache_exports_exactly_the_public_api() -> None:
    assert set(commons.cache.__all__) == PUBLIC_CACHE_API
    assert len(commons.cache.__all__) == len(PUBLIC_CACHE_API)  # no name listed twice


def test_commons_utilities_context_exports_exactly_the_identity_api() -> None:
    assert set(commons.utilities.context.__all__) == PUBLIC_CONTEXT_API


@pytest.mark.parametrize(
    ("module_name", "name"),
    [("commons.cache", name) for name in sorted(PUBLIC_CACHE_API)]
    + [("commons.utilities.context", name) for name in sorted(PUBLIC_CONTEXT_API)],
)
def test_every_exported_name_is_importable(module_name: str, name: str) -> None:
    module = importlib.import_module(module_name)
    assert getattr(module, name) is not None
    namespace: dict[str, object] = {}
    exec(f"from {module_name} import {name}", namespace)
    assert namespace[name] is getattr(module, name)


def test_star_import_gives_exactly_the_public_api() -> None:
    namespace: dict[str, object] = {}
    exec("from commons.cache import *", namespace)
    assert set(namespace) - {"__builtins__"} == PUBLIC_CACHE_API


def test_errors_form_one_tree_under_cache_error() -> None:
    for name in (
        "CacheUnavailableError",
        "BackendError",
        "BackendUnavailableError",
        "BackendRejectedError",
    ):
        assert issubclass(getattr(commons.cache, name), commons.cache.CacheError)


def test_no_module_of_the_package_is_hidden_by_an_exported_name() -> None:
    import pkgutil

    modules = {info.name for info in pkgutil.iter_modules(commons.cache.__path__)}
    hidden = modules & set(commons.cache.__all__)
    assert not hidden, f"`import commons.cache.<name>` returns the export, not the module: {hidden}"
