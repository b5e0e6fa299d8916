"""``commons-cache``: operate one service's cache from a shell (also ``python -m commons.cache``).

It reads the same environment variables as the services (``REDIS_URL``, ``CACHE_PREFIX``, the
timeouts, ...; see ``settings.py``), so run it with the service's environment::

    commons-cache check                    # settings, connectivity, version, eviction policy
    commons-cache stats [--by-tenant]      # entries per namespace (and tenant), memory used
    commons-cache invalidate NAMESPACE [--tenant ID] [--user ID]
    commons-cache invalidate --tag TAG [--tag TAG ...] [--tenant ID] [--user ID]
    commons-cache flush [--dry-run] [--yes]

Every command touches the keys of ``CACHE_PREFIX`` only. ``stats`` reads the invalidation indexes
(``ZCOUNT`` per index, no key scan); ``invalidate`` is ``invalidate_namespace()`` (with ``--tag``,
``invalidate_tags()``) applied to Redis;
``flush`` walks the prefix with ``SCAN`` and removes it with ``UNLINK`` in batches, so Redis keeps
answering other clients throughout (never ``KEYS``, which blocks it), and key names are never
passed through a shell. ``invalidate`` and ``flush`` act on Redis: a replica serving from its
in-memory tier during an outage keeps its entries until it returns to Redis.

Failures are one line on stderr, never a traceback. Exit status: 0 done, 1 Redis failed or the
user declined, 2 bad settings or arguments.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

import typer
from pydantic import ValidationError

from commons.cache.backends.base import OperatorCommands
from commons.cache.backends.factory import operator_commands
from commons.cache.errors import BackendError, BackendRejectedError
from commons.cache.keyspace import check_namespace
from commons.cache.scope import InvalidationTarget, tag_namespace
from commons.cache.settings import CacheSettings
from commons.cache.tags import check_tag

__all__ = ["app", "main"]

T = TypeVar("T")

#: Entries per namespace whose ``MEMORY USAGE`` is read to estimate the namespace's memory.
MEMORY_SAMPLES = 50

EXIT_FAILED = 1
EXIT_BAD_SETTINGS = 2

app = typer.Typer(
    name="commons-cache",
    help="Operate a service's response cache in Redis. Configured by the service's environment "
    "(REDIS_URL, CACHE_PREFIX, ...).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# -- plumbing ----------------------------------------------------------------------------------


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _describe_invalid(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "settings"
        message = str(error["msg"]).removeprefix("Value error, ")
        # The URL may carry a password: never echo it, nor the whole settings a check across
        # fields was given (they hold the URL).
        given = error.get("input")
        secret = name in ("REDIS_URL", "settings") or not isinstance(given, str | int | float)
        shown = "" if secret else f" (got {given!r})"
        parts.append(f"{name}: {message}{shown}")
    return "invalid cache settings: " + "; ".join(parts)


def _load_settings() -> CacheSettings:
    # Read the environment now, exactly as cache_settings() does in a service.
    try:
        return CacheSettings()
    except ValidationError as exc:
        _fail(_describe_invalid(exc), EXIT_BAD_SETTINGS)


def _redis_settings(action: str) -> CacheSettings:
    settings = _load_settings()
    if settings.REDIS_URL is None:
        _fail(
            f"REDIS_URL is not set: nothing to {action} (without Redis each service process "
            "caches in its own memory)",
            EXIT_BAD_SETTINGS,
        )
    if "CACHE_PREFIX" not in settings.model_fields_set:
        # The default prefix is rarely the service's: the command would work on keys no
        # service reads, and say nothing.
        typer.echo(
            f"warning: CACHE_PREFIX is not set: working on the default prefix "
            f"{settings.CACHE_PREFIX!r}; set it to the service's (as in its environment)",
            err=True,
        )
    return settings


def _shown_url(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _with_store(settings: CacheSettings, work: Callable[[OperatorCommands], Awaitable[T]]) -> T:
    """Runs ``work`` against the settings' Redis; a Redis failure becomes one line and exit 1."""

    async def run() -> T:
        # Built as init_cache() builds it; the first PING also finds out whether it is a cluster.
        store = operator_commands(settings)
        try:
            await store.ping()
            return await work(store)
        finally:
            await store.aclose()

    assert settings.REDIS_URL is not None
    try:
        return asyncio.run(run())
    except BackendError as exc:
        _fail(f"Redis at {_shown_url(settings.REDIS_URL)}: {exc}")


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _maxmemory(info: dict[str, Any]) -> str:
    limit = int(info.get("maxmemory", 0) or 0)
    return _size(limit) if limit else "no limit"


# -- check -------------------------------------------------------------------------------------


def server_identity(info: dict[str, Any]) -> str:
    """Names the server, its version and its mode from its ``INFO``: ``Redis 7.0.15, standalone
    mode`` or ``Valkey 9.1.2, cluster mode``.

    Valkey reports ``redis_version`` as the Redis release it is compatible with (7.2.4) and its
    mode as ``server_mode``; its own name and version are ``server_name`` and ``valkey_version``.
    """
    name = str(info.get("server_name") or "redis")
    version = info.get(f"{name}_version") or info.get("redis_version", "?")
    mode = info.get("redis_mode") or info.get("server_mode") or "standalone"
    return f"{name.capitalize()} {version}, {mode} mode"


