"""Multi-tenant and user-aware cache-key builders (fastapi-cache2 ``KeyBuilder`` compatible).

Keys are exactly::

    {CACHE_PREFIX}:{namespace}:tenant_{tenant_id}:{url_path}:{md5}
    {CACHE_PREFIX}:{namespace}:tenant_{tenant_id}:user_{user_id}:{url_path}:{md5}

where ``md5`` is the hex digest of the canonical query string: parameters sorted by name, repeated
parameters kept in the order the client sent them, so ``?a=1&b=2`` and ``?b=2&a=1`` share an entry.

Fail closed: when the identity a builder needs is missing (or cannot be written into a key without
ambiguity), the builder returns a key whose ``cacheable`` is false. The cache then neither reads nor
writes anything for that request; the handler answers it. There is never a shared fallback key.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

from commons.cache.scope import CacheScope, ScopedKey
from commons.utilities.context import get_tenant_id, get_user_id

__all__ = [
    "canonical_query_digest",
    "tenant_cache_key_builder",
    "tenant_user_cache_key_builder",
]

logger = logging.getLogger("commons.cache")

# An id becomes part of a key between ':' separators: a ':' inside it could make two different
# (tenant, path) pairs spell the same key, so such ids are refused rather than escaped.
_VALID_ID = re.compile(r"[^\s:]{1,256}")


_EMPTY_QUERY_DIGEST = hashlib.md5(b"", usedforsecurity=False).hexdigest()
# Query strings repeat (pagination, filters): their digests are kept, up to a bound, so a hit does
# not parse and hash the same query again.
_DIGEST_MEMO_MAX = 4096
_digest_memo: dict[bytes, str] = {}


def canonical_query_digest(request: Request) -> str:
    """The md5 hex digest of the request's query string in canonical order."""
    raw = request.scope.get("query_string", b"")
    if not raw:
        return _EMPTY_QUERY_DIGEST
    digest = _digest_memo.get(raw)
    if digest is None:
        items = sorted(request.query_params.multi_items(), key=lambda item: item[0])
        canonical = urlencode(items)
        digest = hashlib.md5(canonical.encode(), usedforsecurity=False).hexdigest()
        if len(_digest_memo) >= _DIGEST_MEMO_MAX:
            _digest_memo.clear()
        _digest_memo[raw] = digest
    return digest


def _plain_path(path: str) -> bool:
    """Whether ``request.url.path`` is the scope's path as it is (no URL needs building)."""
    return not (path.startswith("//") or "?" in path or "#" in path or "\\" in path)


def _url_path(request: Request) -> str:
    """``request.url.path``, without building the URL in the common case."""
    path: str = request.scope["path"]
    return path if _plain_path(path) else request.url.path


# A key is a function of these inputs only; a hit finds its key again instead of validating the
# ids and formatting, hashing and scoping it anew. Bounded: when full, it starts over.
_KEY_MEMO_MAX = 4096
_key_memo: dict[tuple[str, str, str | None, str, bytes], ScopedKey] = {}


def _split_namespace(qualified_namespace: str) -> str:
    # fastapi-cache2 passes "{prefix}:{namespace}"; a prefix never holds ':'.
    _, _, namespace = qualified_namespace.partition(":")
    return namespace


def _uncacheable(qualified_namespace: str, reason: str) -> ScopedKey:
    logger.warning("serving uncached: %s (namespace %r)", reason, qualified_namespace)
    return ScopedKey(f"{qualified_namespace}:#uncacheable", None)


def _build(qualified_namespace: str, request: Request | None, *, per_user: bool) -> ScopedKey:
    if request is None:
        return _uncacheable(qualified_namespace, "no request to build a key from")
    tenant_id = get_tenant_id()
    if tenant_id is None:
        return _uncacheable(qualified_namespace, "no tenant bound to the request")
    user_id = None
    if per_user:
        user_id = get_user_id()
        if user_id is None:
            return _uncacheable(qualified_namespace, "no user bound to the request")
    path: str = request.scope["path"]
    # A user builder's inputs always hold a user id, a tenant builder's never: the two kinds of
    # key cannot be mistaken for each other here.
    memo_key = (
        qualified_namespace,
        tenant_id,
        user_id,
        path,
        request.scope.get("query_string", b""),
    )
    known = _key_memo.get(memo_key)
    if known is not None:
        return known
    built = _build_new(qualified_namespace, request, tenant_id, user_id)
    if built.scope is not None and _plain_path(path):
        if len(_key_memo) >= _KEY_MEMO_MAX:
            _key_memo.clear()
        _key_memo[memo_key] = built
    return built


def _build_new(
    qualified_namespace: str,
    request: Request,
    tenant_id: str,
    user_id: str | None,
) -> ScopedKey:
    if not _VALID_ID.fullmatch(tenant_id):
        return _uncacheable(qualified_namespace, "tenant id holds ':' or whitespace")
    scope_text = f"tenant_{tenant_id}"
    if user_id is not None:
        if not _VALID_ID.fullmatch(user_id):
            return _uncacheable(qualified_namespace, "user id holds ':' or whitespace")
        scope_text = f"{scope_text}:user_{user_id}"
    key = (
        f"{qualified_namespace}:{scope_text}:{_url_path(request)}:{canonical_query_digest(request)}"
    )
    scope = CacheScope(_split_namespace(qualified_namespace), tenant_id, user_id)
    return ScopedKey(key, scope)


def tenant_cache_key_builder(
    func: Callable[..., Any],
    namespace: str = "",
    *,
    request: Request | None = None,
    response: Response | None = None,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> str:
    """Builds a tenant-scoped key for the current request.

    Args:
        func: The cached endpoint (unused; part of the ``KeyBuilder`` protocol).
        namespace: ``"{CACHE_PREFIX}:{namespace}"``, as fastapi-cache2's decorator passes it.
        request: The request being served.
        response: Unused; part of the protocol.
        args: Unused; part of the protocol.
        kwargs: Unused; part of the protocol.

    Returns:
        ``{prefix}:{namespace}:tenant_{tenant_id}:{url_path}:{md5}``, or an uncacheable key when no
        tenant is bound.
    """
    return _build(namespace, request, per_user=False)


def tenant_user_cache_key_builder(
    func: Callable[..., Any],
    namespace: str = "",
    *,
    request: Request | None = None,
    response: Response | None = None,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> str:
    """Builds a key scoped to the current tenant and user (for ``/me``-style responses).

    Returns:
        ``{prefix}:{namespace}:tenant_{tenant_id}:user_{user_id}:{url_path}:{md5}``, or an
        uncacheable key when the tenant or the user is missing.
    """
    return _build(namespace, request, per_user=True)
