"""What an entry belongs to: the isolation contract between prefixes, namespaces, tenants and users.

- A **prefix** (``CACHE_PREFIX``) belongs to one service. Nothing the cache does under one prefix
  reads, writes or removes a key of another prefix.
- A **namespace** groups the entries of one kind of response (``tenant_config``). Invalidating a
  namespace removes only entries stored under that exact namespace: never one whose namespace merely
  starts with the same text (``tenant`` never touches ``tenant_config``).
- A **tenant** scope holds one tenant's entries of a namespace; invalidating it leaves every other
  tenant's entries in place. It includes the user-scoped entries of that tenant.
- A **user** scope holds one user's entries within one tenant.
- A **tag** (``@cache(tags=[...])``) groups entries across the namespaces of one prefix. An entry
  depends on each of its tags at its own scope levels, so invalidating a tag (in every tenant, one
  tenant, or one user of a tenant) touches exactly the entries carrying that literal tag there.
  An invalidation by tag is a target whose namespace is the tag's pseudo-namespace
  (:func:`tag_namespace`, ``#tag:{tag}``), which no real namespace can be (they refuse ``:``): so
  everything that keeps, orders or replays targets treats both alike.

Keys carry their scope with them (:class:`ScopedKey`), so the backends index entries without ever
parsing a key or matching a pattern; namespaces and ids are literal text throughout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

__all__ = [
    "TAG_NAMESPACE_PREFIX",
    "CacheScope",
    "InvalidationTarget",
    "ScopedKey",
    "shared_scope",
    "tag_namespace",
]

#: What the pseudo-namespace of a tag starts with (see :func:`tag_namespace`).
TAG_NAMESPACE_PREFIX = "#tag:"


def tag_namespace(tag: str) -> str:
    """The pseudo-namespace under which a tag's generations and kept invalidations live."""
    return TAG_NAMESPACE_PREFIX + tag


@dataclass(frozen=True, slots=True)
class CacheScope:
    """The namespace, tenant and user an entry is stored for (``None``: not scoped that far),
    and the tags it carries (invalidated with :func:`~commons.cache.invalidate_tags`)."""

    namespace: str
    tenant_id: str | None = None
    user_id: str | None = None
    tags: tuple[str, ...] = ()

    def untagged(self) -> CacheScope:
        """The namespace, tenant and user alone."""
        return CacheScope(self.namespace, self.tenant_id, self.user_id) if self.tags else self

    def tag_scopes(self) -> list[CacheScope]:
        """Per tag, the scope of the tag's pseudo-namespace at this entry's tenant and user:
        what the entry depends on beside its own scope."""
        return [CacheScope(tag_namespace(tag), self.tenant_id, self.user_id) for tag in self.tags]

    def index_scopes(self) -> list[CacheScope]:
        """Every untagged scope an invalidation of which must reach this entry: its own first."""
        return [self.untagged(), *self.tag_scopes()]


@functools.lru_cache(maxsize=4096)
def shared_scope(
    namespace: str, tenant_id: str | None, user_id: str | None, tags: tuple[str, ...]
) -> CacheScope:
    """One scope object per namespace, tenant, user and tags among the most recent: a key made
    again from its text, or a hit remembered as plain values, shares it instead of making one
    more."""
    return CacheScope(namespace, tenant_id, user_id, tags)


@dataclass(frozen=True, slots=True)
class InvalidationTarget:
    """A set of entries to remove: a whole namespace, one tenant of it, or one user of a tenant."""

    namespace: str
    tenant_id: str | None = None
    user_id: str | None = None

    def __post_init__(self) -> None:
        if self.user_id is not None and self.tenant_id is None:
            raise ValueError("invalidating a user's entries needs the user's tenant_id too")

    def covers(self, other: InvalidationTarget) -> bool:
        """True when invalidating ``self`` also removes everything ``other`` would."""
        if self.namespace != other.namespace:
            return False
        if self.tenant_id is None:
            return True
        if self.tenant_id != other.tenant_id:
            return False
        return self.user_id is None or self.user_id == other.user_id

    def matches(self, scope: CacheScope) -> bool:
        """True when an entry stored for ``scope`` falls under this target (its namespace, or
        for a tag's target, one of its tags)."""
        if self.tag is not None:
            in_target = self.tag in scope.tags
        else:
            in_target = self.namespace == scope.namespace
        return (
            in_target
            and (self.tenant_id is None or self.tenant_id == scope.tenant_id)
            and (self.user_id is None or self.user_id == scope.user_id)
        )

    @property
    def tag(self) -> str | None:
        """The tag this target invalidates; ``None`` for a namespace's target."""
        if self.namespace.startswith(TAG_NAMESPACE_PREFIX):
            return self.namespace[len(TAG_NAMESPACE_PREFIX) :]
        return None

    @property
    def reported_namespace(self) -> str:
        """The namespace that metrics and logs name: a tag's target is reported as ``#tag``, so
        that tags (one per item, as a rule) never become labels."""
        return "#tag" if self.tag is not None else self.namespace


class ScopedKey(str):
    """A cache key (exactly the string stored in Redis) that also knows its scope.

    ``scope`` is ``None`` for a key that must never be read or written: the key builder returns
    one when the request's identity is missing, so the request is served uncached (fail closed).
    """

    scope: CacheScope | None
    #: What produced the request this key was built for (the route and its handler), when the
    #: builder was given a routed request: the fastapi-cache2 adapter fingerprints it.
    origin: tuple[object, object] | None
    #: The response of the request this key was built for, when the builder was given one
    #: (fastapi-cache2's decorator gives it): its adapter reads the headers the handler set.
    response: object | None
    #: Why a key without a scope may not be read or written (for the warning its route logs).
    reason: str | None
    _routed: ScopedKey | None

    def __new__(
        cls, key: str, scope: CacheScope | None, origin: tuple[object, object] | None = None
    ) -> ScopedKey:
        instance = super().__new__(cls, key)
        instance.scope = scope
        instance.origin = origin
        instance.response = None
        instance.reason = None
        instance._routed = None
        return instance

    def with_response(self, response: object) -> ScopedKey:
        """This key for one request, with its ``response`` (a new key each time: it is that
        request's alone)."""
        own = ScopedKey(self, self.scope, self.origin)
        own.response = response
        return own

    def with_origin(self, route: object, handler: object) -> ScopedKey:
        """This key, for a request served by ``route`` with ``handler`` (the last one made is
        kept: a key is requested through one route, as a rule)."""
        origin = self.origin
        if origin is not None and origin[0] is route and origin[1] is handler:
            return self  # made for them already
        routed = self._routed
        origin = routed.origin if routed is not None else None
        if (
            routed is not None
            and origin is not None
            and origin[0] is route
            and origin[1] is handler
        ):
            return routed
        routed = ScopedKey(self, self.scope, (route, handler))
        self._routed = routed
        return routed

    def with_tags(self, tags: tuple[str, ...]) -> ScopedKey:
        """This key, its entry carrying ``tags`` (a key without a scope stays as it is)."""
        if self.scope is None or not tags:
            return self
        return ScopedKey(self, replace(self.scope, tags=tags), self.origin)

    @property
    def cacheable(self) -> bool:
        return self.scope is not None

    @property
    def is_private(self) -> bool:
        """True when the entry belongs to one tenant or user (never for a shared proxy)."""
        return self.scope is not None and self.scope.tenant_id is not None
