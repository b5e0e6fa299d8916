"""The ``commons-cache`` CLI, run as an operator runs it: a process configured by the environment.

Most tests go through typer's ``CliRunner`` (in-process, fast); the ones about what a shell sees
(exit status, one line on stderr, no traceback, the installed script) run a real subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner, Result

from commons.cache.backends.redis import RedisStore
from commons.cache.backends.redis.connection import cluster_client_factory, create_redis_client
from commons.cache.cli import app
from commons.cache.scope import CacheScope
from commons.cache.settings import CacheSettings
from commons.testing.redis_cluster import LocalRedisCluster
from commons.testing.redis_server import (
    RedisServer,
    find_redis_server,
    free_port,
    server_name_and_version,
)

PREFIX = "svc-a"


def cli_env(redis_url: str | None, **overrides: str) -> dict[str, str]:
    env = {"CACHE_PREFIX": PREFIX, **overrides}
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    return env


def invoke(redis_url: str | None, *args: str, input: str | None = None, **env: str) -> Result:
    return CliRunner().invoke(app, list(args), input=input, env=cli_env(redis_url, **env))


def run_cli(redis_url: str | None, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m commons.cache ARGS`` in a process of its own, stdin closed."""
    environ = {k: v for k, v in os.environ.items() if k not in CacheSettings.model_fields}
    return subprocess.run(
        [sys.executable, "-m", "commons.cache", *args],
        env={**environ, **cli_env(redis_url, **env)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


def store_entries(redis_url: str, prefix: str, entries: list[tuple[str, CacheScope]]) -> None:
    """Writes entries as a service does: each key recorded in its scope's index."""

    async def write() -> None:
        settings = CacheSettings(REDIS_URL=redis_url, CACHE_PREFIX=prefix)
        store = RedisStore(
            create_redis_client(settings),
            prefix,
            cluster_factory=cluster_client_factory(settings),
        )
        try:
            await store.ping()
            for key, scope in entries:
                await store.set(f"{prefix}:{key}", b"{}", 60, scope)
        finally:
            await store.aclose()

    asyncio.run(write())


def keys(server: RedisServer) -> set[bytes]:
    with redis.Redis.from_url(server.url) as client:
        return set(client.scan_iter(count=1000))


@pytest.fixture
def reports(redis_url: str) -> str:
    """svc-a: reports for tenants t1 (3) and t2 (1, plus 1 of user u1), users for t1 (1);
    svc-b: 4 reports of its own."""
    store_entries(
        redis_url,
        PREFIX,
        [
            *((f"reports:tenant_t1:/r:{i}", CacheScope("reports", "t1")) for i in range(3)),
            ("reports:tenant_t2:/r:0", CacheScope("reports", "t2")),
            ("reports:tenant_t2:user_u1:/r:0", CacheScope("reports", "t2", "u1")),
            ("users:tenant_t1:/u:0", CacheScope("users", "t1")),
        ],
    )
    store_entries(
        redis_url,
        "svc-b",
        [(f"reports:tenant_t1:/r:{i}", CacheScope("reports", "t1")) for i in range(4)],
    )
    return redis_url


def stats_json(redis_url: str) -> dict[str, dict[str, object]]:
    result = invoke(redis_url, "stats", "--json", "--by-tenant")
    assert result.exit_code == 0, result.output
    return {row["namespace"]: row for row in json.loads(result.stdout)["namespaces"]}


# -- check -------------------------------------------------------------------------------------


def test_check_names_each_server_its_version_and_its_mode(each_server: RedisServer) -> None:
    # Valkey reports redis_version 7.2.4 (the Redis it is compatible with) and server_mode, not
    # redis_mode: the check names what runs.
    result = invoke(each_server.url, "check")

    assert result.exit_code == 0, result.output
    server = server_name_and_version(each_server.binary or find_redis_server())
    assert f"server    ok: {server}, standalone mode" in result.stdout


def test_check_reports_version_mode_and_warns_about_an_eviction_policy_that_is_not_allkeys(
    redis_url: str,
) -> None:
    result = invoke(redis_url, "check")

    assert result.exit_code == 0, result.output
    server = server_name_and_version(find_redis_server())  # Redis 6.2, 7.x or Valkey
    assert f"server    ok: {server}, standalone mode" in result.stdout
    assert "noeviction" in result.stdout
    assert "write     ok" in result.stdout
    assert result.stderr.startswith("warning: maxmemory-policy is noeviction")
    assert "allkeys-lru" in result.stderr


def test_check_accepts_allkeys_lru_without_warning_and_strict_fails_on_warnings(
    own_redis: RedisServer,
) -> None:
    strict_noeviction = invoke(own_redis.url, "check", "--strict")
    own_redis.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    strict_lru = invoke(own_redis.url, "check", "--strict")

    assert strict_noeviction.exit_code == 1
    assert strict_lru.exit_code == 0
    assert "allkeys-lru" in strict_lru.stdout
    assert strict_lru.stderr == ""


def test_check_without_redis_url_reports_the_in_memory_backend() -> None:
    result = invoke(None, "check")

    assert result.exit_code == 0
    assert "REDIS_URL unset" in result.stdout


def test_a_bad_setting_in_a_shell_is_one_line_naming_the_variable_and_exit_2() -> None:
    result = run_cli(None, "check", CACHE_TTL_SECONDS="-1")

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "error: invalid cache settings: CACHE_TTL_SECONDS: "
        "Input should be greater than or equal to 1 (got '-1')\n"
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CACHE_PREFIX", "two words"),
        ("CACHE_ENABLED", "maybe"),
        ("REDIS_URL", "http://admin:s3cret@cache.internal:6379"),
        ("REDIS_SOCKET_TIMEOUT_SECONDS", "0"),
    ],
)
@pytest.mark.parametrize("command", ["check", "stats", "flush"])
def test_every_command_refuses_a_bad_setting_in_one_line_naming_the_variable(
    command: str, variable: str, value: str
) -> None:
    result = invoke(None, command, **{variable: value})

    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: invalid cache settings: ")
    assert variable in result.stderr
    assert "s3cret" not in result.stderr


