"""The FastAPI app the HTTP benchmarks measure, in-process or served by uvicorn.

One ASGI app serves every variant side by side, so each is measured under the same server, event
loop and process; each variant route is a FastAPI app of its own, picked by exact path, so none
pays for matching the routes registered before it (:class:`BenchApp`):

- ``/floor/{size}``: pre-serialised bytes returned as ``Response`` (the floor no cache can beat);
- ``/nocache/{size}``: the handler builds the response, FastAPI validates and serialises it;
- ``/ours/{size}``: ``commons.cache.cache``;
- ``/fc2/{size}``: fastapi-cache2's stock decorator and backend (``InMemoryBackend`` or
  ``RedisBackend``), keyed per tenant with our key builder;
- ``/cashews/{size}``: cashews' ``@cache`` (``mem://`` or ``redis://``; on ``redis`` with
  ``client_side=True``, its near cache, and without on ``redis-near-off``), keyed per tenant.

``size`` is ``small`` (~0.9 KB JSON object) or ``large`` (a list of 200 pydantic items, ~20 KB).
Every route binds the same fixed tenant in an async dependency, as a service's auth would.
``/stampede/...`` routes sleep 100 ms and count their calls (``/calls``) for the stampede benchmark.
``/metrics`` serves our Prometheus series (what the HIT benchmark's hits were: near-cache or Redis).

Serve it with ``python -c 'from bench._apps import serve; serve()' --backend memory --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from fastapi import Depends, FastAPI
from pydantic import BaseModel
from starlette.responses import Response

from commons.utilities.context import set_tenant_id

TENANT = "acme"
TTL = 3600
STAMPEDE_DELAY = 0.1


class Limits(BaseModel):
    requests_per_minute: int
    max_users: int
    max_dashboards: int
    storage_gb: int


class TenantConfig(BaseModel):
    tenant_id: str
    name: str
    plan: str
    region: str
    created_at: datetime
    features: list[str]
    limits: Limits
    locale: str
    timezone: str
    theme: dict[str, str]
    contacts: list[str]
    notes: str


class Insight(BaseModel):
    id: int
    title: str
    score: float
    category: str
    tags: list[str]
    created_at: datetime


_CREATED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def build_small() -> TenantConfig:
    return TenantConfig(
        tenant_id=TENANT,
        name="Acme Corporation International",
        plan="enterprise",
        region="eu-west-1",
        created_at=_CREATED,
        features=[f"feature_{i:02d}_enabled" for i in range(14)],
        limits=Limits(requests_per_minute=6000, max_users=250, max_dashboards=40, storage_gb=500),
        locale="en-GB",
        timezone="Europe/London",
        theme={"primary": "#123456", "secondary": "#abcdef", "accent": "#ff8800", "mode": "dark"},
        contacts=["ops@acme.example", "billing@acme.example", "security@acme.example"],
        notes="Quarterly review scheduled; dashboards migrated to the new layout last month. "
        "Escalations go to the on-call rota first, then the account manager.",
    )


def build_large() -> list[Insight]:
    return [
        Insight(
            id=i,
            title=f"Insight {i}",
            score=i * 0.37,
            category=("growth", "retention", "revenue", "risk")[i % 4],
            tags=[f"s{i % 17}"],
            created_at=_CREATED,
        )
        for i in range(200)
    ]


BUILDERS: dict[str, Callable[[], Any]] = {"small": build_small, "large": build_large}
PRESERIALISED = {
    "small": build_small().model_dump_json().encode(),
    "large": ("[" + ",".join(item.model_dump_json() for item in build_large()) + "]").encode(),
}
VARIANTS = ("floor", "nocache", "ours", "fc2", "cashews")


async def bind_tenant() -> str:
    """The fixed identity, bound the way a service's auth dependency binds it."""
    set_tenant_id(TENANT)
    return TENANT


class BenchApp:
    """The variants' apps behind one ASGI entry point that picks them by exact path.

    Each variant (and size) is a FastAPI app of its own with that one route, so every variant
    pays the same routing cost: in one app, Starlette tries routes in order and a route
    registered later would pay for matching the earlier ones. ``main`` holds the lifespan and
    everything else (the stampede routes, ``/calls``).
    """

    def __init__(self, main: FastAPI, by_path: dict[str, FastAPI]) -> None:
        self.main = main
        self.by_path = by_path
        self.router = main.router  # ``app.router.lifespan_context(app)`` runs main's lifespan

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        app = self.by_path.get(scope["path"]) if scope["type"] == "http" else None
        await (app or self.main)(scope, receive, send)


#: The ``redis`` backend with our near cache off (``CACHE_NEAR_CACHE=false``).
REDIS_NEAR_OFF = "redis-near-off"


