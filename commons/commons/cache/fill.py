"""Filling a key: one computation per key and generation in this process, stored and shared.

A miss (or a stale entry's background refresh) runs the handler, renders its answer as the route
would, and stores it when it may be stored. Concurrent misses of one key in one process share one
computation (single-flight), and with ``distributed_lock`` one across replicas too
(``replica_lock.py``). A computation belongs to the generation its read saw
(``layer.FillToken``): a request whose read comes after an invalidation never joins one that
began before it. Waiters receive only an answer that may be stored; any other answer
(``no-store``, ``private``, non-2xx, a cookie) is its own request's, and every waiter then runs
the handler itself. An exception is its own request's too, but says nothing of the others' (a
flaky upstream): the waiters share one computation of their own (:meth:`Fill.again`), within
what is left of their wait, and only if that one raises too does each run the handler itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from commons.cache.cached_route import CachedRoute
from commons.cache.entry import encode_payload
from commons.cache.http import PreparedResponse, cacheable_response, prepare
from commons.cache.layer import CacheLayer, FillToken, Lookup
from commons.cache.replica_lock import under_replica_lock
from commons.cache.singleflight import SingleFlight

__all__ = ["Call", "Fill", "Outcome", "handler_response"]

logger = logging.getLogger("commons.cache")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one computation produced, as shared with the requests that waited for it."""

    #: The stored (or storable) answer, ready to replay; the only thing waiters receive.
    prepared: PreparedResponse | None = None
    #: The handler's own response, sent as it is by the request that computed it only.
    response: Response | None = None
    #: Whether ``prepared`` was written to the store (``Cache-Status: stored``).
    stored: bool = False


class Call(NamedTuple):
    """One request's call of a cached route, as a miss or a refresh needs it."""

    key: str
    fingerprint: bytes
    #: Whether the key is tenant- or user-scoped (its answers say ``private``).
    private: bool
    request: Request
    #: FastAPI's ``Response`` parameter of the call, if any.
    sub_response: object
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


_flights: SingleFlight[Outcome] = SingleFlight()

T = TypeVar("T")


async def handler_response(route: CachedRoute, call: Call) -> Response:
    """The handler's answer to ``call``, rendered as its route would send it."""
    sub_response = call.sub_response if isinstance(call.sub_response, Response) else None
    headers_before = list(sub_response.raw_headers) if sub_response is not None else []
    result = await route.call_handler(call.args, call.kwargs)
    status_code = sub_response.status_code or None if sub_response is not None else None
    response = await route.render(result, call.request, status_code)
    if sub_response is not None and not isinstance(result, Response):
        # Headers the handler set on FastAPI's Response are part of its answer, as FastAPI
        # would send them; those the dependencies set are added per request.
        response.raw_headers.extend(
            pair for pair in sub_response.raw_headers if pair not in headers_before
        )
    return response


def _flight_key(key: str, token: FillToken) -> Hashable:
    """One computation per key and generation: later reads of a newer one never join it."""
    return (key, token.stamp, token.generation)


