"""A small service for tests that run it as several replicas (uvicorn processes) on one Redis.

- ``GET /res``: cached per tenant (namespace ``res``); reads the tenant's version from SQLite,
  then takes ``REPLICA_READ_SECONDS`` (1 s by default) to answer it (a slow query, an upstream
  call).
- ``PUT /res``: bumps the tenant's version, commits, and invalidates the tenant's cached entries
  before answering, as a service does after a write.
- ``GET /items/{item}`` and ``PUT /items/{item}``: the same per tenant and item, the entries
  tagged ``item:{item}`` and ``PUT`` invalidating that tag in the tenant.
- ``GET /health``: answers once the service has started (its lifespan ran).
- ``GET /cache-status``: ``cache_status()``'s backend and kept invalidations.

Configured by the environment: ``REPLICA_DB`` (the SQLite file every replica shares) and the
cache's own variables (``REDIS_URL``, ``CACHE_PREFIX``, ...). The tenant is taken from the
``X-Test-Tenant`` header: tests only, a service takes identity from a verified token.

Serve it with ``python -m uvicorn replica_app:app --app-dir commons/tests --port N``.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Header

from commons.cache import (
    cache,
    cache_status,
    close_cache,
    init_cache,
    invalidate_namespace,
    invalidate_tags,
)
from commons.utilities.context import RequestContextMiddleware, get_tenant_id, set_tenant_id

DB_ENV = "REPLICA_DB"
#: How long a GET takes to compute its answer (``REPLICA_READ_SECONDS``).
READ_SECONDS = float(os.environ.get("REPLICA_READ_SECONDS", "1.0"))


def _connect() -> sqlite3.Connection:
    # Autocommit mode: each statement, or each explicit BEGIN ... COMMIT, is one transaction.
    return sqlite3.connect(os.environ[DB_ENV], timeout=10, isolation_level=None)


def create_table() -> None:
    with _connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS res (tenant TEXT PRIMARY KEY, version INTEGER)")


def read_version(tenant: str) -> int:
    conn = _connect()
    try:
        row = conn.execute("SELECT version FROM res WHERE tenant = ?", (tenant,)).fetchone()
    finally:
        conn.close()
    return 1 if row is None else int(row[0])


def bump_version(tenant: str) -> int:
    conn = _connect()
    try:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("SELECT version FROM res WHERE tenant = ?", (tenant,)).fetchone()
        version = (1 if row is None else int(row[0])) + 1
        conn.execute(
            "INSERT OR REPLACE INTO res (tenant, version) VALUES (?, ?)", (tenant, version)
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    return version


async def bind_tenant(x_test_tenant: Annotated[str | None, Header()] = None) -> None:
    if x_test_tenant is not None:
        set_tenant_id(x_test_tenant)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    create_table()
    await init_cache()
    try:
        yield
    finally:
        await close_cache()


app = FastAPI(lifespan=lifespan, dependencies=[Depends(bind_tenant)])
app.add_middleware(RequestContextMiddleware)


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


@app.get("/cache-status")
async def status() -> dict[str, object]:
    current = cache_status()
    return {"backend": current.backend, "pending_invalidations": current.pending_invalidations}


@app.get("/res")
@cache(namespace="res")
async def get_res() -> dict[str, int]:
    version = read_version(str(get_tenant_id()))
    await asyncio.sleep(READ_SECONDS)
    return {"version": version}


@app.put("/res")
async def put_res() -> dict[str, int]:
    tenant = str(get_tenant_id())
    version = bump_version(tenant)
    await invalidate_namespace("res", tenant_id=tenant)
    return {"version": version}


@app.get("/items/{item}")
@cache(namespace="items", tags=["item:{item}"])
async def get_item(item: str) -> dict[str, int]:
    version = read_version(f"{get_tenant_id()}/{item}")
    await asyncio.sleep(READ_SECONDS)
    return {"version": version}


@app.put("/items/{item}")
async def put_item(item: str) -> dict[str, int]:
    tenant = str(get_tenant_id())
    version = bump_version(f"{tenant}/{item}")
    await invalidate_tags(f"item:{item}", tenant_id=tenant)
    return {"version": version}
