r"""Multi-tenant and user-aware cache-key builders (fastapi-cache2 ``KeyBuilder`` compatible).

They take a request's identity, path and query to the inputs of an entry key; the key's text is
written by ``keyspace.py``, which owns the key format. Keys are exactly::

    {CACHE_PREFIX}:{namespace}:tenant_{tenant_id}:{url_path}:{md5}
    {CACHE_PREFIX}:{namespace}:tenant_{tenant_id}:user_{user_id}:{url_path}:{md5}
    {CACHE_PREFIX}:{namespace}:{url_path}:{md5}           (global_cache_key_builder: opt-in)

where ``md5`` is the hex digest of the canonical query string: parameters sorted by name, repeated
parameters kept in the order the client sent them, so ``?a=1&b=2`` and ``?b=2&a=1`` share an entry.
``url_path`` is the decoded request path as it is, except that ``%``, ``?``, ``#`` and ``\`` are
percent-encoded (``%25``, ``%3F``, ``%23``, ``%5C``): ``/items/a%3Fb`` (the path ``/items/a?b``)
and ``/items/a%253Fb`` (the path ``/items/a%3Fb``) are two paths, so two keys.

Any other key builder's text (:func:`scoped_key`) is scoped the same way: by the identity bound
to the request, never by what the text happens to say, so invalidating the tenant reaches every
entry a route stores, and a builder that leaves the tenant out cannot share an entry between two
tenants.

Fail closed: when the identity a builder needs is missing (or cannot be written into a key without
ambiguity), the builder returns a key whose ``cacheable`` is false. The cache then neither reads nor
writes anything for that request; the handler answers it. There is never a shared fallback key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

from commons.cache.keyspace import (
    entry_key,
    foreign_entry_key,
    global_entry_key,
    scope_of_key,
    split_qualified_namespace,
    uncacheable_key,
)
from commons.cache.memo import BoundedMemo, HotMemo, MemoShare, process_hot_memo, process_memo
from commons.cache.scope import CacheScope, ScopedKey, shared_scope
from commons.utilities.context import get_tenant_id, get_user_id

__all__ = [
    "canonical_query_digest",
    "global_cache_key_builder",
    "identity_read_by",
    "key_path",
    "scoped_key",
    "tenant_cache_key_builder",
    "tenant_user_cache_key_builder",
]

# An id becomes part of a key between ':' separators: a ':' inside it could make two different
# (tenant, path) pairs spell the same key, so such ids are refused rather than escaped. So are
# lone surrogates (a JSON claim may carry "\ud800"): no key holding one can be sent to Redis.
_VALID_ID = re.compile(r"[^\s:\ud800-\udfff]{1,256}")
_BAD_TENANT_ID = "tenant id holds ':', whitespace or a lone surrogate"
_BAD_USER_ID = "user id holds ':', whitespace or a lone surrogate"


_EMPTY_QUERY_DIGEST = hashlib.md5(b"", usedforsecurity=False).hexdigest()
# Query strings repeat (pagination, filters): their digests are kept, up to a bound in entries and
# bytes (any client can send long, distinct query strings), so a hit does not parse and hash the
# same query again. A query longer than a few kilobytes is hashed every time: remembering it would
# cost more than hashing it saves, and a fresh process would hold megabytes of junk queries.
_MEMO_OVERHEAD_BYTES = 200
_MEMO_MAX_QUERY_BYTES = 4096
_digest_memo: BoundedMemo[bytes, str] = process_memo(
    MemoShare.QUERY_DIGESTS,
    16_384,
    max_item_bytes=_MEMO_MAX_QUERY_BYTES + _MEMO_OVERHEAD_BYTES,
    admit_seen_twice=True,
)


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
        _digest_memo.put(raw, digest, len(raw) + _MEMO_OVERHEAD_BYTES)
    return digest


_ESCAPED_IN_PATHS = str.maketrans({"%": "%25", "?": "%3F", "#": "%23", "\\": "%5C"})


def key_path(path: str) -> str:
    """The ``url_path`` of a key: the decoded path, with ``%``, ``?``, ``#`` and ``\\`` escaped."""
    if "%" in path or "?" in path or "#" in path or "\\" in path:
        return path.translate(_ESCAPED_IN_PATHS)
    return path


# A key is a function of these inputs only; a hit finds its key again instead of validating the
# ids and formatting, hashing and scoping it anew. Bounded in entries and bytes. Every key is
# kept as its text and namespace (strings, which the cyclic collector never walks); only the keys
# built most recently are kept as ScopedKey objects (which it walks, with their scopes and routed
# copies): as many as the keys read while they fit in a few thousand, few over a larger working
# set, where rebuilding one costs less than full collections walking thousands (memo.HotMemo).
_KeyInputs = tuple[str, str, str | None, str, bytes]
_key_memo: BoundedMemo[_KeyInputs, tuple[str, str]] = process_memo(
    MemoShare.KEYS,
    16_384,
    max_item_bytes=2 * _MEMO_MAX_QUERY_BYTES + 4 * _MEMO_OVERHEAD_BYTES,
    admit_seen_twice=True,
)
_hot_key_memo: HotMemo[_KeyInputs, ScopedKey] = process_hot_memo(
    MemoShare.KEYS_AS_OBJECTS,
    max_item_bytes=2 * _MEMO_MAX_QUERY_BYTES + 4 * _MEMO_OVERHEAD_BYTES,
)


