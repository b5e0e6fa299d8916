"""The public surface: exactly the names services and tests are meant to import."""

from __future__ import annotations

import importlib
import subprocess
import sys

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


def test_only_the_guides_cache_module_is_hidden_by_an_exported_name() -> None:
    """``import commons.cache.<name>`` returns the export, not the module, for an exported name
    that is also a module. The caching guide's layout names ``commons/cache/cache.py`` (backend
    selection) while ``cache`` is the decorator: that one module is hidden on purpose, and is still
    imported by ``from commons.cache.cache import ...`` (next test); no other may be."""
    import pkgutil

    modules = {info.name for info in pkgutil.iter_modules(commons.cache.__path__)}
    hidden = modules & set(commons.cache.__all__)
    assert hidden == {"cache"}, f"`import commons.cache.<name>` returns the export: {hidden}"


def test_the_guides_cache_module_selects_the_backend_while_cache_stays_the_decorator() -> None:
    """The guide's ``from commons.cache.cache import init_cache, close_cache`` gives the
    lifecycle's functions, and importing that module never rebinds the package's ``cache``: it
    stays the decorator, however the names are imported and in whichever order."""
    from commons.cache import cache
    from commons.cache.cache import close_cache, init_cache
    from commons.cache.decorator import cache as decorator
    from commons.cache.lifecycle import close_cache as lifecycle_close_cache
    from commons.cache.lifecycle import init_cache as lifecycle_init_cache

    assert init_cache is lifecycle_init_cache
    assert close_cache is lifecycle_close_cache
    assert cache is decorator
    assert commons.cache.cache is decorator
    namespace: dict[str, object] = {}
    exec("from commons.cache import cache", namespace)
    assert namespace["cache"] is decorator


def test_a_fresh_process_importing_the_guides_cache_module_first_keeps_the_decorator() -> None:
    """The same in a new interpreter whose first import is the guide's line (the order a
    service's ``main.py`` may use)."""
    script = (
        "from commons.cache.cache import close_cache, init_cache\n"
        "import commons.cache, commons.cache.decorator, commons.cache.lifecycle\n"
        "assert init_cache is commons.cache.lifecycle.init_cache\n"
        "assert close_cache is commons.cache.lifecycle.close_cache\n"
        "assert commons.cache.cache is commons.cache.decorator.cache\n"
        "from commons.cache import cache\n"
        "assert cache is commons.cache.decorator.cache\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
