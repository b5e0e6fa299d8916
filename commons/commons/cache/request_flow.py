"""A cached route's request flow: the request read, its outcome decided, the outcome carried out.

:meth:`RequestFlow.answer` is the whole flow in one screen: it looks the request up, asks
``decision.decide`` for the outcome (bypass, HIT, 304, STALE, or one of the misses; the rules
are in ``decision.py``), counts it once (``CacheEvents.lookup``) and answers:

- HIT and 304: replayed with ``X-FastAPI-Cache: HIT``, an ``ETag`` digest of the bytes,
  ``Cache-Control: no-cache`` (the client revalidates: a cheap ``304``) or, with
  ``client_max_age``, ``max-age=<that, at most the remaining freshness>``, ``private`` and
  ``Vary: Authorization`` for tenant- or user-scoped entries. The encoded headers and the ETag of a
  stored body are computed once and reused while the stored bytes stay the same.
- STALE: replayed at once with ``X-FastAPI-Cache: STALE`` (``max-age=0`` with
  ``client_max_age``); after the response is sent, one refresh per key and process (single-flight,
  and with ``distributed_lock`` one across replicas) recomputes and stores it. A HEAD starts no
  refresh.
- A miss: filled once (``fill.py``); exceptions and non-2xx answers are never stored. With a stale
  entry within ``stale_if_error``, a failed computation (an exception, or a 5xx answer) is answered
  with the stale entry instead (``_Miss``). A HEAD's miss is the handler's answer, never stored.

Every answer returned says how it was served: ``X-FastAPI-Cache``, ``Cache-Status`` (RFC 9211: the
cache's name, then ``hit; ttl=`` or ``fwd=<why>`` with ``stored`` / ``collapsed``) and, when it
comes from storage, ``Age`` (``layer.Lookup.age``). An exception the handler raises goes on to
FastAPI's exception handlers, whose answer carries neither header.

Headers and cookies that the route's dependencies set on FastAPI's ``Response`` parameter are sent
with every answer (HIT or MISS) and never stored; headers the handler sets there are part of the
stored answer, and a cookie set by the handler makes the answer uncacheable.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, NamedTuple

from fastapi_cache.types import KeyBuilder
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from commons.cache.cached_route import CachedRoute
from commons.cache.decision import COUNTED_AS, FORWARDED_BECAUSE, RequestOutcome, Situation, decide
from commons.cache.entry import RejectReason
from commons.cache.fill import Call, Fill, handler_response
from commons.cache.hit_shortcut import HitShortcut
from commons.cache.http import (
    CACHE_STATUS_HEADER,
    PreparedResponse,
    Served,
    asks_for_fresh,
    cache_status,
    cache_status_name,
    cacheable_response,
    etag_matches,
    labelled,
    prepare,
    replay,
    why_never_stored,
)
from commons.cache.keys import identity_read_by, scoped_key
from commons.cache.keyspace import qualified_namespace
from commons.cache.layer import CacheLayer, Lookup
from commons.cache.lifecycle import current_layer
from commons.cache.scope import ScopedKey

__all__ = ["RequestFlow"]

_CACHEABLE_METHODS = frozenset({"GET", "HEAD"})
#: The outcomes answered with the stored answer as it is (a 304 when the client has it).
_SENT_FROM_STORAGE = frozenset({RequestOutcome.HIT, RequestOutcome.NOT_MODIFIED})
_HIT, _STALE, _MISS = b"HIT", b"STALE", b"MISS"
_STATUS_NAME = CACHE_STATUS_HEADER.lower().encode("latin-1")
_CACHE_STATUS_NAME = b"cache-status"

logger = logging.getLogger("commons.cache")

# The mistakes a cached route can reveal only when a request comes (%s: the method and route).
_NOT_INITIALISED = (
    "@cache on %s: init_cache() has not run, every request runs the handler; run it in the "
    "app's lifespan (in tests: `with TestClient(app)` runs the lifespan)%s"
)
_UNCACHEABLE = "@cache on %s: serving uncached (said once per route and reason): %s"
_NEVER_STORED = (
    "@cache on %s: nothing is stored and every request runs the handler (said once per route "
    "and reason): %s"
)
_NOT_A_READ = (
    "@cache on %s: only GET and HEAD requests are cached; remove @cache from a route that "
    "changes data, and call invalidate_namespace() for what it changes instead%s"
)


class _Asked(NamedTuple):
    """What the request asks of a cached answer besides its key."""

    #: ``If-None-Match`` (``None`` if absent), for a ``304``.
    if_none_match: str | None
    #: The client's ``Cache-Control`` (``""`` if absent).
    cache_control: str
    head: bool
    #: Headers the route's dependencies set: sent with this answer, never stored.
    own_headers: list[tuple[bytes, bytes]] | None


def _asked(request: Request, sub_response: object) -> _Asked:
    """One pass over the raw headers (ASGI servers send their names in lower case): cheaper on
    every hit than building starlette's ``Headers`` and looking each name up in it."""
    if_none_match: list[bytes] = []
    cache_control: list[bytes] = []
    for name, value in request.scope["headers"]:
        if name == b"if-none-match":
            if_none_match.append(value)
        elif name == b"cache-control":
            cache_control.append(value)
    own_headers = (
        list(sub_response.raw_headers)
        if isinstance(sub_response, Response) and sub_response.raw_headers
        else None
    )
    return _Asked(
        b", ".join(if_none_match).decode("latin-1") if if_none_match else None,
        b", ".join(cache_control).decode("latin-1"),
        request.scope["method"] == "HEAD",
        own_headers,
    )