def create_app(backend: str = "memory", redis_url: str | None = None) -> BenchApp:
    """The benchmark app; ``backend`` is ``memory`` or ``redis`` for all three caches (or
    :data:`REDIS_NEAR_OFF`: ``redis`` with our near cache off)."""
    from cashews import cache as cashews_cache
    from fastapi_cache import FastAPICache
    from fastapi_cache.backends.inmemory import InMemoryBackend
    from fastapi_cache.backends.redis import RedisBackend
    from fastapi_cache.decorator import cache as fc2_cache
    from redis.asyncio import Redis

    from commons.cache import cache, close_cache, init_cache, tenant_cache_key_builder
    from commons.cache.settings import CacheSettings

    if backend not in ("memory", "redis", REDIS_NEAR_OFF) or (
        backend != "memory" and not redis_url
    ):
        raise ValueError(f"backend {backend!r} needs redis_url for redis")
    calls: Counter[str] = Counter()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = redis_url if backend != "memory" else None
        near = backend != REDIS_NEAR_OFF
        await init_cache(
            CacheSettings(
                REDIS_URL=url, CACHE_PREFIX="bench", CACHE_TTL_SECONDS=TTL, CACHE_NEAR_CACHE=near
            )
        )
        # init_cache points fastapi-cache2 at our layer; the reference gets its stock backend.
        FastAPICache.reset()
        client = Redis.from_url(redis_url) if url else None
        FastAPICache.init(
            RedisBackend(client) if client is not None else InMemoryBackend(), prefix="fc2"
        )
        if url is None:
            cashews_cache.setup("mem://")
        else:
            # Beside our near cache, cashews' own client-side cache; beside ours without it,
            # cashews' plain Redis backend.
            cashews_cache.setup(url, client_side=near)
        try:
            yield
        finally:
            await cashews_cache.close()
            FastAPICache.reset()
            if client is not None:
                await client.aclose()
            await close_cache()

    app = FastAPI(lifespan=lifespan)
    tenant_dep = Depends(bind_tenant)

    def handlers(size: str, build: Callable[[], Any], model: Any) -> dict[str, Any]:
        """The five variants for one size (a factory, so each closes over its own size)."""
        body = PRESERIALISED[size]

        async def floor(tenant: str = tenant_dep) -> Response:
            return Response(content=body, media_type="application/json")

        def handler() -> Callable[..., Any]:
            async def endpoint(tenant: str = tenant_dep) -> Any:
                return build()

            endpoint.__annotations__["return"] = model
            return endpoint

        namespace = f"hit{size}"
        return {
            "floor": floor,
            "nocache": handler(),
            "ours": cache(expire=TTL, namespace=namespace)(handler()),
            "fc2": fc2_cache(expire=TTL, namespace=namespace, key_builder=tenant_cache_key_builder)(
                handler()
            ),
            "cashews": cashews_cache(ttl=TTL, key=f"cashews:{namespace}:{{tenant}}")(handler()),
        }

    by_path: dict[str, FastAPI] = {}
    for size, build in BUILDERS.items():
        model: Any = TenantConfig if size == "small" else list[Insight]
        for name, endpoint in handlers(size, build, model).items():
            variant_app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
            path = f"/{name}/{size}"
            if name == "floor":
                variant_app.add_api_route(path, endpoint, methods=["GET"])
            else:
                variant_app.add_api_route(path, endpoint, methods=["GET"], response_model=model)
            by_path[path] = variant_app

    async def slow() -> TenantConfig:
        await asyncio.sleep(STAMPEDE_DELAY)
        return build_small()

    @app.get("/stampede/ours/{k}")
    @cache(expire=TTL, namespace="stampede")
    async def stampede_ours(k: str, tenant: str = tenant_dep) -> TenantConfig:
        calls["ours"] += 1
        return await slow()

    @app.get("/stampede/ours_lock/{k}")
    @cache(expire=TTL, namespace="stampedelock", distributed_lock=True)
    async def stampede_ours_lock(k: str, tenant: str = tenant_dep) -> TenantConfig:
        calls["ours_lock"] += 1
        return await slow()

    @app.get("/stampede/fc2/{k}")
    @fc2_cache(expire=TTL, namespace="stampede", key_builder=tenant_cache_key_builder)
    async def stampede_fc2(k: str, tenant: str = tenant_dep) -> TenantConfig:
        calls["fc2"] += 1
        return await slow()

    @app.get("/calls")
    async def get_calls() -> Response:
        return Response(json.dumps(dict(calls)), media_type="application/json")

    @app.get("/metrics")
    async def metrics() -> Response:
        """Our counters (hits, near-cache hits): the HIT benchmark checks what its hits were."""
        from prometheus_client import REGISTRY, generate_latest

        return Response(generate_latest(REGISTRY), media_type="text/plain")

    return BenchApp(app, by_path)


def serve() -> None:
    """Runs the app under uvicorn, one worker (httptools and uvloop when installed)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="memory")
    parser.add_argument("--redis-url")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    run_uvicorn(create_app(args.backend, args.redis_url), args.port)


def run_uvicorn(app: Any, port: int) -> None:
    """Serves ``app`` on 127.0.0.1:``port``, one worker (httptools and uvloop when installed)."""
    import uvicorn

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        workers=1,
        log_level="warning",
        access_log=False,
        http=http_impl(),
        loop=loop_impl(),
    )


def http_impl() -> str:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


def loop_impl() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"