class Fill:
    """One request's miss (or stale refresh): computes, stores and shares the answer."""

    def __init__(
        self,
        route: CachedRoute,
        layer: CacheLayer,
        call: Call,
        token: FillToken,
        *,
        wait_until: float | None = None,
        again: bool = False,
    ) -> None:
        self.route = route
        self.layer = layer
        self.call = call
        self.key = call.key
        self.token = token
        self.ttl = route.lifetime(layer.settings.CACHE_TTL_SECONDS)
        use_lock = layer.settings.CACHE_DISTRIBUTED_LOCK if route.lock is None else route.lock
        # A request whose read from Redis just failed does not wait on Redis again for a lock.
        self.use_lock = use_lock and not token.redis_failed
        #: The outcome this request computed itself, if it did.
        self.outcome: Outcome | None = None
        #: What the handler raised, when this request computed and it raised.
        self.error: Exception | None = None
        #: The loop time by which this request stops waiting for others' computations (set
        #: when it first asks for the shared outcome): one bound, whoever it waits for.
        self._wait_until = wait_until
        #: A computation anew (:meth:`again`): what another request stored meanwhile is used.
        self._again = again

    async def shared(self) -> Outcome:
        """The outcome of this key's computation in this process: this request's own, or the
        one it joined (see the module docstring for what a waiter may receive)."""
        now = asyncio.get_running_loop().time()
        if self._wait_until is None:
            self._wait_until = now + self.layer.settings.CACHE_LOCK_TIMEOUT_SECONDS
        wait_seconds = max(self._wait_until - now, 0.0)
        return await _flights.run(
            _flight_key(self.key, self.token), self._work, wait_seconds, self._work_alone
        )

    def again(self) -> Fill:
        """The same miss computed anew, once the computation it joined raised (that request's
        own exception): its waiters share this one, within what is left of their wait."""
        return Fill(
            self.route, self.layer, self.call, self.token, wait_until=self._wait_until, again=True
        )

    async def refresh(self) -> None:
        """Recomputes a stale entry, unless this process or another replica already does."""
        try:
            await _flights.run_if_idle(_flight_key(self.key, self.token), self._refresh_work)
        except Exception as exc:
            self.error = exc
        if self.error is not None:
            logger.warning(
                "background refresh of a stale entry failed; it is served until it expires",
                exc_info=self.error,
            )

    async def _work(self) -> Outcome:
        """The computation a miss's single-flight runs (under the replicas' lock if asked).

        An exception is the computing request's own (a 403 computed for one user is no answer
        for another): it is kept in ``error`` for that request, and the waiters get nothing to
        share (they compute again, :meth:`again`).
        """
        if self._again and (stored := await self._stored_outcome()) is not None:
            # Another waiter of the failed computation computed and stored it already.
            return stored
        if not self.use_lock:
            return await self._own_error(self._compute())
        # A request leading after a cancelled leader has waited already: only what is left.
        assert self._wait_until is not None  # set by shared(), which runs this
        left = max(self._wait_until - asyncio.get_running_loop().time(), 0.0)
        shared = await self._own_error(
            under_replica_lock(
                self.layer, self.key, self._compute, self._stored_outcome, wait_seconds=left
            )
        )
        assert shared is not None  # waiting for the lock always ends with an outcome
        return shared

    async def _work_alone(self) -> Outcome:
        """What a miss computes once it waited ``CACHE_LOCK_TIMEOUT_SECONDS`` for this process's
        computation in vain: at once, without the replicas' lock (whose wait would double the
        wait the setting bounds). An exception is its own, as in :meth:`_work`."""
        return await self._own_error(self._compute())

    async def _refresh_work(self) -> Outcome:
        """The computation a refresh's single-flight runs. Misses of the same key may join it
        (the entry went past its stale window meanwhile): as with :meth:`_work`, its exception
        is its own, and they get nothing to share (each then runs the handler, and on failure
        gets the stale entry if the route allows it)."""
        if not self.use_lock:
            return await self._own_error(self._recompute())
        shared = await self._own_error(
            under_replica_lock(
                self.layer, self.key, self._recompute, self._stored_outcome, wait=False
            )
        )
        return shared or Outcome()

    async def _own_error(self, computation: Awaitable[T]) -> T | Outcome:
        """``computation``'s result; an exception it raises is kept in ``error`` for this
        request alone, and those sharing the computation get nothing (an empty outcome)."""
        try:
            return await computation
        except Exception as exc:
            self.error = exc
            return Outcome()

    async def _recompute(self) -> Outcome:
        # A refresh that finished a moment ago leaves nothing to do.
        found = await self._stored()
        if isinstance(found, Outcome):
            return found
        return await self._compute(found.token if found is not None else None)

    async def _compute(self, token: FillToken | None = None) -> Outcome:
        """Runs the handler, renders its answer, and stores it when it may be stored.

        ``token`` is the fill token of the read this computation follows (the request's own by
        default): the value is stored only if nothing invalidated its scope since.
        """
        route = self.route
        response = await handler_response(route, self.call)
        entry = cacheable_response(response)
        if entry is None:
            self.outcome = Outcome(response=response)
            return self.outcome
        kind, payload = encode_payload(entry)
        raw = await self.layer.store(
            self.key,
            payload,
            kind=kind,
            expire=self.ttl,
            stale_seconds=route.stale_window(self.layer.settings.CACHE_STALE_IF_ERROR_SECONDS),
            fingerprint=self.call.fingerprint,
            token=token or self.token,
        )
        prepared = prepare(entry, private=self.call.private)
        if raw is not None:
            route.prepared.put(self.key, raw, prepared)
        self.outcome = Outcome(prepared=prepared, stored=raw is not None)
        return self.outcome

    async def _stored(self) -> Outcome | Lookup | None:
        """The fresh entry stored under the key right now, else the read (for its token)."""
        lookup = await self.layer.lookup(self.key, self.call.fingerprint)
        if lookup is None or lookup.value is None:
            return lookup
        prepared = self.route.prepared.get(self.key, lookup.value, self.call.private)
        if prepared is None or not lookup.is_fresh:
            return lookup
        return Outcome(prepared=prepared)

    async def _stored_outcome(self) -> Outcome | None:
        found = await self._stored()
        return found if isinstance(found, Outcome) else None