def test_an_unreachable_redis_is_one_line_and_exit_1() -> None:
    result = run_cli(f"redis://127.0.0.1:{free_port()}/0", "stats")

    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: Redis at redis://127.0.0.1:")
    assert "Traceback" not in result.stderr


def test_a_redis_that_does_not_answer_fails_within_the_configured_timeouts(
    own_redis: RedisServer,
) -> None:
    own_redis.pause()
    try:
        result = run_cli(
            own_redis.url,
            "check",
            REDIS_CONNECT_TIMEOUT_SECONDS="0.2",
            REDIS_SOCKET_TIMEOUT_SECONDS="0.2",
        )
    finally:
        own_redis.resume()

    assert result.returncode == 1
    assert result.stderr == f"error: Redis at {own_redis.url}: Redis did not answer in time\n"


def test_the_password_in_redis_url_is_never_printed(own_redis: RedisServer) -> None:
    own_redis.command("CONFIG", "SET", "requirepass", "s3cret")
    url = own_redis.url.replace("redis://", "redis://:s3cret@")

    result = invoke(url, "check")

    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output
    assert "redis://:***@127.0.0.1" in result.stdout


@pytest.mark.parametrize(
    "env",
    [
        {"REDIS_TLS_CA_FILE": __file__},  # a check across fields: given the whole settings
        {"REDIS_SENTINELS": "127.0.0.1:26379"},
        {"REDIS_SOCKET_TIMEOUT_SECONDS": "-1"},
    ],
    ids=["tls-without-rediss", "sentinels-without-master", "another-field"],
)
def test_the_password_in_redis_url_is_never_printed_when_the_settings_are_refused(
    env: dict[str, str],
) -> None:
    result = invoke("redis://:s3cret@127.0.0.1:1/0", "check", **env)

    assert result.exit_code == 2
    assert result.stderr.startswith("error: invalid cache settings: ")
    assert "s3cret" not in result.output


# -- stats -------------------------------------------------------------------------------------


