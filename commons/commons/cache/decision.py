"""What a cached route does with one request: the named outcomes, and the one function that
chooses among them.

:func:`decide` is pure (no I/O, no clock): it reads a :class:`Situation` (what the request asks
and what the lookup found) and returns an :class:`RequestOutcome`. ``request_flow.py`` gathers the
situation, asks, and carries the outcome out. The rules, in the order they apply:

1. ``init_cache()`` has not run: the handler answers (a mistake, logged once per route).
2. Caching disabled (``CACHE_ENABLED=false``), a method other than GET and HEAD, or no identity
   to build a key from: bypassed, the handler answers, nothing is read or stored (fail closed).
3. A valid stored answer that is fresh (``layer.Lookup.is_fresh``, the one freshness rule):
   ``304`` when the client's ``If-None-Match`` names its ETag, else a HIT.
4. A stored answer stale for less than the route's ``stale_ttl``: served at once (STALE; a
   ``304`` too when the client has it), and refreshed after the response is sent.
5. Anything else is a miss, of one of three kinds: a client that asked for a fresh answer
   (``CACHE_HONOR_CLIENT_NO_CACHE``) read nothing; a stored answer past ``stale_ttl`` but within
   ``stale_if_error`` stands in if computing fails; past both, it is only a miss. A GET's miss is
   filled once and stored; a HEAD's is answered by the handler and never stored, whatever its
   kind (a GET's entry answers a HEAD, never the other way round).
"""

from __future__ import annotations

from typing import Final, NamedTuple

from commons.cache.events import LookupOutcome

__all__ = ["COUNTED_AS", "FORWARDED_BECAUSE", "RequestOutcome", "Situation", "decide"]


class RequestOutcome:
    """The outcomes of one request to a cached route (see the module docstring)."""

    #: ``init_cache()`` has not run: the handler answers.
    UNINITIALISED = "uninitialised"
    #: ``CACHE_ENABLED=false``: the handler answers.
    BYPASS_DISABLED = "bypass_disabled"
    #: Not a GET or a HEAD: the handler answers.
    BYPASS_NOT_A_READ = "bypass_not_a_read"
    #: No identity to build a key from (or a key outside the prefix): the handler answers.
    BYPASS_NO_IDENTITY = "bypass_no_identity"
    #: A fresh stored answer, sent.
    HIT = "hit"
    #: A fresh stored answer the client already has: ``304``, no body.
    NOT_MODIFIED = "not_modified"
    #: A stored answer within its ``stale_ttl``: sent, then refreshed in the background.
    STALE = "stale"
    #: Nothing stored (or nothing valid): computed once and stored.
    MISS = "miss"
    #: The client asked for a fresh answer: computed (nothing was read) and stored.
    MISS_ASKED_FRESH = "miss_asked_fresh"
    #: Stored but too stale to send: computed like a miss.
    MISS_STALE = "miss_stale"
    #: Stored, too stale to send but within ``stale_if_error``: computed; sent if that fails.
    MISS_STALE_FALLBACK = "miss_stale_fallback"


#: How each outcome is counted (:meth:`~commons.cache.events.CacheEvents.lookup`); ``None``: not
#: counted (a mistake in the service, logged instead).
COUNTED_AS: Final[dict[str, str | None]] = {
    RequestOutcome.UNINITIALISED: None,
    RequestOutcome.BYPASS_DISABLED: LookupOutcome.BYPASS_DISABLED,
    RequestOutcome.BYPASS_NOT_A_READ: None,
    RequestOutcome.BYPASS_NO_IDENTITY: LookupOutcome.BYPASS_NO_IDENTITY,
    RequestOutcome.HIT: LookupOutcome.HIT,
    RequestOutcome.NOT_MODIFIED: LookupOutcome.HIT,
    RequestOutcome.STALE: LookupOutcome.STALE,
    RequestOutcome.MISS: LookupOutcome.MISS,
    RequestOutcome.MISS_ASKED_FRESH: LookupOutcome.BYPASS_CLIENT,
    RequestOutcome.MISS_STALE: LookupOutcome.MISS,
    RequestOutcome.MISS_STALE_FALLBACK: LookupOutcome.MISS,
}

#: Why a computed answer went to the handler: ``Cache-Status``'s ``fwd`` (RFC 9211).
FORWARDED_BECAUSE: Final[dict[str, bytes]] = {
    RequestOutcome.MISS: b"fwd=miss",
    RequestOutcome.MISS_ASKED_FRESH: b"fwd=request",
    RequestOutcome.MISS_STALE: b"fwd=stale",
    RequestOutcome.MISS_STALE_FALLBACK: b"fwd=stale",
}


class Situation(NamedTuple):
    """What :func:`decide` reads: the request, and what the lookup found."""

    #: ``init_cache()`` has run.
    initialised: bool
    #: ``CACHE_ENABLED`` is true.
    enabled: bool = True
    #: A GET or a HEAD.
    is_read: bool = True
    #: A key was built and may be cached (the lookup was not refused).
    identified: bool = True
    #: The client's ``Cache-Control`` refused a stored answer, and the settings honour it.
    asked_fresh: bool = False
    #: A valid stored answer was found (format, fingerprint, generation and payload).
    stored: bool = False
    #: The stored answer is fresh (``layer.Lookup.is_fresh``).
    fresh: bool = False
    #: Seconds of freshness it has left (negative: how long it has been stale).
    fresh_for: int = 0
    #: The client's ``If-None-Match`` names the stored answer's ETag.
    client_has_it: bool = False
    #: The route's ``stale_ttl``: seconds a stale answer is sent while it is refreshed.
    stale_ttl: int = 0
    #: Seconds a stale answer may stand in for a failed computation.
    stale_if_error: int = 0


def decide(situation: Situation) -> str:
    """The :class:`RequestOutcome` of a request in ``situation`` (see the module docstring)."""
    if not situation.initialised:
        return RequestOutcome.UNINITIALISED
    if not situation.enabled:
        return RequestOutcome.BYPASS_DISABLED
    if not situation.is_read:
        return RequestOutcome.BYPASS_NOT_A_READ
    if not situation.identified:
        return RequestOutcome.BYPASS_NO_IDENTITY
    if situation.stored:
        if situation.fresh:
            return RequestOutcome.NOT_MODIFIED if situation.client_has_it else RequestOutcome.HIT
        if -situation.fresh_for < situation.stale_ttl:
            return RequestOutcome.STALE
    if situation.asked_fresh:
        return RequestOutcome.MISS_ASKED_FRESH
    if situation.stored:
        if -situation.fresh_for <= situation.stale_if_error:
            return RequestOutcome.MISS_STALE_FALLBACK
        return RequestOutcome.MISS_STALE
    return RequestOutcome.MISS
