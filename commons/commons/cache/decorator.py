"""``@cache``: the route decorator.

It takes fastapi-cache2's parameters (``expire``, ``coder``, ``key_builder``, ``namespace``) and
builds the same keys, but stores what the client receives: on a miss the handler's result is
rendered once to bytes exactly as FastAPI would render it for the route (its ``response_model``,
``response_class``, ``status_code`` and ``response_model_*`` options), and a hit sends those bytes
back as the response without decoding, validating or serialising anything.

This module only decorates: it checks the arguments and gives the endpoint the ``Request`` and
``Response`` parameters it needs. What happens to each request is ``request_flow.py``'s (bypass,
HIT, STALE, 304), ``fill.py``'s (a MISS computed once) and ``replica_lock.py``'s (once across
replicas); ``cached_route.py`` holds what the route knows (rendering, fingerprint, replays).

Stale entries (stale-while-revalidate, stale-if-error): an entry is written for ``expire +
max(stale_ttl, stale_if_error)`` seconds and says in its header how many of them are its stale
window (see ``entry.py``); it is fresh while more than that many seconds remain. The remaining
time comes from the store's own clock (Redis's for Redis), so replicas agree on freshness
whatever their clocks say. Every stored value also carries the route's fingerprint
(``entry.route_fingerprint``), so an entry of another version of the route is a miss.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps
from inspect import Parameter, Signature
from typing import Any, ParamSpec, Protocol, TypeVar, cast, overload

from fastapi.dependencies.utils import get_typed_signature
from fastapi_cache.coder import Coder, PickleCoder
from fastapi_cache.types import KeyBuilder
from starlette.requests import Request
from starlette.responses import Response

from commons.cache.cached_route import CachedRoute
from commons.cache.keys import tenant_cache_key_builder
from commons.cache.keyspace import check_namespace
from commons.cache.rendering import resolved_return_annotation
from commons.cache.request_flow import RequestFlow
from commons.cache.settings import LONGEST_LIFETIME_SECONDS
from commons.cache.startup_checks import record_wrapper
from commons.cache.tags import EntryTags, TagSource

__all__ = ["cache"]

P = ParamSpec("P")
R = TypeVar("R")


class CacheDecorator(Protocol):
    """What ``cache(...)`` returns: it takes an async or a sync handler, and gives back an async
    one with the same parameters and result type (called directly, outside a request, it runs
    the handler; a cached answer only ever goes to FastAPI, which sends it as it is)."""

    @overload
    def __call__(self, func: Callable[P, Awaitable[R]], /) -> Callable[P, Awaitable[R]]: ...

    @overload
    def __call__(self, func: Callable[P, R], /) -> Callable[P, Awaitable[R]]: ...


def _param_of_type(signature: Signature, kind: type) -> Parameter | None:
    return next(
        (
            p
            for p in signature.parameters.values()
            if isinstance(p.annotation, type) and issubclass(p.annotation, kind)
        ),
        None,
    )


def _check_arguments(
    namespace: str,
    coder: type[Coder] | None,
    expire: int | None,
    stale_ttl: int | None,
    stale_if_error: int | None,
    client_max_age: int | None,
) -> None:
    check_namespace(namespace)
    if coder is not None and issubclass(coder, PickleCoder):
        raise ValueError("cached values are JSON: PickleCoder would let a writable Redis run code")
    seconds = {
        "expire": expire,
        "stale_ttl": stale_ttl,
        "stale_if_error": stale_if_error,
        "client_max_age": client_max_age,
    }
    if expire == 0:
        # fastapi-cache2 reads 0 as "the default", Redis as "no expiry", a reader as "never
        # cache": whichever was meant, the entry would live CACHE_TTL_SECONDS.
        raise ValueError(
            "expire=0 would cache for CACHE_TTL_SECONDS: leave expire out for that, give the "
            "seconds an entry lives, or remove @cache to not cache"
        )
    for name, value in seconds.items():
        if value is not None and not 0 <= value <= LONGEST_LIFETIME_SECONDS:
            raise ValueError(
                f"{name} must be between 0 and {LONGEST_LIFETIME_SECONDS} seconds (ten years)"
            )


def _injectable(namespace: str) -> tuple[Parameter, Parameter]:
    """The ``Request`` and ``Response`` parameters added to a route that lacks them."""
    return (
        Parameter(name=f"{namespace}_request", annotation=Request, kind=Parameter.KEYWORD_ONLY),
        Parameter(name=f"{namespace}_response", annotation=Response, kind=Parameter.KEYWORD_ONLY),
    )


def _with_injected(
    func: Callable[..., object], signature: Signature, injected: list[Parameter]
) -> Signature:
    """``func``'s signature with ``injected`` keyword-only parameters before any ``**kwargs``."""
    parameters = list(signature.parameters.values())
    tail = [p for p in parameters if p.kind is Parameter.VAR_KEYWORD]
    head = [p for p in parameters if p.kind is not Parameter.VAR_KEYWORD]
    return Signature(
        parameters=[*head, *injected, *tail],
        return_annotation=resolved_return_annotation(func),
    )