def test_stats_counts_entries_per_namespace_and_tenant_of_its_prefix_only(reports: str) -> None:
    namespaces = stats_json(reports)

    assert set(namespaces) == {"reports", "users"}
    assert namespaces["reports"]["entries"] == 5  # svc-b's 4 reports are not counted
    assert namespaces["users"]["entries"] == 1
    assert namespaces["reports"]["tenants"] == [
        {"tenant": "t1", "entries": 3},
        {"tenant": "t2", "entries": 2},
    ]
    memory = namespaces["reports"]["memory_bytes_estimate"]
    assert isinstance(memory, int)
    assert memory > 0


def test_stats_estimates_the_memory_of_a_namespace_whose_entries_are_all_per_user(
    redis_url: str,
) -> None:
    # A per-user namespace has no tenant-level entry: its entries are in its users' indexes.
    store_entries(
        redis_url,
        PREFIX,
        [
            (f"profile:tenant_t{t}:user_u{u}:/me", CacheScope("profile", f"t{t}", f"u{u}"))
            for t in range(2)
            for u in range(3)
        ],
    )

    profile = stats_json(redis_url)["profile"]

    assert profile["entries"] == 6
    memory = profile["memory_bytes_estimate"]
    assert isinstance(memory, int)
    assert memory > 0


def test_stats_prints_a_table_with_tenants_totals_and_server_memory(reports: str) -> None:
    result = invoke(reports, "stats", "--by-tenant")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"prefix {PREFIX} at redis://127.0.0.1:")
    assert lines[2].split()[:2] == ["reports", "5"]
    assert lines[3].split() == ["tenant", "t1", "3"]
    assert lines[4].split() == ["tenant", "t2", "2"]
    assert lines[5].split()[:2] == ["users", "1"]
    assert [line.split()[:2] for line in lines if line.startswith("total")] == [["total", "6"]]
    assert lines[-1].startswith("server memory: ")


@pytest.mark.parametrize("command", [["stats"], ["invalidate", "reports"], ["flush", "--dry-run"]])
def test_a_command_without_cache_prefix_warns_that_it_works_on_the_default_prefix(
    reports: str, command: list[str]
) -> None:
    result = CliRunner().invoke(app, command, env={"REDIS_URL": reports, "CACHE_PREFIX": None})

    assert result.exit_code == 0, result.output
    assert result.stderr.count("CACHE_PREFIX is not set") == 1
    assert "prefix 'cache'" in result.stderr
    assert "svc-a" not in result.stdout  # another prefix's entries stay untouched


def test_a_command_with_cache_prefix_says_nothing_about_it(reports: str) -> None:
    result = invoke(reports, "stats")

    assert "CACHE_PREFIX" not in result.stderr


def test_stats_without_redis_url_says_there_is_nothing_to_count() -> None:
    result = invoke(None, "stats")

    assert result.exit_code == 2
    assert result.stderr.startswith("error: REDIS_URL is not set")


# -- invalidate --------------------------------------------------------------------------------


def test_invalidate_one_tenant_removes_its_entries_and_prints_the_count(reports: str) -> None:
    result = invoke(reports, "invalidate", "reports", "--tenant", "t1")

    assert result.exit_code == 0, result.output
    assert result.stdout == "removed 3 entries of namespace reports for tenant t1\n"
    namespaces = stats_json(reports)
    assert namespaces["reports"]["tenants"] == [{"tenant": "t2", "entries": 2}]
    assert namespaces["users"]["entries"] == 1


def test_invalidate_one_user_leaves_the_tenants_other_entries(reports: str) -> None:
    result = invoke(reports, "invalidate", "reports", "--tenant", "t2", "--user", "u1")

    assert result.stdout == "removed 1 entries of namespace reports for tenant t2, user u1\n"
    assert stats_json(reports)["reports"]["entries"] == 4


def test_invalidate_a_namespace_leaves_other_namespaces_and_prefixes(
    reports: str, redis_server: RedisServer
) -> None:
    result = invoke(reports, "invalidate", "reports")

    assert result.stdout == "removed 5 entries of namespace reports\n"
    assert set(stats_json(reports)) == {"users"}
    svc_b = {key for key in keys(redis_server) if key.startswith(b"svc-b:reports:")}
    assert len(svc_b) == 4