class _Stale(NamedTuple):
    """A stale entry past its stale-while-revalidate window, kept in case computing fails."""

    prepared: PreparedResponse
    lookup: Lookup
    #: What it was looked up under, to look it up again before it is served.
    key: ScopedKey
    fingerprint: bytes


class _LookedUp(NamedTuple):
    """One request, looked up: its key, what it asks, what the cache holds for it, and so the
    situation its outcome is decided on."""

    request: Request
    key: ScopedKey
    fingerprint: bytes
    asked: _Asked
    #: ``None``: the key must not be cached (see ``CacheLayer.lookup``).
    lookup: Lookup | None
    #: The stored answer, ready to replay; ``None`` when nothing valid is stored.
    prepared: PreparedResponse | None
    #: What :func:`~commons.cache.decision.decide` reads about the request.
    situation: Situation


class RequestFlow:
    """Answers the requests of one cached route (see the module docstring)."""

    def __init__(self, route: CachedRoute, namespace: str, key_builder: KeyBuilder) -> None:
        self.route = route
        self.namespace = namespace
        self.key_builder = key_builder
        # The last prefix seen, the qualified namespace under it, and the cache's name in
        # Cache-Status (a hit formats neither).
        self._qualified = ("", qualified_namespace("", namespace), cache_status_name(""))
        #: The mistakes already logged for this route: each is said once, not per request.
        self._warned: set[str] = set()
        identity = identity_read_by(key_builder)
        #: Repeated near-cache HITs, answered at once (only with one of our key builders).
        self._shortcut = None if identity is None else HitShortcut(route, namespace, identity)

    async def answer(
        self, request: object, sub_response: object, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """The route's answer to one call: from the cache, or from the handler."""
        shortcut = self._shortcut
        if shortcut is not None and isinstance(request, Request):
            repeated = shortcut.answer(request, sub_response)
            if repeated is not None:
                return repeated
        layer = current_layer()
        is_read = isinstance(request, Request) and request.scope["method"] in _CACHEABLE_METHODS
        looked = None
        if layer is not None and layer.enabled and isinstance(request, Request) and is_read:
            looked = await self._look_up(layer, request, sub_response, args, kwargs)
        situation = looked.situation if looked is not None else self._not_looked_up(layer, is_read)
        outcome = decide(situation)
        if layer is None:
            self._warn_once(request, _NOT_INITIALISED)
            return await self.route.call_handler(args, kwargs)
        counted = COUNTED_AS[outcome]
        if counted is not None:
            layer.events.lookup(self.namespace, counted)
        if looked is None or looked.lookup is None:
            return await self._bypassed(layer, outcome, request, looked, sub_response, args, kwargs)
        lookup, prepared = looked.lookup, looked.prepared
        if prepared is not None and outcome in _SENT_FROM_STORAGE:
            fresh_for = situation.fresh_for
            served = self.served(layer, _HIT, b"hit", lookup, fresh_for)
            not_modified = outcome == RequestOutcome.NOT_MODIFIED
            if (
                shortcut is not None
                and lookup.held is not None
                and _asked_only_for_it(looked.asked)
            ):
                shortcut.remember(
                    layer,
                    looked.request,
                    looked.key,
                    looked.fingerprint,
                    lookup,
                    prepared,
                    served.name,
                )
            return _replay(self.route, prepared, fresh_for, served, looked.asked, not_modified)
        call = _call(looked, sub_response, args, kwargs)
        if prepared is not None and outcome == RequestOutcome.STALE:
            refresh = Fill(self.route, layer, call, lookup.token)
            not_modified = situation.client_has_it
            return self._revalidated(layer, looked.asked, prepared, lookup, refresh, not_modified)
        return await self._missed(layer, outcome, looked, lookup, call)

    async def _look_up(
        self,
        layer: CacheLayer,
        request: Request,
        sub_response: object,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> _LookedUp:
        """The request's key, what it asks, and the valid stored answer under the key, if any."""
        route = self.route
        qualified = self._names(layer.prefix)[0]
        built = self.key_builder(
            route.func,
            qualified,
            request=request,
            response=None,
            args=args,
            kwargs=kwargs,
        )
        if not isinstance(built, str) and inspect.isawaitable(built):
            built = await built
        key = scoped_key(built, qualified)
        fingerprint = route.fingerprint(request)
        asked = _asked(request, sub_response)
        asked_fresh = _asks_for_fresh(layer, asked.cache_control)
        if asked_fresh:
            lookup = await _unread(layer, key)
        else:
            lookup = await layer.lookup(key, fingerprint)
        if lookup is None:
            situation = Situation(initialised=True, identified=False)
            return _LookedUp(request, key, fingerprint, asked, lookup, None, situation)
        prepared = None
        if lookup.value is not None:
            prepared = route.prepared.get(key, lookup.value, key.is_private)
            if prepared is None:
                layer.events.rejected_entry(self.namespace, RejectReason.FORMAT)
        fresh = lookup.is_fresh
        if_none_match = asked.if_none_match
        client_has_it = (
            if_none_match is not None
            and prepared is not None
            and etag_matches(if_none_match, prepared.etag)
        )
        # Positional, in the fields' order (initialised, enabled, is_read, identified first):
        # built on every hit, where keywords cost measurably more.
        situation = Situation(
            True,
            True,
            True,
            True,
            asked_fresh,
            prepared is not None,
            fresh,
            lookup.fresh_for,
            client_has_it,
            route.stale_ttl,
            # Read only for an entry past its freshness: a hit does not work it out.
            0
            if fresh
            else route.stale_if_error_seconds(layer.settings.CACHE_STALE_IF_ERROR_SECONDS),
        )
        return _LookedUp(request, key, fingerprint, asked, lookup, prepared, situation)

    @staticmethod
    def _not_looked_up(layer: CacheLayer | None, is_read: bool) -> Situation:
        """What :func:`~commons.cache.decision.decide` reads about a request nothing was looked
        up for."""
        if layer is None:
            return Situation(initialised=False)
        return Situation(initialised=True, enabled=layer.enabled, is_read=is_read)

    def _warn_once(self, request: object, mistake: str, detail: str = "") -> None:
        """Logs ``mistake`` (with ``detail``) about this route, the first time it is seen."""
        if not isinstance(request, Request) or mistake + detail in self._warned:
            return  # a direct call of the handler (no request) is no mistake
        self._warned.add(mistake + detail)
        route = request.scope.get("route")
        path = getattr(route, "path", request.scope["path"])
        logger.warning(mistake, f"{request.scope['method']} {path}", detail)

    def _names(self, prefix: str) -> tuple[str, bytes]:
        """The qualified namespace under ``prefix`` and the cache's name in ``Cache-Status``."""
        known = self._qualified
        if known[0] != prefix:
            qualified = qualified_namespace(prefix, self.namespace)
            known = self._qualified = (prefix, qualified, cache_status_name(prefix))
        return known[1], known[2]

    def served(
        self,
        layer: CacheLayer,
        status: bytes,
        detail: bytes,
        lookup: Lookup | None = None,
        fresh_for: int | None = None,
    ) -> Served:
        """How an answer is served: its ``X-FastAPI-Cache`` ``status``, its ``Cache-Status``
        ``detail`` and, for a stored entry's answer, its ``ttl`` (``fresh_for``, when known
        already) and ``Age``."""
        name = self._names(layer.prefix)[1]
        if lookup is None:
            return Served(status, detail, name)
        ttl = lookup.fresh_for if fresh_for is None else fresh_for
        return Served(status, detail, name, ttl, lookup.age)

    def _revalidated(
        self,
        layer: CacheLayer,
        asked: _Asked,
        prepared: PreparedResponse,
        lookup: Lookup,
        refresh: Fill,
        not_modified: bool,
    ) -> Response:
        """A stale entry's answer (a ``304`` when the client has it), and after it one
        background refresh (a GET's only: see :meth:`_head_miss`)."""
        served = self.served(layer, _STALE, b"hit", lookup)
        stale = _replay(self.route, prepared, 0, served, asked, not_modified)
        if not asked.head:
            # Runs once the stale answer is sent, while the request's dependencies (a database
            # session, ...) are still open.
            stale.background = BackgroundTask(refresh.refresh)
        return stale

    async def _missed(
        self, layer: CacheLayer, outcome: str, looked: _LookedUp, lookup: Lookup, call: Call
    ) -> Any:
        """A miss of any kind: a HEAD's is the handler's own answer, a GET's is filled once."""
        if looked.asked.head:
            return await self._head_miss(layer, call, looked.asked)
        stale = None
        if outcome == RequestOutcome.MISS_STALE_FALLBACK and looked.prepared is not None:
            stale = _Stale(looked.prepared, lookup, looked.key, looked.fingerprint)
        fill = Fill(self.route, layer, call, lookup.token)
        reason = FORWARDED_BECAUSE[outcome]
        return await _Miss(self, layer, fill, looked.asked, reason, stale).answer()

    async def _head_miss(self, layer: CacheLayer, call: Call, asked: _Asked) -> Response:
        """A HEAD that found no entry: the handler answers it, and nothing is stored or shared.

        A HEAD may be answered from a GET's entry, never the other way round: a handler may
        answer HEAD with headers only, and that answer stored would be every GET's empty body.
        """
        response = await handler_response(self.route, call)
        served = self.served(layer, _MISS, b"fwd=miss")
        entry = cacheable_response(response)
        if entry is not None:
            # The GET's headers (ETag, Cache-Control, Vary), as a HEAD answered from its entry
            # has them: a HEAD's answer may freshen a client's or a proxy's copy of the GET's.
            prepared = prepare(entry, private=call.private)
            fresh_for = self.route.lifetime(layer.settings.CACHE_TTL_SECONDS)
            return _replay(
                self.route, prepared, fresh_for, served, asked, _client_has(asked, prepared)
            )
        response.raw_headers.extend(
            [(_STATUS_NAME, _MISS), (_CACHE_STATUS_NAME, cache_status(served))]
        )
        if asked.own_headers:
            response.raw_headers.extend(asked.own_headers)
        return response

    async def _bypassed(
        self,
        layer: CacheLayer,
        outcome: str,
        request: object,
        looked: _LookedUp | None,
        sub_response: object,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """The handler's answer to a request the cache does not take part in, saying so (and
        logging, once per route and reason, a bypass that reveals a mistake)."""
        if outcome == RequestOutcome.BYPASS_NOT_A_READ:
            self._warn_once(request, _NOT_A_READ)
        elif looked is not None and looked.key.reason is not None:
            self._warn_once(request, _UNCACHEABLE, looked.key.reason)
        result = await self.route.call_handler(args, kwargs)
        return labelled(result, sub_response, cache_status(self.served(layer, b"", b"fwd=bypass")))


class _Miss:
    """One request's miss: the shared, stored answer, this request's own, or, when computing a
    fresh answer fails and the route allows it, the stale entry the lookup found
    (``stale_if_error``).

    A failure is an exception (other than an ``HTTPException`` below 500: a 404 is an answer) or
    a 5xx answer (RFC 5861, 4). The stale entry is served only if a lookup after the failure
    still finds those very bytes valid under the scope's generations: an invalidation that
    returned while the handler ran wins, and one that cannot be ruled out (Redis failing too)
    as well.
    """

    def __init__(
        self,
        flow: RequestFlow,
        layer: CacheLayer,
        fill: Fill,
        asked: _Asked,
        reason: bytes,
        stale: _Stale | None,
    ) -> None:
        self.flow = flow
        self.layer = layer
        self.fill = fill
        self.asked = asked
        #: ``Cache-Status``'s ``fwd`` parameter: why the request went to the handler.
        self.reason = reason
        self.stale = stale
        #: Whether this request joined a second computation after the first one raised.
        self._computed_again = False

    async def answer(self) -> Any:
        fill, asked = self.fill, self.asked
        shared = await fill.shared()
        if fill.error is not None:
            return await self._stale_or_raise(fill.error)
        if shared.prepared is None and shared.response is None and not self._computed_again:
            # The computation joined raised: its request's own exception, which says nothing of
            # this one's. The waiters share one computation of their own (stored), once.
            self._computed_again = True
            self.fill = fill.again()
            return await self.answer()
        if shared.prepared is not None:
            if shared is not fill.outcome:
                detail = self.reason + b"; collapsed"
            else:
                detail = self.reason + b"; stored" if shared.stored else self.reason
            served = self.flow.served(self.layer, _MISS, detail)
            not_modified = _client_has(asked, shared.prepared)
            return _replay(self.flow.route, shared.prepared, fill.ttl, served, asked, not_modified)
        if shared.response is None or shared is not fill.outcome:
            # Another request's answer that may not be stored (no-store, private, non-2xx, a
            # cookie, a stream, an exception) is that request's alone: this one runs the handler
            # itself.
            return await self._own_computation()
        response = shared.response  # this request computed it: its very own answer
        if response.status_code >= 500 and self.stale is not None:
            stale = await self._stale_answer(response.status_code, None)
            if stale is not None:
                return stale
        why = why_never_stored(response)
        if why is not None:
            self.flow._warn_once(fill.call.request, _NEVER_STORED, why)
        labelled(response, None, self._cache_status(), _MISS)
        if asked.own_headers:
            response.raw_headers.extend(asked.own_headers)
        return response

    async def _own_computation(self) -> Any:
        call = self.fill.call
        try:
            result = await self.flow.route.call_handler(call.args, call.kwargs)
        except Exception as exc:
            return await self._stale_or_raise(exc)
        if isinstance(result, Response) and result.status_code >= 500 and self.stale is not None:
            stale = await self._stale_answer(result.status_code, None)
            if stale is not None:
                return stale
        return labelled(result, call.sub_response, self._cache_status(), _MISS)

    def _cache_status(self) -> bytes:
        return cache_status(self.flow.served(self.layer, _MISS, self.reason))

    async def _stale_or_raise(self, error: Exception) -> Response:
        if self.stale is None or (isinstance(error, HTTPException) and error.status_code < 500):
            raise error
        status = error.status_code if isinstance(error, HTTPException) else 500
        answer = await self._stale_answer(status, error)
        if answer is None:
            raise error
        return answer

    async def _stale_answer(self, failed_status: int, error: Exception | None) -> Response | None:
        """The stale entry's answer, if it is still valid (``None``: the failure stands)."""
        stale, namespace = self.stale, self.flow.namespace
        assert stale is not None  # only called when there is one
        if not await self._still_stored(stale):
            return None
        logger.warning(
            "serving a stale entry of namespace %r: computing a fresh answer failed (%d)",
            namespace,
            failed_status,
            exc_info=error,
        )
        self.layer.events.served_stale_on_error(namespace)
        detail = b"fwd=stale; fwd-status=%d" % failed_status
        served = self.flow.served(self.layer, _STALE, detail, stale.lookup)
        not_modified = _client_has(self.asked, stale.prepared)
        return _replay(self.flow.route, stale.prepared, 0, served, self.asked, not_modified)

    async def _still_stored(self, stale: _Stale) -> bool:
        """Whether a lookup now finds the stale entry's very bytes, valid under the scope's
        generations as they are now."""
        found = stale.lookup.value
        current = await self.layer.lookup(stale.key, stale.fingerprint)
        return (
            found is not None
            and current is not None
            and current.value is not None
            and current.value.raw == found.raw
        )


def _asks_for_fresh(layer: CacheLayer, cache_control: str) -> bool:
    """Whether the client's ``Cache-Control`` refuses a stored answer (and the settings let it)."""
    if not cache_control or not layer.settings.CACHE_HONOR_CLIENT_NO_CACHE:
        return False
    return asks_for_fresh(cache_control)


async def _unread(layer: CacheLayer, key: str) -> Lookup | None:
    """A lookup that read nothing, for a client that asks for a fresh answer: computed, and
    stored for the next ones (``None``: not to be cached)."""
    token = await layer.token_now(key)
    return None if token is None else Lookup(token)


def _replay(
    route: CachedRoute,
    prepared: PreparedResponse,
    fresh_for: int,
    served: Served,
    asked: _Asked,
    not_modified: bool,
) -> Response:
    """``prepared`` as this request's answer. The client may reuse it for ``client_max_age``
    seconds at most, never past the entry's freshness (``fresh_for``); by default not at all
    without revalidating (``no-cache``): a client's copy from before an update is never used."""
    allowed = route.client_max_age
    return replay(
        prepared,
        max_age=None if allowed is None else min(allowed, fresh_for),
        served=served,
        not_modified=not_modified,
        head=asked.head,
        extra_headers=asked.own_headers,
    )


def _asked_only_for_it(asked: _Asked) -> bool:
    """Whether a HIT's request asked nothing of the answer besides it (what ``hit_shortcut.py``
    answers): a GET with no ``If-None-Match`` and no (or an empty) ``Cache-Control``, whose
    route's dependencies set no header. A request with an empty ``Cache-Control`` is remembered
    for but never answered by the shortcut, which declines any such header."""
    return not (
        asked.if_none_match is not None or asked.cache_control or asked.head or asked.own_headers
    )


def _client_has(asked: _Asked, prepared: PreparedResponse) -> bool:
    """Whether the request's ``If-None-Match`` names ``prepared``'s ETag (a ``304``)."""
    return asked.if_none_match is not None and etag_matches(asked.if_none_match, prepared.etag)


def _call(
    looked: _LookedUp, sub_response: object, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Call:
    """The call a miss or a refresh of ``looked`` makes."""
    key = looked.key
    return Call(key, looked.fingerprint, key.is_private, looked.request, sub_response, args, kwargs)