@app.command()
def check(
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 on warnings too (for CI and deploy checks).")
    ] = False,
) -> None:
    """Validates the settings and checks Redis: connectivity, version, mode, eviction policy."""
    settings = _load_settings()
    state = "enabled" if settings.CACHE_ENABLED else "DISABLED (CACHE_ENABLED=false)"
    typer.echo(
        f"settings  ok: prefix {settings.CACHE_PREFIX}, "
        f"default ttl {settings.CACHE_TTL_SECONDS}s, caching {state}"
    )
    if settings.REDIS_URL is None:
        typer.echo("redis     not configured (REDIS_URL unset): each process caches in memory")
        return

    async def probe(store: OperatorCommands) -> tuple[float, dict[str, dict[str, Any]], bool]:
        started = time.perf_counter()
        await store.ping()
        elapsed = time.perf_counter() - started
        if store.is_cluster:
            typer.echo("cluster   the node is part of a Redis Cluster: using the cluster client")
        return elapsed, await store.node_infos(), await store.accepts_writes()

    typer.echo(f"redis     {_shown_url(settings.REDIS_URL)}")
    elapsed, infos, writable = _with_store(settings, probe)
    info = next(iter(infos.values()))
    typer.echo(f"server    ok: {server_identity(info)}, PING {elapsed * 1000:.1f} ms")
    warnings = []
    # Every node's: on a cluster one primary left with noeviction refuses its share of fills.
    for node, node_info in infos.items():
        policy = str(node_info.get("maxmemory_policy", "unknown"))
        where = "" if len(infos) == 1 else f" on {node}"
        typer.echo(f"eviction  {policy}, maxmemory {_maxmemory(node_info)}{where}")
        if not policy.startswith("allkeys-"):
            warnings.append(
                f"maxmemory-policy is {policy}{where}, not an allkeys-* policy: a full Redis will "
                "refuse or keep entries instead of evicting the least used (the guide recommends "
                "allkeys-lru)"
            )
    if writable:
        typer.echo("write     ok")
    else:
        warnings.append("Redis refused a write: entries cannot be stored (read-only replica?)")
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    if warnings and strict:
        raise typer.Exit(EXIT_FAILED)


# -- stats -------------------------------------------------------------------------------------