def test_invalidating_a_namespace_that_has_no_entries_warns_that_it_may_be_mistyped(
    reports: str,
) -> None:
    result = invoke(reports, "invalidate", "reprots")

    assert result.exit_code == 0, result.output
    assert result.stdout == "removed 0 entries of namespace reprots\n"
    assert result.stderr == (
        f"warning: namespace 'reprots' has no entries under prefix '{PREFIX}' (namespaces that "
        "have some: reports, users): is it spelled as in @cache(namespace=...)?\n"
    )


def test_invalidating_a_tenant_without_entries_in_a_known_namespace_says_nothing_more(
    reports: str,
) -> None:
    result = invoke(reports, "invalidate", "reports", "--tenant", "t9")

    assert result.stdout == "removed 0 entries of namespace reports for tenant t9\n"
    assert result.stderr == ""


def test_invalidate_a_user_without_a_tenant_is_refused(reports: str) -> None:
    result = invoke(reports, "invalidate", "reports", "--user", "u1")

    assert result.exit_code == 2
    assert "needs the user's tenant_id" in result.stderr
    assert stats_json(reports)["reports"]["entries"] == 5


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["invalidate", "reports:tenant_t1"], "must not contain ':'"),
        (["invalidate"], "give a namespace, or --tag"),
        (["invalidate", "reports", "--tag", "x"], "not both"),
        (["invalidate", "--tag", ""], "a cache tag must be non-empty"),
    ],
    ids=["namespace-with-a-colon", "nothing", "both", "empty-tag"],
)
def test_invalidate_refuses_what_invalidate_namespace_refuses_and_removes_nothing(
    reports: str, args: list[str], said: str
) -> None:
    """A namespace that cannot exist is refused as ``invalidate_namespace()`` refuses it, not
    reported as ``removed 0``; each refusal says only what is wrong."""
    result = invoke(reports, *args)

    assert result.exit_code == 2
    assert said in result.stderr
    assert "--user" not in result.stderr
    assert stats_json(reports)["reports"]["entries"] == 5


# -- flush -------------------------------------------------------------------------------------

ODD_KEYS = [
    f"{PREFIX}:key with spaces",
    f"{PREFIX}:quotes ' and \"",
    f"{PREFIX}:*",
    f"{PREFIX}:[glob]?\\",
    f"{PREFIX}:ns:tenant_ü:/path?q=1",
]
OTHER_KEYS = [b"svc-b:reports:1", b"svc-a-staging:reports:1", b"svc-a", b"svc-aa:x"]


@pytest.fixture
def many_keys(redis_server: RedisServer, redis_url: str) -> RedisServer:
    """1,200 plain keys and a few odd ones under svc-a, beside keys of other prefixes."""
    with redis.Redis.from_url(redis_url) as client:
        client.mset({f"{PREFIX}:k:{i}": "v" for i in range(1200)})
        client.mset(dict.fromkeys([*ODD_KEYS, *OTHER_KEYS], "v"))
    return redis_server


def test_flush_dry_run_counts_the_prefix_and_removes_nothing(many_keys: RedisServer) -> None:
    before = keys(many_keys)

    result = invoke(many_keys.url, "flush", "--dry-run")

    assert result.exit_code == 0
    assert result.stdout.startswith(f"would remove {1200 + len(ODD_KEYS)} keys of prefix {PREFIX}")
    assert keys(many_keys) == before


def test_flush_asks_first_and_removes_nothing_when_declined(many_keys: RedisServer) -> None:
    before = keys(many_keys)

    result = invoke(many_keys.url, "flush", input="n\n")

    assert result.exit_code == 1
    assert f"Remove {1200 + len(ODD_KEYS)} keys of prefix {PREFIX}" in result.stdout
    assert keys(many_keys) == before


def test_flush_confirmed_removes_every_key_of_the_prefix_odd_names_included(
    many_keys: RedisServer,
) -> None:
    result = invoke(many_keys.url, "flush", input="y\n")

    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(f"removed {1200 + len(ODD_KEYS)} keys of prefix {PREFIX}\n")
    assert keys(many_keys) == set(OTHER_KEYS)


