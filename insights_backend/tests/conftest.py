"""Fixtures: insights_backend running with its lifespan, on the in-memory cache or a real Redis.

- ``client``: an httpx client for a fresh service (lifespan running, its own copy of a seeded
  SQLite file) on the backend named by ``backend_name``: tests that use it run on ``memory`` and
  ``redis``. ``memory_client``: the same on the in-memory cache only.
- ``start_service``: starts a service with extra environment, for tests that bring their own Redis.
- ``bearer``: ``bearer(tenant, user, admin=False)`` gives the Authorization header of a valid token.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
from httpx import ASGITransport, AsyncClient

from commons.cache import CacheSettings, cache_settings
from commons.testing.redis_server import RedisServer
from insights_backend.app import create_app
from insights_backend.config import ServiceSettings
from insights_backend.database import open_database
from insights_backend.tokens import Identity, mint_token

TEST_JWT_SECRET = "insights-backend-test-secret-0123456789abcdef"

StartService = Callable[..., AbstractAsyncContextManager[AsyncClient]]
Bearer = Callable[..., dict[str, str]]


@pytest.fixture(scope="session")
def redis_server(cache_redis_server: RedisServer) -> RedisServer:
    """The private redis-server of commons.testing's pytest plugin."""
    return cache_redis_server


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis server of the test's own, for tests that stop or kill it."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture(scope="session")
def seeded_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database file set up by the service once; each test gets its own copy (much faster)."""
    path = tmp_path_factory.mktemp("template") / "insights.db"

    async def set_up() -> None:
        async with open_database(sqlite_url(path)):
            pass

    asyncio.run(set_up())
    return path


@pytest.fixture(autouse=True)
def service_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, seeded_database: Path
) -> Iterator[None]:
    """The service's environment, independent of the shell's: prefix ib-cache, a fresh database."""
    for name in (*CacheSettings.model_fields, *ServiceSettings.model_fields):
        monkeypatch.delenv(name, raising=False)
    database = tmp_path / "insights.db"
    shutil.copyfile(seeded_database, database)
    monkeypatch.setenv("CACHE_PREFIX", "ib-cache")
    monkeypatch.setenv("JWT_SECRET", TEST_JWT_SECRET)
    monkeypatch.setenv("DATABASE_URL", sqlite_url(database))
    cache_settings.cache_clear()
    yield
    cache_settings.cache_clear()


@pytest.fixture
def start_service(monkeypatch: pytest.MonkeyPatch) -> StartService:
    """``async with start_service(REDIS_URL=...) as client``: the service with that environment."""

    @asynccontextmanager
    async def start(**env: str) -> AsyncIterator[AsyncClient]:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        cache_settings.cache_clear()
        app = create_app()
        async with (
            app.router.lifespan_context(app),
            AsyncClient(transport=ASGITransport(app), base_url="http://testserver") as client,
        ):
            yield client

    return start


@pytest.fixture(params=["memory", "redis"])
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def client(
    backend_name: str, start_service: StartService, request: pytest.FixtureRequest
) -> AsyncIterator[AsyncClient]:
    """The service on the parametrized backend; Redis is emptied first."""
    env: dict[str, str] = {}
    if backend_name == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.command("FLUSHALL")
        env["REDIS_URL"] = server.url
    async with start_service(**env) as service_client:
        yield service_client


@pytest.fixture
async def memory_client(start_service: StartService) -> AsyncIterator[AsyncClient]:
    """The service on the in-memory cache, for behaviour that does not depend on the backend."""
    async with start_service() as service_client:
        yield service_client


@pytest.fixture
def bearer() -> Bearer:
    """``bearer(tenant_id, username, admin=False)``: headers carrying a valid token."""

    def headers(tenant_id: int, username: str, *, admin: bool = False) -> dict[str, str]:
        token = mint_token(Identity(tenant_id, username, is_admin=admin), TEST_JWT_SECRET)
        return {"Authorization": f"Bearer {token}"}

    return headers