# What an identity that is missing at the key builder usually means.
_BIND_IN_ASYNC = (
    "the usual cause: it is bound in a sync `def` dependency, which runs in a worker thread "
    "whose context the endpoint never sees; bind it in an `async def` dependency"
)
_NO_TENANT = f"no tenant bound to the request ({_BIND_IN_ASYNC})"
_NO_USER = f"no user bound to the request ({_BIND_IN_ASYNC})"


#: Why one of our builders refused the request being keyed, until :func:`scoped_key` takes the
#: key: a builder wrapping ours may turn the refusal into any text (appended to, hashed), which
#: must not become a key of the tenant's (fail closed). Each request runs in a context of its own.
_refused: ContextVar[str | None] = ContextVar("commons_cache_key_refused", default=None)


#: What every uncacheable key's text holds (see ``keyspace.uncacheable_key``).
_UNCACHEABLE_MARK = uncacheable_key("")


def _uncacheable(qualified_namespace: str, reason: str) -> ScopedKey:
    """A key never read or written, saying why: the route logs it once (a request without an
    identity is routine for some clients; one line per request would drown the log). Our
    builders' refusal, remembered for :func:`scoped_key`."""
    _refused.set(reason)
    return _not_a_key(qualified_namespace, reason)


def _not_a_key(qualified_namespace: str, reason: str) -> ScopedKey:
    key = ScopedKey(uncacheable_key(qualified_namespace), None)
    key.reason = reason
    return key


def _build(
    qualified_namespace: str,
    request: Request | None,
    func: object,
    response: Response | None,
    *,
    per_user: bool,
) -> ScopedKey:
    if request is None:
        return _uncacheable(qualified_namespace, "no request to build a key from")
    tenant_id = get_tenant_id()
    if tenant_id is None:
        return _uncacheable(qualified_namespace, _NO_TENANT)
    user_id = None
    if per_user:
        user_id = get_user_id()
        if user_id is None:
            return _uncacheable(qualified_namespace, _NO_USER)
    path: str = request.scope["path"]
    query: bytes = request.scope.get("query_string", b"")
    # A user builder's inputs always hold a user id, a tenant builder's never: the two kinds of
    # key cannot be mistaken for each other here.
    memo_key = (qualified_namespace, tenant_id, user_id, path, query)
    built = _hot_key_memo.get(memo_key)
    route = request.scope.get("route")
    if built is None:
        built = _remembered(memo_key, route, func)
    if built is None:
        origin = None if route is None else (route, func)
        built = _build_new(qualified_namespace, request, tenant_id, user_id, origin)
        if built.scope is None:
            return built
        size = _memo_size(memo_key, built)
        _key_memo.put(memo_key, (str(built), built.scope.namespace), size)
        _hot_key_memo.put(memo_key, built, size)
    return _for_request(built, request, func, response)


def _remembered(memo_key: _KeyInputs, route: object, func: object) -> ScopedKey | None:
    """The key built before for these inputs, made again from its text for ``route`` and
    ``func`` (and kept as an object while it is among the most recent)."""
    found = _key_memo.get(memo_key)
    if found is None:
        return None
    key, namespace = found
    origin = None if route is None else (route, func)
    built = ScopedKey(key, shared_scope(namespace, memo_key[1], memo_key[2], ()), origin)
    _hot_key_memo.put(memo_key, built, _memo_size(memo_key, key))
    return built


def _memo_size(memo_key: _KeyInputs, key: str) -> int:
    """What remembering ``key`` for ``memo_key`` holds, in bytes (path and query twice: in the
    inputs and in the key)."""
    return 2 * (len(memo_key[3]) + len(memo_key[4])) + len(key) + _MEMO_OVERHEAD_BYTES


def _for_request(
    built: ScopedKey, request: Request, func: object, response: Response | None
) -> ScopedKey:
    """``built`` with what the fastapi-cache2 adapter reads: the route and handler it was built
    for (its fingerprint) and the request's response (its ``Vary``)."""
    route = request.scope.get("route")
    if route is not None:
        built = built.with_origin(route, func)
    return built if response is None else built.with_response(response)


def _build_new(
    qualified_namespace: str,
    request: Request,
    tenant_id: str,
    user_id: str | None,
    origin: tuple[object, object] | None,
) -> ScopedKey:
    if not _VALID_ID.fullmatch(tenant_id):
        return _uncacheable(qualified_namespace, _BAD_TENANT_ID)
    if user_id is not None and not _VALID_ID.fullmatch(user_id):
        return _uncacheable(qualified_namespace, _BAD_USER_ID)
    path = key_path(request.scope["path"])
    key = entry_key(qualified_namespace, tenant_id, user_id, path, canonical_query_digest(request))
    # fastapi-cache2 passes "{prefix}:{namespace}"; a bare prefix is the empty namespace.
    namespace = split_qualified_namespace(qualified_namespace)[1] or ""
    # Made for its route and handler at once (``_for_request`` then has nothing to copy), with
    # the scope object its other keys share: a memo keyed by scope finds it by identity.
    return ScopedKey(key, shared_scope(namespace, tenant_id, user_id, ()), origin)


