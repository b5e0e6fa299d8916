"""``@cache``: the route decorator.

It takes fastapi-cache2's parameters (``expire``, ``coder``, ``key_builder``, ``namespace``) and
builds the same keys, but stores what the client receives: on a miss the handler's result is
rendered once to bytes exactly as FastAPI would render it for the route (its ``response_model``,
``response_class``, ``status_code`` and ``response_model_*`` options), and a hit sends those bytes
back as the response without decoding, validating or serialising anything.

Per request:

1. Not a GET/HEAD, caching disabled, or no identity to build a key from: the handler answers,
   nothing is read or stored (fail closed).
2. Stored and fresh: replayed with ``X-FastAPI-Cache: HIT``, an ``ETag`` digest of the bytes
   (``304`` on a matching ``If-None-Match``), ``Cache-Control: max-age=<remaining freshness>``,
   ``private`` and ``Vary: Authorization`` for tenant- or user-scoped entries. The encoded headers
   and the ETag of a stored body are computed once and reused while the stored bytes stay the same.
3. Stored but stale (only with ``stale_ttl``): replayed at once with ``X-FastAPI-Cache: STALE`` and
   ``max-age=0``; after the response is sent, one refresh per key and process (single-flight, and
   with ``distributed_lock`` one across replicas) recomputes and stores the entry.
4. Missing: concurrent misses of the key in this process run the handler once (single-flight), and
   with ``distributed_lock`` once across replicas too; exceptions and non-2xx answers are never
   stored. A computation belongs to the generation its read saw (``layer.FillToken``): a request
   whose read comes after an invalidation never joins one that began before it. Waiters receive
   only an answer that may be stored; any other answer (``no-store``, ``private``, non-2xx, a
   cookie, an exception) is its own request's, and every waiter then runs the handler itself.

Stale-while-revalidate: an entry is written for ``expire + stale_ttl`` seconds and says in its
header how many of them are its stale window (see ``entry.py``); it is fresh while more than that
many seconds remain. The remaining time comes from the store's own clock (Redis's for Redis), so
replicas agree on freshness whatever their clocks say. Every stored value also carries the route's
fingerprint (``rendering.route_fingerprint``), so an entry of another version of the route is a
miss.

Headers and cookies that the route's dependencies set on FastAPI's ``Response`` parameter are sent
with every answer (HIT or MISS) and never stored; headers the handler sets there are part of the
stored answer, and a cookie set by the handler makes the answer uncacheable.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from functools import wraps
from inspect import Parameter, Signature, iscoroutinefunction
from typing import Any, ParamSpec, TypeVar

from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.utils import get_typed_return_annotation, get_typed_signature
from fastapi.routing import APIRoute
from fastapi_cache.coder import Coder, PickleCoder
from fastapi_cache.types import KeyBuilder
from pydantic import TypeAdapter
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response

from commons.cache import keyspace
from commons.cache.entry import ParsedValue, RejectReason, decode_payload, encode_payload
from commons.cache.events import LookupOutcome
from commons.cache.http import (
    PreparedResponse,
    cacheable_response,
    prepare,
    replay,
)
from commons.cache.keys import tenant_cache_key_builder
from commons.cache.layer import CacheLayer, FillToken, Lookup
from commons.cache.lifecycle import current_layer
from commons.cache.memo import BoundedMemo
from commons.cache.rendering import (
    adapter_for,
    json_bytes,
    render_as_route,
    resolved_return_annotation,
    route_fingerprint,
)
from commons.cache.scope import ScopedKey
from commons.cache.singleflight import SingleFlight

__all__ = ["cache"]

logger = logging.getLogger("commons.cache")

P = ParamSpec("P")
R = TypeVar("R")

#: Who wrote an entry, as its fingerprint says (the other decorator's entries are misses here).
PRODUCER = "commons.cache"
_CACHEABLE_METHODS = frozenset({"GET", "HEAD"})
_LOCK_POLL_SECONDS = 0.02
_HIT, _STALE, _MISS = b"HIT", b"STALE", b"MISS"
#: Bounds of the prepared responses each route keeps (entries, and bytes of stored values).
_PREPARED_MAX_ENTRIES = 1024
_PREPARED_MAX_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What one computation produced, as shared with the requests that waited for it."""

    #: The stored (or storable) answer, ready to replay; the only thing waiters receive.
    prepared: PreparedResponse | None = None
    #: The handler's own response, sent as it is by the request that computed it only.
    response: Response | None = None


_flights: SingleFlight[_Outcome] = SingleFlight()


