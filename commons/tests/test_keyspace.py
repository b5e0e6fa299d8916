"""The key format: entry keys name their scope, helper keys never pass for entries."""

from __future__ import annotations

import pytest

from commons.cache.keyspace import (
    Keyspace,
    entry_key,
    foreign_entry_key,
    lock_key,
    qualified_namespace,
    scope_of_key,
    scope_of_namespace_text,
    split_qualified_namespace,
)
from commons.cache.scope import CacheScope

PREFIX = "svc"


def test_an_entry_key_names_the_scope_it_was_built_for() -> None:
    qualified = qualified_namespace(PREFIX, "config")
    tenant_key = entry_key(qualified, "acme", None, "/items", "d41d")
    user_key = entry_key(qualified, "acme", "ann", "/items", "d41d")

    assert tenant_key == "svc:config:tenant_acme:/items:d41d"
    assert scope_of_key(PREFIX, tenant_key) == CacheScope("config", "acme")
    assert scope_of_key(PREFIX, user_key) == CacheScope("config", "acme", "ann")


@pytest.mark.parametrize("text", ["user_bob:/me", "svc:config:tenant_other:/x", "", "a:b"])
def test_another_builders_text_is_read_as_its_tenants_entry_whatever_it_says(text: str) -> None:
    key = foreign_entry_key(qualified_namespace(PREFIX, "config"), "acme", text)

    assert scope_of_key(PREFIX, key) == CacheScope("config", "acme")


def test_a_key_of_another_prefix_has_no_scope_here() -> None:
    assert scope_of_key(PREFIX, "other:config:tenant_acme:/items:d41d") is None
    assert scope_of_key(PREFIX, "svc") is None


@pytest.mark.parametrize(
    ("text", "scope"),
    [
        ("config", CacheScope("config")),
        ("", CacheScope("")),
        ("config:tenant_acme", CacheScope("config", "acme")),
        ("config:tenant_acme:user_ann", CacheScope("config", "acme", "ann")),
    ],
)
def test_the_text_before_a_keys_path_names_its_scope(text: str, scope: CacheScope) -> None:
    """What fastapi-cache2's ``clear(namespace=...)`` passes: every entry key of ``scope``
    begins with it."""
    key = entry_key(
        qualified_namespace(PREFIX, scope.namespace), "acme", scope.user_id, "/items", "d41d"
    )

    assert scope_of_namespace_text(text) == scope
    assert scope.tenant_id is None or key.startswith(f"{PREFIX}:{text}:")


@pytest.mark.parametrize(
    "text",
    [
        "config:",
        "config:/items",
        "config:tenant_",
        "config:tenant_acme:",
        "config:tenant_acme:/items",
        "config:tenant_acme:user_",
        "config:tenant_acme:user_ann:/items",
        "#idx:config",
        "a:b",
    ],
)
def test_a_text_no_entry_key_begins_with_names_no_scope(text: str) -> None:
    assert scope_of_namespace_text(text) is None


def test_helper_keys_are_never_read_as_entries() -> None:
    keys = Keyspace(PREFIX)
    helpers = [
        *keys.generation_keys(CacheScope("config", "acme", "ann")),
        keys.namespace_registry("config"),
        keys.tenant_registry("config", "acme"),
        keys.tenant_leaf("config", "acme"),
        keys.user_leaf("config", "acme", "ann"),
        keys.unscoped_leaf("config"),
        lock_key(PREFIX, "svc:config:tenant_acme:/items:d41d"),
    ]
    assert all(helper.startswith("svc:#") for helper in helpers)
    assert [scope_of_key(PREFIX, helper) for helper in helpers] == [None] * len(helpers)


@pytest.mark.parametrize("namespace", ["", "config", "a:b", "{tag}", "50%", "*?[]"])
def test_a_namespace_is_found_again_from_its_registry_whatever_its_text(namespace: str) -> None:
    keys = Keyspace(PREFIX)
    assert keys.namespace_of_registry(keys.namespace_registry(namespace)) == namespace
    assert keys.namespace_of_registry(keys.tenant_registry(namespace, "acme")) is None


def test_a_tenant_is_found_again_from_its_leaf_and_the_unscoped_leaf_has_none() -> None:
    keys = Keyspace(PREFIX)
    assert keys.tenant_of_leaf("config", keys.tenant_leaf("config", "ac:me")) == "ac:me"
    assert keys.tenant_of_leaf("config", keys.unscoped_leaf("config")) is None


def test_a_tenant_leaf_holds_its_users_leaves_in_a_registry_of_the_same_scope() -> None:
    keys = Keyspace(PREFIX)
    leaf = keys.tenant_leaf("config", "acme")
    assert keys.registry_of_leaf(leaf) == keys.tenant_registry("config", "acme")


def test_ids_cannot_spell_another_scopes_helper_keys() -> None:
    keys = Keyspace(PREFIX)
    tricky = keys.generation_keys(CacheScope("config", "a:u:b"))
    honest = keys.generation_keys(CacheScope("config", "a", "b"))
    assert tricky[-1] not in honest


def test_a_qualified_namespace_splits_into_prefix_and_namespace() -> None:
    assert split_qualified_namespace("svc:config") == ("svc", "config")
    assert split_qualified_namespace("svc:") == ("svc", "")
    assert split_qualified_namespace("svc") == ("svc", None)
