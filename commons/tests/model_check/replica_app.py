"""One replica of the service the model check drives: a uvicorn process on a shared Redis.

Run as ``python replica_app.py PORT`` with the environment giving ``REDIS_URL``, ``CACHE_PREFIX``,
the cache's (small) timeouts, ``MODEL_CHECK_DB`` (the SQLite file all replicas share) and
``MODEL_CHECK_REPLICA`` (a name echoed in every computed body). The process exits by itself when
the process that started it goes away.

The data is a version number per (tenant, resource) and per (tenant, user, resource); a missing
row is version 0. Every answer echoes the identity it was computed for and the version it read, so
the driver can check it against its model of the truth:

- ``GET /t/{rid}``: ``@cache(namespace="res")``, tenant-scoped;
- ``GET /u/{rid}``: ``@cache(namespace="ures", key_builder=tenant_user_cache_key_builder)``;
- ``GET /g/{rid}``: fastapi-cache2's own decorator (namespace ``gres``), the ``/t`` data, a
  pydantic response model;
- ``GET /s/{rid}``: ``@cache(namespace="sres", expire=1, stale_ttl=30)``, the ``/t`` data;
- ``GET /k/{rid}``: ``@cache(namespace="kres", tags=["item:{rid}"])``, the ``/t`` data;
- ``GET /d/{rid}``: ``@cache(namespace="dres")`` tagged by a function ``item:{tenant}:{rid}`` (a
  tag of the tenant's item in every tenant's scope), the ``/t`` data;
- ``GET /v/{rid}``: ``@cache(namespace="vres", key_builder=tenant_user_cache_key_builder,
  tags=["item:{rid}"])``, the ``/u`` data;
- ``PUT /t/{rid}``: bumps the tenant's version, then invalidates ``res``, ``gres`` and ``sres`` for
  the tenant, the tag ``item:{rid}`` in the tenant and the tag ``item:{tenant}:{rid}`` in every
  tenant (``/k`` and ``/d`` are reached by these tags only); ``PUT /u/{rid}``: bumps the user's
  version, then invalidates ``ures`` and the tag ``item:{rid}`` for the user;
- ``GET /_status``: ``cache_status()`` and the state changes seen so far (never cached).

A cached handler reads the version, then sleeps ``X-Delay-Ms`` milliseconds (a header, so that the
delay is no part of the cache key): a computation that read an old version is still running when
an update lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header
from fastapi_cache.decorator import cache as fc2_cache
from pydantic import BaseModel

from commons.cache import (
    CacheEvents,
    cache,
    cache_status,
    close_cache,
    init_cache,
    invalidate_namespace,
    invalidate_tags,
    tenant_cache_key_builder,
    tenant_user_cache_key_builder,
)
from commons.utilities.context import (
    RequestContextMiddleware,
    get_tenant_id,
    get_user_id,
    set_tenant_id,
    set_user_id,
)

REPLICA = os.environ.get("MODEL_CHECK_REPLICA", "?")
DB_PATH = os.environ.get("MODEL_CHECK_DB", "")
#: Namespaces whose entries hold a tenant's (tenant, rid) data; a tenant PUT invalidates them all.
TENANT_NAMESPACES = ("res", "gres", "sres")
USER_NAMESPACE = "ures"

_db: sqlite3.Connection | None = None


def db() -> sqlite3.Connection:
    global _db
    if _db is None:
        _db = sqlite3.connect(DB_PATH, timeout=10, isolation_level=None, check_same_thread=False)
        _db.execute("PRAGMA busy_timeout = 10000")
    return _db


def read_tenant_version(tenant: str, rid: str) -> int:
    row = (
        db()
        .execute("SELECT version FROM tenant_items WHERE tenant = ? AND rid = ?", (tenant, rid))
        .fetchone()
    )
    return int(row[0]) if row else 0


def read_user_version(tenant: str, user: str, rid: str) -> int:
    row = (
        db()
        .execute(
            "SELECT version FROM user_items WHERE tenant = ? AND user = ? AND rid = ?",
            (tenant, user, rid),
        )
        .fetchone()
    )
    return int(row[0]) if row else 0


def bump(table: str, keys: dict[str, str]) -> int:
    """Adds one to a version and commits; returns the new version."""
    columns = ", ".join(keys)
    marks = ", ".join("?" for _ in keys)
    conn = db()
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            f"INSERT INTO {table} ({columns}, version) VALUES ({marks}, 1) "
            f"ON CONFLICT ({columns}) DO UPDATE SET version = version + 1",
            tuple(keys.values()),
        )
        where = " AND ".join(f"{name} = ?" for name in keys)
        row = conn.execute(
            f"SELECT version FROM {table} WHERE {where}",
            tuple(keys.values()),
        ).fetchone()
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return int(row[0])


class StateLog(CacheEvents):
    """Remembers every state change with its wall-clock time (read by the driver)."""

    def __init__(self) -> None:
        self.changes: list[tuple[float, str]] = []
        #: Why each change happened, as the status said just after it (for failure messages).
        self.reasons: list[tuple[float, str]] = []

    def state_changed(self, state: str) -> None:
        now = time.time()
        self.changes.append((now, state))
        try:
            asyncio.get_running_loop().call_soon(self._note_reason, now)
        except RuntimeError:  # not on the event loop's thread: the status now is close enough
            self._note_reason(now)

    def _note_reason(self, at: float) -> None:
        self.reasons.append((at, cache_status().reason))


_states = StateLog()


async def _exit_when_orphaned() -> None:
    """Stops this process when the driver that started it is gone (nothing outlives a run)."""
    parent = os.getppid()
    while True:
        await asyncio.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    watchdog = asyncio.create_task(_exit_when_orphaned())
    await init_cache(events=_states)
    try:
        yield
    finally:
        await close_cache()
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog


async def bind_identity(
    x_tenant: Annotated[str | None, Header()] = None,
    x_user: Annotated[str | None, Header()] = None,
) -> None:
    # A test service: the identity comes from plain headers, as in the suite's identity app.
    if x_tenant is not None:
        set_tenant_id(x_tenant)
    if x_user is not None:
        set_user_id(x_user)


app = FastAPI(lifespan=lifespan, dependencies=[Depends(bind_identity)])
app.add_middleware(RequestContextMiddleware)


class TenantItem(BaseModel):
    tenant: str | None
    rid: str
    q: str | None
    version: int
    by: str


async def _pause(delay_ms: int) -> None:
    if delay_ms > 0:
        await asyncio.sleep(min(delay_ms, 1000) / 1000)


def _tenant_body(rid: str, q: str | None) -> dict[str, Any]:
    tenant = get_tenant_id()
    version = read_tenant_version(tenant or "", rid)
    return {"tenant": tenant, "rid": rid, "q": q, "version": version, "by": REPLICA}


def _user_body(rid: str, q: str | None) -> dict[str, Any]:
    tenant, user = get_tenant_id(), get_user_id()
    version = read_user_version(tenant or "", user or "", rid)
    return {"tenant": tenant, "user": user, "rid": rid, "q": q, "version": version, "by": REPLICA}


@app.get("/t/{rid}")
@cache(namespace="res")
async def get_tenant_item(
    rid: str, q: str | None = None, x_delay_ms: Annotated[int, Header()] = 0
) -> dict[str, Any]:
    body = _tenant_body(rid, q)
    await _pause(x_delay_ms)
    return body


@app.get("/u/{rid}")
@cache(namespace=USER_NAMESPACE, key_builder=tenant_user_cache_key_builder)
async def get_user_item(
    rid: str, q: str | None = None, x_delay_ms: Annotated[int, Header()] = 0
) -> dict[str, Any]:
    body = _user_body(rid, q)
    await _pause(x_delay_ms)
    return body


@app.get("/g/{rid}", response_model=TenantItem)
@fc2_cache(namespace="gres", key_builder=tenant_cache_key_builder)
async def get_tenant_item_fc2(
    rid: str, q: str | None = None, x_delay_ms: Annotated[int, Header()] = 0
) -> TenantItem:
    body = _tenant_body(rid, q)
    await _pause(x_delay_ms)
    return TenantItem(**body)


@app.get("/s/{rid}")
@cache(namespace="sres", expire=1, stale_ttl=30)
async def get_tenant_item_swr(
    rid: str, q: str | None = None, x_delay_ms: Annotated[int, Header()] = 0
) -> dict[str, Any]:
    body = _tenant_body(rid, q)
    await _pause(x_delay_ms)
    return body


@app.get("/k/{rid}")
@cache(namespace="kres", tags=["item:{rid}"])
async def get_tagged_tenant_item(
    rid: str, q: str | None = None, x_delay_ms: Annotated[int, Header()] = 0
) -> dict[str, Any]:
    body = _tenant_body(rid, q)
    await _pause(x_delay_ms)
    return body


def tenants_item_tag(rid: object) -> str:
    """The tag of a tenant's item that names the tenant itself (invalidated in every tenant)."""
    return f"item:{get_tenant_id()}:{rid}"


