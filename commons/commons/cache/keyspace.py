r"""The key format: every key the cache writes is minted here, and parsed nowhere else.

Entry keys hold one response each; the key builders (``keys.py``) give them their inputs::

    {prefix}:{namespace}:tenant_{tenant}:{url_path}:{md5}
    {prefix}:{namespace}:tenant_{tenant}:user_{user}:{url_path}:{md5}
    {prefix}:{namespace}:tenant_{tenant}:~{text}      another key builder's text, in its tenant
    {prefix}:{namespace}:{url_path}:{md5}             a global entry (one for every caller)

``{prefix}:{namespace}`` is the *qualified namespace* fastapi-cache2 hands its key builders. A
prefix never holds ``:``, and tenant and user ids never do either (the builders refuse them), so
the text of an entry key names its scope exactly (:func:`scope_of_key`).

Helper keys start with ``{prefix}:#`` and are never entries; no entry key can start so, because a
namespace would have to begin with ``#`` and a key of that text is read as a helper key, not as an
entry (:func:`scope_of_key` returns ``None``)::

    {prefix}:#gen:{ns}[:t:{tenant}[:u:{user}]]   a scope's generation (see backends/base.py)
    {prefix}:#gen:{#tag:tag}[:t:...[:u:...]]     a tag's generation, at the same scope levels
    {prefix}:#reg:{ns}                           registry: the namespace's tenant leaves
    {prefix}:#reg:{ns}:t:{tenant}                registry: one tenant's user leaves
    {prefix}:#idx:{ns}:t:{tenant}[:u:{user}]     leaf: the entries of a tenant (or of a user)
    {prefix}:#idx:{ns}:-                         leaf: entries without a tenant
    {prefix}:#lock:{entry key}                   the replica lock of one entry's fill
    {prefix}:#check:{random}                     ``commons-cache check``'s write probe
    {prefix}:{namespace}:#uncacheable            what a request without an identity gets (never
                                                 read or written)

In helper keys ``ns``, ``tenant`` and ``user`` are percent-encoded, so no text a caller passes can
form another scope's helper key, a glob pattern or a cluster hash tag. The braces around ``ns``
are literal: they are the namespace's cluster hash tag (an empty namespace is written ``{%}``,
which no encoded text can be), so on Redis Cluster a namespace's helper keys share one slot.

A tag's generations are those of its pseudo-namespace ``#tag:{tag}`` (``scope.tag_namespace``),
in that pseudo-namespace's own hash tag: retiring one is one command on one slot however many
namespaces the tag spans, and a read of an entry with k tags asks k + 1 groups of generations,
each within one slot.

This module imports no backend; backends import it.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

from commons.cache.memo import BoundedMemo
from commons.cache.scope import CacheScope

__all__ = [
    "Keyspace",
    "check_key",
    "check_namespace",
    "entry_key",
    "foreign_entry_key",
    "glob_escape",
    "global_entry_key",
    "lock_key",
    "namespace_of_key",
    "qualified_namespace",
    "scope_of_key",
    "scope_of_namespace_text",
    "split_qualified_namespace",
    "uncacheable_key",
]

_TENANT = "tenant_"
_USER = "user_"


# -- entry keys ---------------------------------------------------------------------------------


def check_namespace(namespace: str) -> None:
    """Refuses a namespace that would hold a ``:`` in keys (``@cache`` and invalidation alike).

    Raises:
        ValueError: For a namespace holding ``:``.
    """
    if ":" in namespace:
        raise ValueError(f"cache namespace {namespace!r} must not contain ':'")


def qualified_namespace(prefix: str, namespace: str) -> str:
    """``{prefix}:{namespace}``, what fastapi-cache2 passes its key builders."""
    return f"{prefix}:{namespace}"


def split_qualified_namespace(qualified: str) -> tuple[str, str | None]:
    """``(prefix, namespace)`` of ``{prefix}:{namespace}``; the namespace is ``None`` when the
    text is a bare prefix (fastapi-cache2's ``clear()`` of everything)."""
    prefix, separator, namespace = qualified.partition(":")
    return prefix, namespace if separator else None


def entry_key(
    qualified: str, tenant_id: str, user_id: str | None, url_path: str, query_digest: str
) -> str:
    """An entry's key; the ids must hold no ``:`` (the builders check)."""
    if user_id is None:
        return f"{qualified}:{_TENANT}{tenant_id}:{url_path}:{query_digest}"
    return f"{qualified}:{_TENANT}{tenant_id}:{_USER}{user_id}:{url_path}:{query_digest}"


def global_entry_key(qualified: str, url_path: str, query_digest: str) -> str:
    """A global entry's key: no tenant part (a path starts with ``/``, never ``tenant_``)."""
    return f"{qualified}:{url_path}:{query_digest}"


def foreign_entry_key(qualified: str, tenant_id: str, text: str) -> str:
    """The key of an entry whose text another key builder wrote, placed in the tenant's scope.

    ``~`` cannot begin a path (``/``) or a user part (``user_``), so the text, whatever it
    holds, never reads as another scope (:func:`scope_of_key` reads the tenant only).
    """
    return f"{qualified}:{_TENANT}{tenant_id}:~{text}"


def uncacheable_key(qualified: str) -> str:
    """The key a request gets when it must be served uncached (it is never read or written)."""
    return f"{qualified}:#uncacheable"


def scope_of_key(prefix: str, key: str) -> CacheScope | None:
    """The scope a key's text names, or ``None`` for a key outside ``prefix``.

    ``{prefix}:{ns}:tenant_{t}:user_{u}:...`` is scoped to that user,
    ``{prefix}:{ns}:tenant_{t}:...`` to that tenant (a path always starts with ``/``, so it is
    never read as an id), anything else under the prefix to its namespace. Helper keys
    (``{prefix}:#...``) are no entries.
    """
    head, sep, rest = key.partition(":")
    if not sep or head != prefix or rest.startswith("#"):
        return None
    namespace, _, rest = rest.partition(":")
    tenant_part, _, rest = rest.partition(":")
    if not tenant_part.startswith(_TENANT) or len(tenant_part) == len(_TENANT):
        return CacheScope(namespace)
    tenant_id = tenant_part[len(_TENANT) :]
    user_part = rest.partition(":")[0]
    if user_part.startswith(_USER) and len(user_part) > len(_USER):
        return CacheScope(namespace, tenant_id, user_part[len(_USER) :])
    return CacheScope(namespace, tenant_id)


def scope_of_namespace_text(text: str) -> CacheScope | None:
    """The scope ``{ns}``, ``{ns}:tenant_{t}`` or ``{ns}:tenant_{t}:user_{u}`` names: the part of
    an entry key before its path, as fastapi-cache2's ``clear(namespace=...)`` passes it after the
    prefix to clear every key under it. ``None`` for any other text (a path, a helper key's ``#``,
    an empty id), which names no scope an entry can have."""
    # Read as a key's text would be, then kept only if it is exactly that scope's part of a key.
    scope = scope_of_key("", f":{text}")
    if scope is None:
        return None
    named = [scope.namespace]
    if scope.tenant_id is not None:
        named.append(f"{_TENANT}{scope.tenant_id}")
    if scope.user_id is not None:
        named.append(f"{_USER}{scope.user_id}")
    return scope if ":".join(named) == text else None


def namespace_of_key(prefix: str, key: str) -> str | None:
    """The namespace a key under ``prefix`` names (an uncacheable key's too); ``None`` for a key
    outside ``prefix`` or a helper key."""
    head, sep, rest = key.partition(":")
    if not sep or head != prefix or rest.startswith("#"):
        return None
    return rest.partition(":")[0]


# -- helper keys ---------------------------------------------------------------------------------


def lock_key(prefix: str, key: str) -> str:
    """The replica lock of the fill of ``key`` (see the decorator's ``distributed_lock``)."""
    return f"{prefix}:#lock:{key}"


def check_key(prefix: str, token: str) -> str:
    """A throw-away key that proves Redis accepts writes under ``prefix``."""
    return f"{prefix}:#check:{token}"


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis glob pattern (``SCAN MATCH``)."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


def _quote(text: str) -> str:
    return quote(text, safe="")


def _tag(namespace: str) -> str:
    """The namespace's hash tag: its percent-encoded text in braces (``{%}`` when empty)."""
    return "{" + (_quote(namespace) or "%") + "}"


def _untag(text: str) -> str:
    """The namespace whose :func:`_tag` is ``text``."""
    inner = text[1:-1] if text.startswith("{") and text.endswith("}") else text
    return "" if inner == "%" else unquote(inner)


class Keyspace:
    """The helper keys of one prefix: generations, and the registries and leaves that index
    entries by scope (see the module docstring)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._gen = f"{prefix}:#gen:"
        self._reg = f"{prefix}:#reg:"
        self._idx = f"{prefix}:#idx:"
        # An entry's generation keys are asked on every read: kept, bounded in entries and bytes.
        self._generation_keys = BoundedMemo[CacheScope, list[str]](4096, 4 * 1024 * 1024)

    def all_keys_glob(self) -> str:
        """The ``SCAN MATCH`` pattern of every key of the prefix, entries and helpers alike."""
        return f"{glob_escape(self.prefix)}:*"

    def generation_prefixes(self) -> tuple[str, ...]:
        """What every generation key starts with, and no other key of the prefix: what a near
        cache asks Redis to announce changes of (broadcast tracking)."""
        return (self._gen,)

    def generation_keys(self, scope: CacheScope) -> list[str]:
        """The keys holding the generations an entry of ``scope`` depends on: its own scope's,
        widest first, then each tag's (:meth:`generation_groups`, flattened)."""
        known = self._generation_keys.get(scope)
        if known is not None:
            return known
        keys = [key for group in self.generation_groups(scope) for key in group]
        size = sum(map(len, keys)) + sum(map(len, scope.tags)) + len(scope.namespace) + 64
        self._generation_keys.put(scope, keys, size)
        return keys

    def generation_groups(self, scope: CacheScope) -> list[list[str]]:
        """:meth:`generation_keys` by cluster hash tag: the scope's own generations, then one
        group per tag (on Redis Cluster each group is one ``MGET`` on one slot)."""
        return [self._scope_generations(each) for each in scope.index_scopes()]

    def scope_generation_key(self, scope: CacheScope) -> str:
        """The generation that an invalidation of exactly ``scope`` (its namespace, tenant and
        user; never its tags) retires: the narrowest of its own."""
        return self._scope_generations(scope.untagged())[-1]

    def _scope_generations(self, scope: CacheScope) -> list[str]:
        """``{prefix}:#gen:{ns}``, then ``...:t:{tenant}``, then ``...:t:{tenant}:u:{user}``: all in
        the namespace's hash tag, so one ``MGET`` reads them on a cluster too."""
        keys = [self._gen + _tag(scope.namespace)]
        if scope.tenant_id is not None:
            keys.append(f"{keys[0]}:t:{_quote(scope.tenant_id)}")
            if scope.user_id is not None:
                keys.append(f"{keys[1]}:u:{_quote(scope.user_id)}")
        return keys

    def namespace_registry(self, namespace: str) -> str:
        return self._reg + _tag(namespace)

    def tenant_registry(self, namespace: str, tenant_id: str) -> str:
        return f"{self._reg}{_tag(namespace)}:t:{_quote(tenant_id)}"

    def tenant_leaf(self, namespace: str, tenant_id: str) -> str:
        return f"{self._idx}{_tag(namespace)}:t:{_quote(tenant_id)}"

    def user_leaf(self, namespace: str, tenant_id: str, user_id: str) -> str:
        return f"{self.tenant_leaf(namespace, tenant_id)}:u:{_quote(user_id)}"

    def unscoped_leaf(self, namespace: str) -> str:
        return f"{self._idx}{_tag(namespace)}:-"

    def registry_of_leaf(self, leaf: str) -> str:
        """The registry of the leaves under ``leaf``: a tenant leaf's user leaves. (Other leaves
        have none: the name is then of a registry that never exists.)"""
        return self._reg + leaf[len(self._idx) :]

    def tenant_of_leaf(self, namespace: str, leaf: str) -> str | None:
        """The tenant of a leaf in ``namespace``'s registry; ``None`` for the unscoped leaf."""
        head = self.tenant_leaf(namespace, "")
        return unquote(leaf[len(head) :]) if leaf.startswith(head) else None

    def registries_glob(self) -> str:
        """The ``SCAN MATCH`` pattern of every registry of the prefix."""
        return f"{glob_escape(self._reg)}*"

    def namespace_of_registry(self, registry: str) -> str | None:
        """The namespace whose registry is ``registry``; ``None`` for a tenant's registry."""
        rest = registry[len(self._reg) :]
        return None if ":" in rest else _untag(rest)