def test_flush_yes_in_a_shell_uses_scan_and_unlink_never_keys(many_keys: RedisServer) -> None:
    many_keys.command("CONFIG", "RESETSTAT")

    result = run_cli(many_keys.url, "flush", "--yes")

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"removed {1200 + len(ODD_KEYS)} keys of prefix {PREFIX}\n"
    assert keys(many_keys) == set(OTHER_KEYS)
    commands = many_keys.command("INFO", "commandstats").decode()
    assert "cmdstat_scan:" in commands
    assert "cmdstat_unlink:calls=3," in commands  # batches of 500
    assert "cmdstat_keys:" not in commands


def test_flush_without_redis_url_is_refused() -> None:
    result = invoke(None, "flush", "--yes")

    assert result.exit_code == 2
    assert result.stderr.startswith("error: REDIS_URL is not set")


# -- on a cluster ------------------------------------------------------------------------------


@pytest.mark.slow
def test_stats_invalidate_and_flush_reach_every_primary_of_a_cluster(
    redis_cluster_url: str,
) -> None:
    tenants = [f"t{n}" for n in range(12)]
    store_entries(
        redis_cluster_url,
        PREFIX,
        [
            (f"reports:tenant_{t}:/r:{i}", CacheScope("reports", t))
            for t in tenants
            for i in range(5)
        ],
    )
    store_entries(
        redis_cluster_url, "svc-b", [("reports:tenant_t1:/r", CacheScope("reports", "t1"))]
    )
    with redis.RedisCluster.from_url(redis_cluster_url) as cluster:
        cluster.set(f"{PREFIX}:odd key '*'", "v")

        checked = invoke(redis_cluster_url, "check")
        assert checked.exit_code == 0, checked.output
        server = server_name_and_version(find_redis_server())
        assert f"server    ok: {server}, cluster mode" in checked.stdout
        assert stats_json(redis_cluster_url)["reports"]["entries"] == 60
        # Memory: the three primaries' together (one node's alone before).
        memory = json.loads(invoke(redis_cluster_url, "stats", "--json").stdout)
        used = [
            int(info["used_memory"])
            for info in cluster.info(target_nodes=redis.RedisCluster.PRIMARIES).values()
        ]
        assert sum(used) * 0.8 < memory["used_memory"] < sum(used) * 1.2
        assert memory["primaries"] == 3
        table = invoke(redis_cluster_url, "stats").stdout.splitlines()
        assert table[-1].startswith("server memory over 3 primaries: ")
        invalidated = invoke(redis_cluster_url, "invalidate", "reports", "--tenant", "t3")
        assert invalidated.stdout == "removed 5 entries of namespace reports for tenant t3\n"
        assert stats_json(redis_cluster_url)["reports"]["entries"] == 55

        flushed = invoke(redis_cluster_url, "flush", "--yes")

        assert flushed.exit_code == 0, flushed.output
        remaining = set(cluster.scan_iter(count=1000))
        assert remaining
        assert all(key.startswith(b"svc-b:") for key in remaining)


# -- the installed script -----------------------------------------------------------------------


def test_the_commons_cache_script_is_installed_beside_python() -> None:
    script = Path(sys.executable).parent / "commons-cache"

    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=30, check=False
    )

    assert result.returncode == 0
    for command in ("check", "stats", "invalidate", "flush"):
        assert command in result.stdout


@pytest.mark.slow
def test_check_strict_fails_when_any_node_of_a_cluster_does_not_evict(
    redis_cluster: LocalRedisCluster, redis_cluster_url: str
) -> None:
    # Only the first node's INFO was read: two primaries of three on noeviction passed --strict.
    primaries = redis_cluster.current_primaries()
    for node in redis_cluster.nodes:
        node.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    try:
        assert invoke(redis_cluster_url, "check", "--strict").exit_code == 0
        primaries[-1].command("CONFIG", "SET", "maxmemory-policy", "noeviction")

        result = invoke(redis_cluster_url, "check", "--strict")
    finally:
        for node in redis_cluster.nodes:
            node.command("CONFIG", "SET", "maxmemory-policy", "noeviction")

    assert result.exit_code == 1
    assert f"noeviction on 127.0.0.1:{primaries[-1].port}" in result.stderr
