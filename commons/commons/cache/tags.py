"""Tags: which entries an ``invalidate_tags()`` reaches, across the namespaces of one prefix.

An entry's tags come from ``@cache(tags=...)``: literal text in which ``{name}`` is replaced by the
handler's argument ``name`` (a path parameter, as a rule: ``"insight:{insight_id}"``), or a
function of the handler's keyword arguments returning the tags. They are worked out when the
request's key is built and carried by its scope (``CacheScope.tags``), never written into the key.

How an invalidation by tag holds (Symfony's TagAwareAdapter, on our generations): an entry depends
on each tag's generations at the entry's own scope levels (the tag; the tag in its tenant; the tag
for its user) besides its scope's, and a read compares them all in the same round trip. Invalidating
a tag retires one of those generations: one command whatever the number of entries, and every rule
of namespace invalidation holds alike (a fill of the old generation is refused atomically, a
missing generation reads as a new random one so an eviction only causes misses, the invalidation is
kept while Redis is unreachable, near caches are told by Redis' broadcast of generation keys,
``WAIT`` behind Sentinel and on a cluster). The invalidated entries are not removed from Redis:
no read can serve them, and they expire with their time to live.

Limits: at most ``CACHE_MAX_TAGS_PER_ENTRY`` tags per entry (each costs a read up to three more
generation keys), each at most :data:`MAX_TAG_LENGTH` characters, never empty. Tags are literal:
``item:*`` is no pattern. A tag should be a function of what the key holds (the path and query with
the default key builders): an entry's read and its fill must agree on its tags, or it only misses.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from enum import Enum
from typing import Any, TypeGuard

from fastapi_cache.types import KeyBuilder
from starlette.requests import Request
from starlette.responses import Response

from commons.cache.keys import scoped_key
from commons.cache.keyspace import uncacheable_key
from commons.cache.lifecycle import current_layer
from commons.cache.scope import ScopedKey
from commons.cache.settings import cache_settings

__all__ = ["MAX_TAG_LENGTH", "EntryTags", "TagSource", "check_tag"]

#: The longest tag accepted, in characters.
MAX_TAG_LENGTH = 200

#: What ``@cache(tags=...)`` takes: literal tags (with ``{name}`` placeholders), or a function of
#: the handler's keyword arguments returning them.
TagSource = Sequence[str] | Callable[[dict[str, Any]], Iterable[str]]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TOO_MANY = "the tags function returned more tags than CACHE_MAX_TAGS_PER_ENTRY allows"
_UNFIT = f"a tag is not text, is empty or is longer than {MAX_TAG_LENGTH} characters"


def check_tag(tag: object) -> str:
    """``tag`` if it is a tag that may be set or invalidated.

    Raises:
        ValueError: For a tag that is not text, is empty, or is longer than
            :data:`MAX_TAG_LENGTH` characters.
    """
    if not _fit(tag):
        raise ValueError(
            f"a cache tag must be non-empty text of at most {MAX_TAG_LENGTH} characters: {tag!r}"
        )
    return tag


def _fit(tag: object) -> TypeGuard[str]:
    return isinstance(tag, str) and 0 < len(tag) <= MAX_TAG_LENGTH


def _text(value: object) -> str:
    """A placeholder's value as the tag's text: an enumeration member's value, else ``str()``."""
    return str(value.value) if isinstance(value, Enum) else str(value)


class EntryTags:
    """The tags of one route's entries (see the module docstring).

    Args:
        source: ``@cache(tags=...)``.
        parameters: The handler's parameter names (what a ``{name}`` may refer to).

    Raises:
        ValueError: At decoration: more literal tags than ``CACHE_MAX_TAGS_PER_ENTRY``, an empty
            or over-long one, or a ``{name}`` that is no parameter of the handler.
        TypeError: ``tags`` given as one string rather than a list of them.
    """

    def __init__(self, source: TagSource, parameters: Iterable[str]) -> None:
        self._function: Callable[[dict[str, Any]], Iterable[str]] | None = None
        self._templates: tuple[tuple[str, tuple[str, ...]], ...] = ()
        #: The tags themselves when no template names a parameter: the same for every call.
        self._literal: tuple[str, ...] | None = None
        if callable(source):
            self._function = source
            return
        if isinstance(source, str):
            raise TypeError(f"tags must be a list of tags, not one string: tags=[{source!r}]")
        templates = tuple(dict.fromkeys(source))
        limit = cache_settings().CACHE_MAX_TAGS_PER_ENTRY
        if len(templates) > limit:
            raise ValueError(
                f"{len(templates)} tags given, CACHE_MAX_TAGS_PER_ENTRY allows {limit}"
            )
        known = set(parameters)
        for template in templates:
            check_tag(template)
            names = tuple(_PLACEHOLDER.findall(template))
            unknown = [name for name in names if name not in known]
            if unknown:
                raise ValueError(
                    f"tag {template!r} names {', '.join(unknown)}: no parameter of the handler"
                )
        self._templates = tuple(
            (template, tuple(_PLACEHOLDER.findall(template))) for template in templates
        )
        if not any(names for _, names in self._templates):
            self._literal = templates

    def of(self, request: Request | None, kwargs: dict[str, Any]) -> tuple[str, ...] | None:
        """The tags of the entry of one call, each once; ``None`` when one of them is unfit
        (empty, over-long, not text): the entry must not be stored."""
        if self._literal is not None:
            return self._literal
        if self._function is not None:
            given = self._function(kwargs)
            if isinstance(given, str):
                given = [given]
            elif not isinstance(given, Iterable):
                return None  # None, a number: no tags at all, so nothing to store it under
            items = tuple(given)
            if not all(map(_fit, items)):
                return None  # checked before hashing: a dict among them is no tag either
            found = tuple(dict.fromkeys(items))
        else:
            found = tuple(
                dict.fromkeys(
                    _PLACEHOLDER.sub(lambda named: self._value(named[1], request, kwargs), text)
                    if names
                    else text
                    for text, names in self._templates
                )
            )
        return found if all(map(_fit, found)) else None

    @staticmethod
    def _value(name: str, request: Request | None, kwargs: dict[str, Any]) -> str:
        if name in kwargs:
            return _text(kwargs[name])
        if request is not None and name in request.path_params:
            return _text(request.path_params[name])
        return ""  # an empty part: the tag is still exactly what the template says

    def tagged(
        self, key: ScopedKey, qualified: str, request: Request | None, kwargs: dict[str, Any]
    ) -> ScopedKey:
        """``key`` carrying this call's tags; a key never stored when they cannot be carried."""
        if key.scope is None:
            return key
        tags = self.of(request, kwargs)
        layer = current_layer()
        limit = (layer.settings if layer is not None else cache_settings()).CACHE_MAX_TAGS_PER_ENTRY
        if tags is None or len(tags) > limit:
            refused = ScopedKey(uncacheable_key(qualified), None)
            refused.reason = _UNFIT if tags is None else _TOO_MANY
            return refused
        return key.with_tags(tags)

    def key_builder(self, inner: KeyBuilder) -> KeyBuilder:
        """``inner``, its keys carrying this route's tags."""

        def build(
            func: Callable[..., Any],
            namespace: str = "",
            *,
            request: Request | None = None,
            response: Response | None = None,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
        ) -> str | Awaitable[str]:
            built = inner(
                func, namespace, request=request, response=response, args=args, kwargs=kwargs
            )
            if not inspect.isawaitable(built):
                return self.tagged(scoped_key(built, namespace), namespace, request, kwargs)

            async def later() -> str:
                key = scoped_key(await built, namespace)
                return self.tagged(key, namespace, request, kwargs)

            return later()

        return build