def scoped_key(built: object, qualified_namespace: str) -> ScopedKey:
    """The key, with its scope, of an entry whose text a key builder returned (anything but a
    ``str``: uncacheable, saying what it returned).

    Our builders' keys carry their scope already. Any other text is scoped by the request's bound
    identity: kept as it is when it names exactly that tenant (and user, if any) in this
    namespace, as a builder wrapping ours does; otherwise stored inside the bound tenant's scope
    (``keyspace.foreign_entry_key``), so ``invalidate_namespace(ns, tenant_id=...)`` removes it.
    No tenant bound: uncacheable, as with our builders; so is any text made by a builder that
    called ours and was refused a key (no user bound, say), however it changed our key's text.
    """
    refused = _refused.get()
    if refused is not None:
        _refused.set(None)
    if isinstance(built, ScopedKey):
        return built
    if not isinstance(built, str):
        what = type(built).__name__
        return _not_a_key(qualified_namespace, f"the key builder returned {what}, not a str")
    if refused is not None or _UNCACHEABLE_MARK in built:
        why = refused or "a key builder wrapping ours was given an uncacheable key"
        return _not_a_key(qualified_namespace, f"the key builder's own key rests on ours: {why}")
    tenant_id = get_tenant_id()
    if tenant_id is None:
        return _not_a_key(qualified_namespace, _NO_TENANT)
    if not _VALID_ID.fullmatch(tenant_id):
        return _not_a_key(qualified_namespace, _BAD_TENANT_ID)
    prefix, namespace = split_qualified_namespace(qualified_namespace)
    named = scope_of_key(prefix, built)
    if (
        named is not None
        and named.namespace == (namespace or "")
        and named.tenant_id == tenant_id
        and named.user_id in (None, get_user_id())
        and built.startswith(qualified_namespace + ":")
    ):
        return ScopedKey(built, named)
    key = foreign_entry_key(qualified_namespace, tenant_id, built)
    return ScopedKey(key, CacheScope(namespace or "", tenant_id))


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
        func: The cached endpoint (with the route, what fastapi-cache2's entries are
            fingerprinted by).
        namespace: ``"{CACHE_PREFIX}:{namespace}"``, as fastapi-cache2's decorator passes it.
        request: The request being served.
        response: The request's response, when the decorator has one (fastapi-cache2's): kept
            with the key, so that an answer whose handler set ``Vary`` on it is not stored.
        args: Unused; part of the protocol.
        kwargs: Unused; part of the protocol.

    Returns:
        ``{prefix}:{namespace}:tenant_{tenant_id}:{url_path}:{md5}``, or an uncacheable key when no
        tenant is bound.
    """
    return _build(namespace, request, func, response, per_user=False)


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
    return _build(namespace, request, func, response, per_user=True)


def global_cache_key_builder(
    func: Callable[..., Any],
    namespace: str = "",
    *,
    request: Request | None = None,
    response: Response | None = None,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> str:
    """Builds a key shared by every caller: the explicit opt-in for answers that depend on nothing
    of who asks (a catalogue, public configuration).

    The identity is not read: every tenant and user, and requests with none, get one entry per
    path and query. Its answers are not ``private`` (they hold nothing private). Invalidate it
    with ``invalidate_namespace(namespace)``: a tenant's invalidation never touches it.

    Returns:
        ``{prefix}:{namespace}:{url_path}:{md5}``.
    """
    if request is None:
        return _uncacheable(namespace, "no request to build a key from")
    key = global_entry_key(
        namespace, key_path(request.scope["path"]), canonical_query_digest(request)
    )
    built = ScopedKey(key, CacheScope(split_qualified_namespace(namespace)[1] or ""))
    return _for_request(built, request, func, response)


def _tenant_identity() -> str | None:
    return get_tenant_id()


def _tenant_user_identity() -> tuple[str, str] | None:
    tenant_id, user_id = get_tenant_id(), get_user_id()
    return None if tenant_id is None or user_id is None else (tenant_id, user_id)


def _no_identity() -> str:
    return ""


#: Our builders, and what each reads of the request's identity.
_IDENTITY_READ_BY: dict[object, Callable[[], object]] = {
    tenant_cache_key_builder: _tenant_identity,
    tenant_user_cache_key_builder: _tenant_user_identity,
    global_cache_key_builder: _no_identity,
}


def identity_read_by(key_builder: object) -> Callable[[], object] | None:
    """For one of our builders, a function returning what its key depends on besides the
    namespace, the path and the query: the identity it reads (``None`` when it has none to
    read: no cacheable key). Two requests of one route with equal path, query and identity get
    the same key. ``None`` for any other builder, whose key may depend on anything."""
    return _IDENTITY_READ_BY.get(key_builder)