def _flight_key(key: str, token: FillToken) -> Hashable:
    """One computation per key and generation: later reads of a newer one never join it."""
    return (key, token.stamp, token.generation)


class _PreparedResponses:
    """Prepared responses by key, reused while the stored bytes are the same (bounded).

    Comparing the stored bytes with the remembered ones costs one ``memcmp`` (nothing for the
    memory store, which hands back the very object); decoding, re-encoding headers and hashing
    the body for the ETag then happen once per stored value instead of on every hit.
    """

    def __init__(self) -> None:
        self._memo = BoundedMemo[str, tuple[bytes, PreparedResponse]](
            _PREPARED_MAX_ENTRIES, _PREPARED_MAX_BYTES
        )

    def get(self, key: str, value: ParsedValue, private: bool) -> PreparedResponse | None:
        """The prepared form of ``value``; ``None`` when its payload is no readable response."""
        found = self._memo.get(key)
        if found is not None and found[0] == value.raw and found[1].private is private:
            return found[1]
        entry = decode_payload(value.kind, value.payload)
        if entry is None:
            return None
        prepared = prepare(entry, private=private)
        self.put(key, value.raw, prepared)
        return prepared

    def put(self, key: str, raw: bytes, prepared: PreparedResponse) -> None:
        self._memo.put(key, (raw, prepared), len(raw) + len(key))


def _request_headers(request: Request) -> tuple[str | None, str]:
    """The request's ``If-None-Match`` (``None`` if absent) and ``Cache-Control`` values.

    One pass over the raw headers (ASGI servers send their names in lower case): cheaper on every
    hit than building starlette's ``Headers`` and looking each name up in it.
    """
    if_none_match: list[bytes] = []
    cache_control: list[bytes] = []
    for name, value in request.scope["headers"]:
        if name == b"if-none-match":
            if_none_match.append(value)
        elif name == b"cache-control":
            cache_control.append(value)
    return (
        b", ".join(if_none_match).decode("latin-1") if if_none_match else None,
        b", ".join(cache_control).decode("latin-1"),
    )


def _client_refuses_stored(cache_control: str, layer: CacheLayer) -> bool:
    if not layer.settings.CACHE_HONOR_CLIENT_NO_CACHE:
        return False
    directives = cache_control.lower()
    return "no-cache" in directives or "no-store" in directives


def _param_of_type(signature: Signature, kind: type) -> Parameter | None:
    return next(
        (
            p
            for p in signature.parameters.values()
            if isinstance(p.annotation, type) and issubclass(p.annotation, kind)
        ),
        None,
    )


