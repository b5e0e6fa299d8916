"""``@cache``: the route decorator.

It takes fastapi-cache2's parameters (``expire``, ``coder``, ``key_builder``, ``namespace``) and
builds the same keys, but stores what the client receives: on a miss the handler's result is
rendered once to bytes (through the return annotation, as FastAPI's ``response_model`` would), and
a hit sends those bytes back as the response without decoding, validating or serialising anything.

Per request:

1. Not a GET/HEAD, caching disabled, or no identity to build a key from: the handler answers,
   nothing is read or stored (fail closed).
2. Stored: replayed with ``X-FastAPI-Cache: HIT``, an ``ETag`` digest of the bytes (``304`` on a
   matching ``If-None-Match``) and ``Cache-Control: private`` for tenant- or user-scoped entries.
3. Missing: concurrent misses of the key in this process run the handler once (single-flight), and
   with ``distributed_lock`` once across replicas too; exceptions and non-2xx answers are never
   stored.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable
from functools import wraps
from inspect import Parameter, Signature, isawaitable, iscoroutinefunction
from typing import Any, ParamSpec, TypeVar

from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.utils import get_typed_return_annotation, get_typed_signature
from fastapi.encoders import jsonable_encoder
from fastapi_cache.coder import Coder, PickleCoder
from fastapi_cache.types import KeyBuilder
from pydantic import TypeAdapter
from starlette.requests import Request
from starlette.responses import Response

from commons.cache.cache import current_layer
from commons.cache.entry import CachedResponse, decode_entry, encode_entry
from commons.cache.events import LookupOutcome
from commons.cache.http import cacheable_response, replay
from commons.cache.keys import tenant_cache_key_builder
from commons.cache.layer import CacheLayer
from commons.cache.scope import ScopedKey
from commons.cache.singleflight import SingleFlight

__all__ = ["cache"]

P = ParamSpec("P")
R = TypeVar("R")

_CACHEABLE_METHODS = frozenset({"GET", "HEAD"})
_LOCK_POLL_SECONDS = 0.02
_flights: SingleFlight[CachedResponse | Response] = SingleFlight()


def _json_bytes(value: Any) -> bytes:
    # The same rendering as FastAPI's JSONResponse.
    return json.dumps(
        jsonable_encoder(value), ensure_ascii=False, allow_nan=False, separators=(",", ":")
    ).encode("utf-8")


def _adapter_for(annotation: Any) -> TypeAdapter[Any] | None:
    if annotation is None or annotation is Parameter.empty:
        return None
    if isinstance(annotation, type) and issubclass(annotation, Response):
        return None
    try:
        return TypeAdapter(annotation)
    except Exception:  # an annotation pydantic cannot handle falls back to FastAPI's encoder
        return None


def _client_refuses_stored(request: Request, layer: CacheLayer) -> bool:
    if not layer.settings.CACHE_HONOR_CLIENT_NO_CACHE:
        return False
    directives = request.headers.get("cache-control", "").lower()
    return "no-cache" in directives or "no-store" in directives


def cache(
    expire: int | None = None,
    coder: type[Coder] | None = None,
    key_builder: KeyBuilder | None = None,
    namespace: str = "",
    injected_dependency_namespace: str = "__fastapi_cache",
    *,
    distributed_lock: bool | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R | Response]]]:
    """Caches a route's responses.

    Args:
        expire: Seconds an entry lives; ``CACHE_TTL_SECONDS`` by default.
        coder: A fastapi-cache2 ``Coder`` that turns the handler's result into the stored JSON
            body; by default the return annotation renders it, as FastAPI would.
        key_builder: fastapi-cache2 ``KeyBuilder``; ``tenant_cache_key_builder`` by default.
        namespace: Groups entries for ``invalidate_namespace()``. No ``:`` in it.
        injected_dependency_namespace: Name prefix of the request parameter added to the route.
        distributed_lock: Take a short Redis lock on a miss so replicas compute once;
            ``CACHE_DISTRIBUTED_LOCK`` by default.

    Raises:
        ValueError: At decoration time, for a namespace holding ``:`` or a pickle coder.
    """
    if ":" in namespace:
        raise ValueError(f"cache namespace {namespace!r} must not contain ':'")
    if coder is not None and issubclass(coder, PickleCoder):
        raise ValueError("cached values are JSON: PickleCoder would let a writable Redis run code")
    chosen_key_builder: KeyBuilder = key_builder or tenant_cache_key_builder
    injected_request = Parameter(
        name=f"{injected_dependency_namespace}_request",
        annotation=Request,
        kind=Parameter.KEYWORD_ONLY,
    )

    def decorate(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R | Response]]:
        signature = get_typed_signature(func)
        request_param = next(
            (p for p in signature.parameters.values() if p.annotation is Request), None
        )
        inject_request = request_param is None
        request_name = injected_request.name if request_param is None else request_param.name
        adapter: list[TypeAdapter[Any] | None] = []

        def render(result: Any) -> CachedResponse | Response:
            if isinstance(result, Response):
                return cacheable_response(result) or result
            if coder is not None:
                return CachedResponse(coder.encode(result))
            if not adapter:
                adapter.append(_adapter_for(get_typed_return_annotation(func)))
            type_adapter = adapter[0]
            if type_adapter is None:
                return CachedResponse(_json_bytes(result))
            value = type_adapter.validate_python(result, from_attributes=True)
            return CachedResponse(type_adapter.dump_json(value, by_alias=True))

        async def call_handler(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if iscoroutinefunction(func):
                return await func(*args, **kwargs)
            return await run_in_threadpool(func, *args, **kwargs)

        @wraps(func)
        async def endpoint(*args: P.args, **kwargs: P.kwargs) -> R | Response:
            request = kwargs.get(request_name)
            if inject_request:
                kwargs.pop(request_name, None)
            layer = current_layer()
            if layer is None or not layer.enabled:
                if layer is not None:
                    layer.events.lookup(namespace, LookupOutcome.BYPASS_DISABLED)
                return await call_handler(args, kwargs)  # type: ignore[no-any-return]
            if not isinstance(request, Request) or request.method not in _CACHEABLE_METHODS:
                return await call_handler(args, kwargs)  # type: ignore[no-any-return]

            built = chosen_key_builder(
                func,
                f"{layer.prefix}:{namespace}",
                request=request,
                response=None,
                args=args,
                kwargs=kwargs,
            )
            key = await built if isawaitable(built) else built
            if layer.scope_of(key) is None:
                layer.events.lookup(namespace, LookupOutcome.BYPASS_NO_IDENTITY)
                return await call_handler(args, kwargs)  # type: ignore[no-any-return]
            private = isinstance(key, ScopedKey) and key.is_private
            ttl = expire or layer.settings.CACHE_TTL_SECONDS

            if _client_refuses_stored(request, layer):
                layer.events.lookup(namespace, LookupOutcome.BYPASS_CLIENT)
            else:
                remaining, raw = await layer.get_with_ttl(key)
                if raw is not None:
                    try:
                        stored = decode_entry(raw)
                    except (ValueError, KeyError, TypeError):
                        stored = None  # an entry we cannot read is a miss
                    if stored is not None:
                        layer.events.lookup(namespace, LookupOutcome.HIT)
                        return replay(
                            stored,
                            ttl=remaining,
                            status="HIT",
                            private=private,
                            request_headers=request.headers,
                        )

            async def compute() -> CachedResponse | Response:
                fill_token = layer.fill_token(key)
                rendered = render(await call_handler(args, kwargs))
                if isinstance(rendered, CachedResponse):
                    await layer.set(key, encode_entry(rendered), ttl, fill_token=fill_token)
                return rendered

            layer.events.lookup(namespace, LookupOutcome.MISS)
            use_lock = (
                layer.settings.CACHE_DISTRIBUTED_LOCK
                if distributed_lock is None
                else distributed_lock
            )
            work = (
                (lambda: _compute_once_across_replicas(layer, key, compute))
                if use_lock
                else compute
            )
            outcome = await _flights.run(key, work, layer.settings.CACHE_LOCK_TIMEOUT_SECONDS)
            if isinstance(outcome, Response):
                return outcome
            return replay(
                outcome, ttl=ttl, status="MISS", private=private, request_headers=request.headers
            )

        if inject_request:
            parameters = list(signature.parameters.values())
            tail = [p for p in parameters if p.kind is Parameter.VAR_KEYWORD]
            head = [p for p in parameters if p.kind is not Parameter.VAR_KEYWORD]
            endpoint.__signature__ = Signature(  # type: ignore[attr-defined]
                parameters=[*head, injected_request, *tail],
                return_annotation=signature.return_annotation,
            )
        return endpoint

    return decorate


async def _compute_once_across_replicas(
    layer: CacheLayer,
    key: str,
    compute: Callable[[], Awaitable[CachedResponse | Response]],
) -> CachedResponse | Response:
    """Computes under a short Redis lock; others poll for the entry while the lock is held."""
    lock_key = f"{layer.prefix}:#lock:{key}"
    token = secrets.token_bytes(16)
    wait = layer.settings.CACHE_LOCK_TIMEOUT_SECONDS
    lock_ms = int(wait * 1000)
    acquired = await layer.try_lock(lock_key, token, lock_ms)
    if acquired is False:
        deadline = asyncio.get_running_loop().time() + wait
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(_LOCK_POLL_SECONDS)
            _, raw = await layer.get_with_ttl(key)
            if raw is not None:
                return decode_entry(raw)
            acquired = await layer.try_lock(lock_key, token, lock_ms)
            if acquired is not False:
                break
    try:
        return await compute()
    finally:
        if acquired:
            await layer.unlock(lock_key, token)