def cache(
    expire: int | None = None,
    coder: type[Coder] | None = None,
    key_builder: KeyBuilder | None = None,
    namespace: str = "",
    injected_dependency_namespace: str = "__fastapi_cache",
    *,
    distributed_lock: bool | None = None,
    stale_ttl: int | None = None,
    stale_if_error: int | None = None,
    client_max_age: int | None = None,
    tags: TagSource | None = None,
) -> CacheDecorator:
    """Caches a route's responses (``async def`` and ``def`` handlers alike).

    Args:
        expire: Seconds an entry is fresh; ``CACHE_TTL_SECONDS`` by default.
        coder: A fastapi-cache2 ``Coder`` that turns the handler's result into the stored JSON
            body; by default the route renders it, as FastAPI would.
        key_builder: fastapi-cache2 ``KeyBuilder``; ``tenant_cache_key_builder`` by default.
        namespace: Groups entries for ``invalidate_namespace()``. No ``:`` in it.
        injected_dependency_namespace: Name prefix of the parameters added to the route.
        distributed_lock: Take a short Redis lock on a miss so replicas compute once;
            ``CACHE_DISTRIBUTED_LOCK`` by default.
        stale_ttl: Seconds an entry is kept past its freshness and served (``X-FastAPI-Cache:
            STALE``) while one background refresh recomputes it; ``None`` (default): never.
        stale_if_error: Seconds an entry may be served once stale when computing a fresh answer
            fails (the handler raises, or answers 5xx): ``X-FastAPI-Cache: STALE``, the failure
            logged and counted. Never an invalidated entry. ``CACHE_STALE_IF_ERROR_SECONDS`` by
            default (0: never).
        client_max_age: Seconds a client may reuse an answer without asking (``max-age``, at
            most the entry's freshness). ``None``: ``no-cache``, the client revalidates with the
            ``ETag`` (a ``304`` if unchanged) and never uses an answer from before an update.
        tags: What ``invalidate_tags()`` finds the entries by, across namespaces: literal tags
            where ``{name}`` is the handler's argument ``name`` (``["insight:{insight_id}"]``),
            or a function of the handler's keyword arguments returning them (see ``tags.py``).

    Raises:
        ValueError: At decoration time, for a namespace holding ``:``, a pickle coder, an
            ``expire`` / ``stale_ttl`` / ``stale_if_error`` / ``client_max_age`` negative or
            above ten years, an ``expire`` of 0, or tags that ``tags.EntryTags`` refuses (too
            many, empty, over-long, unknown ``{name}``).
        TypeError: For ``@cache`` written without parentheses.
    """
    if callable(expire):
        raise TypeError(
            "@cache needs parentheses: write @cache() or @cache(expire=...), not @cache"
        )
    _check_arguments(namespace, coder, expire, stale_ttl, stale_if_error, client_max_age)
    chosen_key_builder: KeyBuilder = key_builder or tenant_cache_key_builder
    injected_request, injected_response = _injectable(injected_dependency_namespace)

    def decorate(func: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        signature = get_typed_signature(func)
        key_builder_of_route = chosen_key_builder
        if tags is not None:
            key_builder_of_route = EntryTags(tags, signature.parameters).key_builder(
                chosen_key_builder
            )
        route = CachedRoute(
            func,
            coder=coder,
            expire=expire,
            stale_ttl=stale_ttl or 0,
            stale_if_error=stale_if_error,
            lock=distributed_lock,
            client_max_age=client_max_age,
        )
        answer = RequestFlow(route, namespace, key_builder_of_route).answer
        endpoint = _endpoint(func, signature, answer, injected_request, injected_response)
        route.endpoint = endpoint
        # A route serving func itself, and none its wrapper: @cache above the route decorator.
        record_wrapper(func, endpoint)
        return endpoint

    return cast(CacheDecorator, decorate)


def _endpoint(
    func: Callable[..., Any],
    signature: Signature,
    answer: Callable[..., Awaitable[Any]],
    injected_request: Parameter,
    injected_response: Parameter,
) -> Callable[..., Awaitable[Any]]:
    """The route's endpoint: ``func``'s parameters, with the ``Request`` and ``Response`` it
    lacks injected, answering through ``answer``."""
    request_param = _param_of_type(signature, Request)
    response_param = _param_of_type(signature, Response)
    inject_request = request_param is None
    inject_response = response_param is None
    request_name = injected_request.name if request_param is None else request_param.name
    response_name = injected_response.name if response_param is None else response_param.name

    @wraps(func)
    async def endpoint(*args: Any, **kwargs: Any) -> Any:
        # The injected parameters are ours: the handler never sees them.
        request = kwargs.pop(request_name, None) if inject_request else kwargs.get(request_name)
        sub_response = (
            kwargs.pop(response_name, None) if inject_response else kwargs.get(response_name)
        )
        return await answer(request, sub_response, args, kwargs)

    injected = [
        *([injected_request] if inject_request else []),
        *([injected_response] if inject_response else []),
    ]
    if injected:
        endpoint.__signature__ = _with_injected(func, signature, injected)  # type: ignore[attr-defined]
    return endpoint