class _CachedRoute:
    """What one decorated handler needs on every miss: how to call it and render its result."""

    def __init__(
        self,
        func: Callable[..., Awaitable[Any]],
        *,
        coder: type[Coder] | None,
        expire: int | None,
        stale_seconds: int,
        lock: bool | None,
    ) -> None:
        self.func = func
        self.coder = coder
        self.expire = expire
        self.stale_seconds = stale_seconds
        self.lock = lock
        self.is_coroutine = iscoroutinefunction(func)
        self.prepared = _PreparedResponses()
        self.endpoint: Callable[..., Any] | None = None
        self._adapter: list[TypeAdapter[Any] | None] = []
        self._last_fingerprint: tuple[object, bytes] | None = None

    async def call_handler(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.is_coroutine:
            return await self.func(*args, **kwargs)
        return await run_in_threadpool(self.func, *args, **kwargs)

    def _own_route(self, request: Request) -> APIRoute | None:
        """The route ``request`` came through, if it is this handler's (not a direct call)."""
        route = request.scope.get("route")
        endpoint = self.endpoint
        if isinstance(route, APIRoute) and (
            inspect.unwrap(route.endpoint, stop=lambda f: f is endpoint) is endpoint
        ):
            return route
        return None

    def fingerprint(self, request: Request) -> bytes:
        """What this route renders, for the stored values (see ``rendering.route_fingerprint``)."""
        route = request.scope.get("route")
        last = self._last_fingerprint
        if last is not None and last[0] is route:
            return last[1]  # a handler is mounted on one route, as a rule: the hit path's case
        fingerprint = route_fingerprint(
            self._own_route(request), self.func, producer=PRODUCER, coder=self.coder
        )
        self._last_fingerprint = (route, fingerprint)
        return fingerprint

    async def render(self, result: Any, request: Request, status_code: int | None) -> Response:
        """The response FastAPI would send for ``result`` on this route."""
        if isinstance(result, Response):
            return result
        if self.coder is not None:
            body = self.coder.encode(result)
            return Response(body, status_code or 200, media_type="application/json")
        route = self._own_route(request)
        if route is not None:
            return await render_as_route(route, result, status_code, self.is_coroutine)
        # Called outside its route: render through the return annotation.
        if not self._adapter:
            self._adapter.append(adapter_for(get_typed_return_annotation(self.func)))
        type_adapter = self._adapter[0]
        if type_adapter is None:
            rendered = json_bytes(result)
        else:
            value = type_adapter.validate_python(result, from_attributes=True)
            rendered = type_adapter.dump_json(value, by_alias=True)
        return Response(rendered, status_code or 200, media_type="application/json")


class _Computation:
    """One request's miss (or stale refresh): computes, stores and shares the answer."""

    def __init__(
        self,
        route: _CachedRoute,
        layer: CacheLayer,
        key: str,
        fingerprint: bytes,
        token: FillToken,
        request: Request,
        sub_response: Any,
        call: tuple[tuple[Any, ...], dict[str, Any]],
    ) -> None:
        self.route = route
        self.layer = layer
        self.key = key
        self.fingerprint = fingerprint
        self.token = token
        self.private = not isinstance(key, ScopedKey) or key.is_private
        self.request = request
        self.sub_response = sub_response if isinstance(sub_response, Response) else None
        self.args, self.kwargs = call
        self.ttl = route.expire or layer.settings.CACHE_TTL_SECONDS
        self.use_lock = layer.settings.CACHE_DISTRIBUTED_LOCK if route.lock is None else route.lock
        #: The outcome this request computed itself, if it did.
        self.outcome: _Outcome | None = None
        #: What the handler raised, when this request computed and it raised.
        self.error: Exception | None = None

    async def compute(self, token: FillToken | None = None) -> _Outcome:
        """Runs the handler, renders its answer, and stores it when it may be stored.

        ``token`` is the fill token of the read this computation follows (the request's own by
        default): the value is stored only if nothing invalidated its scope since.
        """
        route, sub_response = self.route, self.sub_response
        headers_before = list(sub_response.raw_headers) if sub_response is not None else []
        result = await route.call_handler(self.args, self.kwargs)
        status_code = sub_response.status_code or None if sub_response is not None else None
        response = await route.render(result, self.request, status_code)
        if sub_response is not None and not isinstance(result, Response):
            # Headers the handler set on FastAPI's Response are part of its answer, as FastAPI
            # would send them; those the dependencies set are added per request.
            response.raw_headers.extend(
                pair for pair in sub_response.raw_headers if pair not in headers_before
            )
        entry = cacheable_response(response)
        if entry is None:
            outcome = _Outcome(response=response)
        else:
            kind, payload = encode_payload(entry)
            raw = await self.layer.store(
                self.key,
                payload,
                kind=kind,
                expire=self.ttl,
                stale_seconds=route.stale_seconds,
                fingerprint=self.fingerprint,
                token=token or self.token,
            )
            prepared = prepare(entry, private=self.private)
            if raw is not None:
                route.prepared.put(self.key, raw, prepared)
            outcome = _Outcome(prepared=prepared)
        self.outcome = outcome
        return outcome

    async def stored(self) -> _Outcome | Lookup | None:
        """The fresh entry stored under the key right now, else the read (for its token)."""
        lookup = await self.layer.lookup(self.key, self.fingerprint)
        if lookup is None or lookup.value is None:
            return lookup
        prepared = self.route.prepared.get(self.key, lookup.value, self.private)
        if prepared is None or not lookup.is_fresh:
            return lookup
        return _Outcome(prepared=prepared)

    async def _stored_outcome(self) -> _Outcome | None:
        found = await self.stored()
        return found if isinstance(found, _Outcome) else None

    async def work(self) -> _Outcome:
        """The computation a miss's single-flight runs (under the replicas' lock if asked).

        An exception is the computing request's own (a 403 computed for one user is no answer
        for another): it is kept in ``error`` for that request, and the waiters get nothing to
        share, so each runs the handler itself.
        """
        try:
            if not self.use_lock:
                return await self.compute()
            shared = await _under_replica_lock(
                self.layer, self.key, self.compute, self._stored_outcome, self.token.redis_failed
            )
        except Exception as exc:
            self.error = exc
            return _Outcome()
        assert shared is not None  # waiting for the lock always ends with an outcome
        return shared

    async def refresh(self) -> None:
        """Recomputes a stale entry, unless this process or another replica already does."""

        async def recompute() -> _Outcome:
            # A refresh that finished a moment ago leaves nothing to do.
            found = await self.stored()
            if isinstance(found, _Outcome):
                return found
            return await self.compute(found.token if found is not None else None)

        async def work() -> _Outcome:
            if not self.use_lock:
                return await recompute()
            shared = await _under_replica_lock(
                self.layer,
                self.key,
                recompute,
                self._stored_outcome,
                self.token.redis_failed,
                wait=False,
            )
            return shared or _Outcome()

        try:
            await _flights.run_if_idle(_flight_key(self.key, self.token), work)
        except Exception:
            logger.warning(
                "background refresh of a stale entry failed; it is served until it expires",
                exc_info=True,
            )


async def _under_replica_lock(
    layer: CacheLayer,
    key: str,
    compute: Callable[[], Awaitable[_Outcome]],
    stored: Callable[[], Awaitable[_Outcome | None]],
    read_failed: bool,
    *,
    wait: bool = True,
) -> _Outcome | None:
    """Computes under a short lock shared by the replicas (``SET NX PX`` with a random token).

    The holder computes and stores; the others poll for the entry while the lock is held, take
    the lock over if it is released without an entry (the holder failed), and compute on their
    own once ``CACHE_LOCK_TIMEOUT_SECONDS`` has passed. Only the holder's token releases the lock,
    and it expires by itself after the same time if its holder dies. Without a shared store (the
    memory backend, or Redis unavailable) it just computes: single-flight still holds per process.

    Returns:
        The outcome; ``None`` only when ``wait`` is false and another replica holds the lock.
    """
    if read_failed:
        return await compute()  # this request's read just failed: do not wait on Redis again
    lock_key = keyspace.lock_key(layer.prefix, key)
    token = secrets.token_bytes(16)
    wait_seconds = layer.settings.CACHE_LOCK_TIMEOUT_SECONDS
    lock_ms = max(int(wait_seconds * 1000), 1)
    acquired = await layer.try_lock(lock_key, token, lock_ms)
    if acquired is False:
        if not wait:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while loop.time() < deadline:
            await asyncio.sleep(_LOCK_POLL_SECONDS)
            found = await stored()
            if found is not None:
                return found
            acquired = await layer.try_lock(lock_key, token, lock_ms)
            if acquired is not False:
                break
    try:
        if acquired:
            # The previous holder may have stored the entry just before releasing the lock.
            found = await stored()
            if found is not None:
                return found
        return await compute()
    finally:
        if acquired:
            await layer.unlock(lock_key, token)


def cache(
    expire: int | None = None,
    coder: type[Coder] | None = None,
    key_builder: KeyBuilder | None = None,
    namespace: str = "",
    injected_dependency_namespace: str = "__fastapi_cache",
    *,
    distributed_lock: bool | None = None,
    stale_ttl: int | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R | Response]]]:
    """Caches a route's responses.

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

    Raises:
        ValueError: At decoration time, for a namespace holding ``:``, a pickle coder, or a
            negative ``expire`` / ``stale_ttl``.
    """
    if ":" in namespace:
        raise ValueError(f"cache namespace {namespace!r} must not contain ':'")
    if coder is not None and issubclass(coder, PickleCoder):
        raise ValueError("cached values are JSON: PickleCoder would let a writable Redis run code")
    if expire is not None and expire < 0:
        raise ValueError("expire must not be negative")
    if stale_ttl is not None and stale_ttl < 0:
        raise ValueError("stale_ttl must not be negative")
    stale_seconds = stale_ttl or 0
    chosen_key_builder: KeyBuilder = key_builder or tenant_cache_key_builder
    injected_request = Parameter(
        name=f"{injected_dependency_namespace}_request",
        annotation=Request,
        kind=Parameter.KEYWORD_ONLY,
    )
    injected_response = Parameter(
        name=f"{injected_dependency_namespace}_response",
        annotation=Response,
        kind=Parameter.KEYWORD_ONLY,
    )

    def decorate(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R | Response]]:
        signature = get_typed_signature(func)
        request_param = _param_of_type(signature, Request)
        response_param = _param_of_type(signature, Response)
        inject_request = request_param is None
        inject_response = response_param is None
        request_name = injected_request.name if request_param is None else request_param.name
        response_name = injected_response.name if response_param is None else response_param.name
        route_state = _CachedRoute(
            func, coder=coder, expire=expire, stale_seconds=stale_seconds, lock=distributed_lock
        )
        call_handler = route_state.call_handler
        prepared_responses = route_state.prepared

        @wraps(func)
        async def endpoint(*args: P.args, **kwargs: P.kwargs) -> R | Response:
            request = kwargs.pop(request_name, None) if inject_request else kwargs.get(request_name)
            sub_response = (
                kwargs.pop(response_name, None) if inject_response else kwargs.get(response_name)
            )
            layer = current_layer()
            if layer is None or not layer.enabled:
                if layer is not None:
                    layer.events.lookup(namespace, LookupOutcome.BYPASS_DISABLED)
                return await call_handler(args, kwargs)  # type: ignore[no-any-return]
            if not isinstance(request, Request):
                return await call_handler(args, kwargs)  # type: ignore[no-any-return]
            method = request.scope["method"]
            if method not in _CACHEABLE_METHODS:
                return await call_handler(args, kwargs)  # type: ignore[no-any-return]

            built = chosen_key_builder(
                func,
                f"{layer.prefix}:{namespace}",
                request=request,
                response=None,
                args=args,
                kwargs=kwargs,
            )
            key = built if isinstance(built, str) else await built
            fingerprint = route_state.fingerprint(request)
            if_none_match, cache_control = _request_headers(request)
            if cache_control and _client_refuses_stored(cache_control, layer):
                lookup = None
                token = await layer.token_now(key)
                outcome = LookupOutcome.BYPASS_CLIENT
            else:
                lookup = await layer.lookup(key, fingerprint)
                token = lookup.token if lookup is not None else None
                outcome = LookupOutcome.MISS
            if token is None:
                layer.events.lookup(namespace, LookupOutcome.BYPASS_NO_IDENTITY)
                return await call_handler(args, kwargs)  # type: ignore[no-any-return]
            head = method == "HEAD"
            # Set by the route's dependencies: sent with this answer, never stored.
            own_headers = (
                list(sub_response.raw_headers)
                if isinstance(sub_response, Response) and sub_response.raw_headers
                else None
            )
            call = (args, kwargs)
            if lookup is not None and lookup.value is not None:
                private = not isinstance(key, ScopedKey) or key.is_private
                stored = prepared_responses.get(key, lookup.value, private)
                if stored is None:
                    layer.events.rejected_entry(namespace, RejectReason.FORMAT)
                elif lookup.is_fresh:
                    layer.events.lookup(namespace, LookupOutcome.HIT)
                    return replay(
                        stored,
                        max_age=lookup.fresh_for,
                        status=_HIT,
                        if_none_match=if_none_match,
                        head=head,
                        extra_headers=own_headers,
                    )
                else:
                    layer.events.lookup(namespace, LookupOutcome.STALE)
                    stale = replay(
                        stored,
                        max_age=0,
                        status=_STALE,
                        if_none_match=if_none_match,
                        head=head,
                        extra_headers=own_headers,
                    )
                    refresh = _Computation(
                        route_state, layer, key, fingerprint, token, request, sub_response, call
                    )
                    # Runs once the stale answer is sent, while the request's dependencies
                    # (a database session, ...) are still open.
                    stale.background = BackgroundTask(refresh.refresh)
                    return stale
            layer.events.lookup(namespace, outcome)
            miss = _Computation(
                route_state, layer, key, fingerprint, token, request, sub_response, call
            )

            shared = await _flights.run(
                _flight_key(key, token), miss.work, layer.settings.CACHE_LOCK_TIMEOUT_SECONDS
            )
            if miss.error is not None:
                raise miss.error
            if shared.prepared is not None:
                return replay(
                    shared.prepared,
                    max_age=miss.ttl,
                    status=_MISS,
                    if_none_match=if_none_match,
                    head=head,
                    extra_headers=own_headers,
                )
            if shared.response is None or shared is not miss.outcome:
                # Another request's answer that may not be stored (no-store, private, non-2xx,
                # a cookie, a stream, an exception) is that request's alone: this one runs the
                # handler itself.
                return await call_handler(args, kwargs)  # type: ignore[no-any-return]
            response = shared.response  # this request computed it: its very own answer
            if own_headers:
                response.raw_headers.extend(own_headers)
            return response

        if inject_request or inject_response:
            parameters = list(signature.parameters.values())
            tail = [p for p in parameters if p.kind is Parameter.VAR_KEYWORD]
            head = [p for p in parameters if p.kind is not Parameter.VAR_KEYWORD]
            injected = [
                *([injected_request] if inject_request else []),
                *([injected_response] if inject_response else []),
            ]
            endpoint.__signature__ = Signature(  # type: ignore[attr-defined]
                parameters=[*head, *injected, *tail],
                return_annotation=resolved_return_annotation(func),
            )
        route_state.endpoint = endpoint
        return endpoint

    return decorate