@app.command()
def stats(
    by_tenant: Annotated[
        bool, typer.Option("--by-tenant", help="Also count each namespace's entries per tenant.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Entries per namespace (per tenant with --by-tenant) and memory used, for CACHE_PREFIX."""
    settings = _redis_settings("count")

    async def gather(store: OperatorCommands) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        rows = []
        for namespace in await store.namespaces():
            per_tenant = await store.count_entries(namespace)
            entries = sum(per_tenant.values())
            try:
                sizes = await store.entry_sizes(namespace, MEMORY_SAMPLES) if entries else []
            except BackendRejectedError:  # MEMORY USAGE not allowed for this user
                sizes = []
            estimate = round(sum(sizes) / len(sizes) * entries) if sizes else None
            row: dict[str, Any] = {
                "namespace": namespace,
                "entries": entries,
                "memory_bytes_estimate": estimate,
            }
            if by_tenant:
                row["tenants"] = [
                    {"tenant": tenant, "entries": count}
                    for tenant, count in sorted(
                        per_tenant.items(), key=lambda item: (-item[1], item[0] or "")
                    )
                    if count
                ]
            rows.append(row)
        return rows, await store.node_infos()

    rows, infos = _with_store(settings, gather)
    primaries = _primaries(infos)
    used_memory = sum(int(info.get("used_memory", 0)) for info in primaries)
    policies = sorted({str(info.get("maxmemory_policy")) for info in primaries})
    server = {
        "used_memory": used_memory,
        "maxmemory": sum(int(info.get("maxmemory", 0) or 0) for info in primaries),
        "maxmemory_policy": policies[0] if len(policies) == 1 else ", ".join(policies),
        "primaries": len(primaries),
    }
    if as_json:
        typer.echo(json.dumps({"prefix": settings.CACHE_PREFIX, "namespaces": rows, **server}))
        return
    typer.echo(f"prefix {settings.CACHE_PREFIX} at {_shown_url(settings.REDIS_URL or '')}")

    def tenant_label(tenant: str | None) -> str:
        return "  (no tenant)" if tenant is None else f"  tenant {tenant}"

    labels = [
        "namespace",
        *(row["namespace"] for row in rows),
        *(tenant_label(each["tenant"]) for row in rows for each in row.get("tenants", [])),
    ]
    width = max(len(label) for label in labels) + 2
    typer.echo(f"{'namespace':<{width}}{'entries':>10}  memory (estimated)")
    total_entries, total_bytes = 0, 0
    for row in rows:
        estimate = row["memory_bytes_estimate"]
        memory = _size(estimate) if estimate is not None else "-"
        typer.echo(f"{row['namespace']:<{width}}{row['entries']:>10}  {memory}")
        for tenant in row.get("tenants", []):
            typer.echo(f"{tenant_label(tenant['tenant']):<{width}}{tenant['entries']:>10}")
        total_entries += row["entries"]
        total_bytes += estimate or 0
    typer.echo(f"{'total':<{width}}{total_entries:>10}  {_size(total_bytes)}")
    over = f" over {len(primaries)} primaries" if len(primaries) > 1 else ""
    typer.echo(
        f"server memory{over}: {_size(used_memory)} used, maxmemory {_maxmemory(server)}, "
        f"policy {server['maxmemory_policy']}"
    )


def _primaries(infos: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``INFO`` of the servers that hold the data: a cluster's primaries (its replicas hold
    copies), or the one server."""
    primaries = [info for info in infos.values() if info.get("role") not in ("slave", "replica")]
    return primaries or list(infos.values())


# -- invalidate --------------------------------------------------------------------------------


@app.command()
def invalidate(
    namespace: Annotated[
        str | None,
        typer.Argument(help="The namespace given to @cache(namespace=...); or give --tag."),
    ] = None,
    tag: Annotated[
        list[str] | None,
        typer.Option(
            "--tag",
            help="Invalidate the entries carrying this literal tag, in every namespace, as "
            "invalidate_tags() does (repeatable; instead of a namespace).",
        ),
    ] = None,
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="Only this tenant's entries (and its users').")
    ] = None,
    user: Annotated[
        str | None, typer.Option("--user", help="Only this user's entries (needs --tenant).")
    ] = None,
) -> None:
    """Removes a namespace's entries, as invalidate_namespace() does, and prints how many; or
    with --tag, invalidates the entries carrying a tag, as invalidate_tags() does."""
    if namespace is not None and tag:
        _fail("give a namespace or --tag, not both", EXIT_BAD_SETTINGS)
    if namespace is None and not tag:
        _fail("give a namespace, or --tag", EXIT_BAD_SETTINGS)
    if user is not None and tenant is None:
        _fail(
            "--user needs --tenant (invalidating a user's entries needs the user's tenant_id)",
            EXIT_BAD_SETTINGS,
        )
    settings = _redis_settings("invalidate")
    try:
        if namespace is not None:
            check_namespace(namespace)
        named = [tag_namespace(check_tag(each)) for each in tag or ()] or [namespace or ""]
        targets = [InvalidationTarget(each, tenant, user) for each in dict.fromkeys(named)]
    except ValueError as exc:
        _fail(str(exc), EXIT_BAD_SETTINGS)

    async def apply(store: OperatorCommands) -> tuple[int, list[str] | None]:
        removed = sum([await store.invalidate(target) for target in targets])
        # Nothing removed from a namespace nothing was ever stored in: a mistyped name, perhaps.
        known = await store.namespaces() if namespace is not None and not removed else None
        return removed, known

    removed, known = _with_store(settings, apply)
    scope = f" for tenant {tenant}" if tenant is not None else ""
    scope += f", user {user}" if user is not None else ""
    if tag:
        # Retiring a tag's generation is the whole invalidation: its entries are never read
        # again and expire with their time to live.
        typer.echo(f"invalidated tag {', '.join(dict.fromkeys(tag))}{scope}")
    else:
        typer.echo(f"removed {removed} entries of namespace {namespace}{scope}")
    if known is not None and namespace not in known:
        listed = ", ".join(known) if known else "none"
        typer.echo(
            f"warning: namespace {namespace!r} has no entries under prefix "
            f"{settings.CACHE_PREFIX!r} (namespaces that have some: {listed}): is it spelled as "
            "in @cache(namespace=...)?",
            err=True,
        )


# -- flush -------------------------------------------------------------------------------------


@app.command()
def flush(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count the keys that would be removed; remove none.")
    ] = False,
) -> None:
    """Removes every key of CACHE_PREFIX (SCAN + UNLINK in batches; Redis keeps answering)."""
    settings = _redis_settings("flush")
    prefix, where = settings.CACHE_PREFIX, _shown_url(settings.REDIS_URL or "")
    found = _with_store(settings, lambda store: store.count_keys())
    if dry_run:
        typer.echo(f"would remove {found} keys of prefix {prefix} at {where} (dry run)")
        return
    if found == 0:
        typer.echo(f"nothing to remove: no key of prefix {prefix} at {where}")
        return
    if not yes:
        try:
            confirmed = typer.confirm(f"Remove {found} keys of prefix {prefix} at {where}?")
        except typer.Abort:  # no answer (end of input, Ctrl-C)
            confirmed = False
        if not confirmed:
            _fail("not confirmed: nothing removed (--yes skips the question)")

    with typer.progressbar(length=found, label=f"flushing {prefix}", file=sys.stderr) as bar:

        async def remove(store: OperatorCommands) -> int:
            return await store.flush(on_batch=bar.update)

        removed = _with_store(settings, remove)
    typer.echo(f"removed {removed} keys of prefix {prefix}")


def main() -> None:
    """The ``commons-cache`` console script."""
    app(prog_name="commons-cache")
