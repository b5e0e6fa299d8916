"""The service keeps its OpenAPI contract: schemathesis, all checks, in-process, on both backends.

Every operation of the schema is tested with generated requests (examples, coverage and fuzzing
phases; valid and invalid data) sent to the app over ASGI, and every answer goes through all of
schemathesis' checks: no 5xx, only declared status codes, bodies and headers as declared, invalid
data refused, valid data accepted, authentication enforced, 405 with a correct ``Allow`` for
undeclared methods, and the rest. Each test runs once with an ordinary tenant user's token and once
with an admin's, on the in-memory cache and on a private Redis.

The schema is read once, at import, from an app that is never started. Each test sends its requests
to its own service (``app=``): the fixture builds it after the environment is set, schemathesis
starts its lifespan (``init_cache()``, the database) on the first request and ends it when the
test ends, before the fixtures are torn down.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from starlette.types import Receive, Scope, Send

from commons.cache import cache_settings, cache_status
from commons.testing.redis_server import RedisServer
from insights_backend.app import create_app
from insights_backend.config import ServiceSettings
from insights_backend.tokens import Identity, mint_token

TEST_JWT_SECRET = "insights-backend-test-secret-0123456789abcdef"

#: Hypothesis examples per operation and test, on top of schemathesis' coverage-phase cases.
EXAMPLES_PER_OPERATION = 50


async def _unstarted_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Stands in for the app in the module-level schema; no request may reach it."""
    raise AssertionError("each request is sent to the test's own service: call_and_validate(app=)")


schema = schemathesis.openapi.from_dict(
    create_app(ServiceSettings(JWT_SECRET=TEST_JWT_SECRET)).openapi(),
    # Every check, like `schemathesis run --checks all`.
    config=schemathesis.Config.from_dict({"checks": {"enabled": True}}),
)
# An ASGI app makes schemathesis send requests in-process; `app=` picks each test's service.
schema.app = _unstarted_app

contract_settings = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        # One service per operation and backend, shared by its examples on purpose: a running
        # service keeps its state (cache entries, PUT configs) from one request to the next.
        HealthCheck.function_scoped_fixture,
    ],
)


class _BearerToken:
    """schemathesis auth provider: a valid token of ``identity`` on every generated request.

    Requests generated without credentials on purpose (to test the 401) are left without it.
    """

    identity: Identity

    def get(self, case: schemathesis.Case, context: schemathesis.AuthContext) -> str:
        return mint_token(self.identity, TEST_JWT_SECRET)

    def set(self, case: schemathesis.Case, data: str, context: schemathesis.AuthContext) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


class TenantUserToken(_BearerToken):
    identity = Identity(1, "alice")


class AdminToken(_BearerToken):
    identity = Identity(2, "carol", is_admin=True)


@pytest.fixture(params=["memory", "redis"])
def service(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[FastAPI]:
    """A fresh service on the in-memory cache or on the session's private Redis (emptied)."""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.command("FLUSHALL")
        monkeypatch.setenv("REDIS_URL", server.url)
    cache_settings.cache_clear()
    yield create_app()
    # schemathesis' pytest plugin has ended the lifespan; a running one would leak into the next.
    assert cache_status().backend == "disabled", "the service's lifespan outlived its test"


@schema.parametrize()
@schema.auth(TenantUserToken)
@contract_settings
def test_every_answer_to_a_tenant_user_keeps_the_contract(
    case: schemathesis.Case, service: FastAPI
) -> None:
    case.call_and_validate(app=service)


@schema.parametrize()
@schema.auth(AdminToken)
@contract_settings
def test_every_answer_to_an_admin_keeps_the_contract(
    case: schemathesis.Case, service: FastAPI
) -> None:
    case.call_and_validate(app=service)
