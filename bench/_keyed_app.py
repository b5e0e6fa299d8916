"""The app of the traffic benchmarks (``mixed``, ``working_set``): a route per variant, many keys.

``/{variant}/{tenant}/{item}``: every tenant and item is a key of its own, as in a service whose
resources are read by id. The variants, each a FastAPI app of its own picked by the path's first
segment (so none pays for matching another's route):

- ``floor``: pre-serialised bytes returned as ``Response`` (the floor no cache can beat);
- ``redis_get``: the floor's bytes after one redis-py ``GET`` of the key ours stores the same
  item under (``entry_key_of``): what any answer that asks Redis once pays, the reference for a
  hit that the near cache does not hold;
- ``nocache``: the handler builds the response, FastAPI validates and serialises it;
- ``ours``: the same handler under ``commons.cache.cache`` (namespace ``wild``);
- ``cashews``: the same handler under cashews' ``@cache``, ``client_side=True`` beside our near
  cache (its plain Redis backend beside ours without it).

Every route binds the path's tenant in an async dependency, as a service's auth would. The body
is the same ~0.9 KB JSON object for every key (``_apps.build_small``), so a benchmark may copy one
stored entry to other keys of its tenant instead of filling each through HTTP
(``working_set``). ``/metrics`` serves our Prometheus series (which hits the near cache answered).

Serve it with ``python -c 'from bench._keyed_app import serve; serve()' --redis-url URL --port N
[--near-off] [--freeze]``; ``--freeze`` ends start-up with ``gc.collect(); gc.freeze()``, as the
example service does.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.responses import Response

from bench._apps import PRESERIALISED, TTL, TenantConfig, build_small, run_uvicorn
from commons.utilities.context import set_tenant_id

#: Our decorator's namespace (what the near-cache share is read under in ``/metrics``).
NAMESPACE = "wild"
VARIANTS = ("floor", "redis_get", "nocache", "ours", "cashews")
#: Our ``CACHE_PREFIX`` here.
PREFIX = "bench"
#: The digest of an empty query string, the last part of every key here.
EMPTY_QUERY_DIGEST = "d41d8cd98f00b204e9800998ecf8427e"


def entry_key_of(tenant: str, item: str) -> str:
    """The key ours stores ``/ours/{tenant}/{item}`` under: spelled out, so that ``redis_get``
    pays for one ``GET`` and nothing of ours (``create_app`` checks it against the key
    builder's)."""
    return f"{PREFIX}:{NAMESPACE}:tenant_{tenant}:/ours/{tenant}/{item}:{EMPTY_QUERY_DIGEST}"


def _check_entry_key_of() -> None:
    from commons.cache.keys import key_path
    from commons.cache.keyspace import entry_key, qualified_namespace

    built = entry_key(
        qualified_namespace(PREFIX, NAMESPACE),
        "t0",
        None,
        key_path("/ours/t0/0"),
        EMPTY_QUERY_DIGEST,
    )
    if entry_key_of("t0", "0") != built:
        raise RuntimeError(f"entry_key_of no longer spells our keys: {built!r}")


async def bind_tenant(tenant: str) -> str:
    """The path's tenant, bound the way a service's auth dependency binds it."""
    set_tenant_id(tenant)
    return tenant


class KeyedApp:
    """The variants' apps behind one ASGI entry point that picks them by the first segment."""

    def __init__(self, main: FastAPI, by_variant: dict[str, FastAPI]) -> None:
        self.main = main
        self.by_variant = by_variant
        self.router = main.router

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        app = None
        if scope["type"] == "http":
            app = self.by_variant.get(scope["path"].split("/", 2)[1])
        await (app or self.main)(scope, receive, send)


def create_app(redis_url: str, *, near: bool = True, freeze: bool = False) -> KeyedApp:
    """The app, on Redis at ``redis_url``; ``near``: our near cache (and cashews' client side)."""
    from cashews import cache as cashews_cache
    from fastapi import Depends
    from redis.asyncio import Redis

    from commons.cache import cache, close_cache, init_cache
    from commons.cache.metrics import metrics_router
    from commons.cache.settings import CacheSettings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await init_cache(
            CacheSettings(
                REDIS_URL=redis_url,
                CACHE_PREFIX=PREFIX,
                CACHE_TTL_SECONDS=TTL,
                CACHE_NEAR_CACHE=near,
            )
        )
        cashews_cache.setup(redis_url, client_side=near)
        if freeze:
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            await cashews_cache.close()
            await close_cache()
            await plain_redis.aclose()

    _check_entry_key_of()
    plain_redis = Redis.from_url(redis_url)
    main = FastAPI(lifespan=lifespan)
    main.include_router(metrics_router())
    tenant_dep = Depends(bind_tenant)
    body = PRESERIALISED["small"]

    async def floor(tenant: str = tenant_dep, item: str = "") -> Response:
        return Response(content=body, media_type="application/json")

    async def redis_get(tenant: str = tenant_dep, item: str = "") -> Response:
        if await plain_redis.get(entry_key_of(tenant, item)) is None:
            # A GET that found nothing costs less than one that reads an entry: a failed request,
            # so that no benchmark measures it unawares.
            return Response(status_code=503)
        return Response(content=body, media_type="application/json")

    def handler() -> Any:
        async def endpoint(item: str, tenant: str = tenant_dep) -> TenantConfig:
            return build_small()

        return endpoint

    endpoints = {
        "floor": floor,
        "redis_get": redis_get,
        "nocache": handler(),
        "ours": cache(expire=TTL, namespace=NAMESPACE)(handler()),
        "cashews": cashews_cache(ttl=TTL, key="cashews:wild:{tenant}:{item}")(handler()),
    }
    by_variant: dict[str, FastAPI] = {}
    for name, endpoint in endpoints.items():
        variant_app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        model = None if name in ("floor", "redis_get") else TenantConfig
        variant_app.add_api_route(
            f"/{name}/{{tenant}}/{{item}}", endpoint, methods=["GET"], response_model=model
        )
        by_variant[name] = variant_app
    return KeyedApp(main, by_variant)


def serve() -> None:
    """Runs the app under uvicorn, one worker (httptools and uvloop when installed)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--near-off", action="store_true")
    parser.add_argument("--freeze", action="store_true")
    args = parser.parse_args()
    run_uvicorn(create_app(args.redis_url, near=not args.near_off, freeze=args.freeze), args.port)