@app.get("/d/{rid}")
@cache(namespace="dres", tags=lambda kwargs: [tenants_item_tag(kwargs["rid"])])
async def get_tenant_item_tagged_by_function(
    rid: str, q: str | None = None, x_delay_ms: Annotated[int, Header()] = 0
) -> dict[str, Any]:
    body = _tenant_body(rid, q)
    await _pause(x_delay_ms)
    return body


@app.put("/t/{rid}")
async def put_tenant_item(rid: str) -> dict[str, Any]:
    tenant = get_tenant_id()
    assert tenant is not None
    version = bump("tenant_items", {"tenant": tenant, "rid": rid})
    for namespace in TENANT_NAMESPACES:
        await invalidate_namespace(namespace, tenant_id=tenant)
    await invalidate_tags(f"item:{rid}", tenant_id=tenant)
    await invalidate_tags(tenants_item_tag(rid))
    return {"version": version, "by": REPLICA}


@app.get("/v/{rid}")
@cache(namespace="vres", key_builder=tenant_user_cache_key_builder, tags=["item:{rid}"])
async def get_tagged_user_item(
    rid: str, q: str | None = None, x_delay_ms: Annotated[int, Header()] = 0
) -> dict[str, Any]:
    body = _user_body(rid, q)
    await _pause(x_delay_ms)
    return body


@app.put("/u/{rid}")
async def put_user_item(rid: str) -> dict[str, Any]:
    tenant, user = get_tenant_id(), get_user_id()
    assert tenant is not None
    assert user is not None
    version = bump("user_items", {"tenant": tenant, "user": user, "rid": rid})
    await invalidate_namespace(USER_NAMESPACE, tenant_id=tenant, user_id=user)
    await invalidate_tags(f"item:{rid}", tenant_id=tenant, user_id=user)
    return {"version": version, "by": REPLICA}


@app.get("/_status")
async def status() -> dict[str, Any]:
    current = cache_status()
    return {
        "backend": current.backend,
        "reason": current.reason,
        "since": current.since.timestamp(),
        "pending_invalidations": current.pending_invalidations,
        "memory_entries": current.memory_entries,
        "changes": _states.changes,
        "reasons": _states.reasons,
    }


def main() -> None:
    import uvicorn

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
