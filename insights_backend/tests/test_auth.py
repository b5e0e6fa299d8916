"""Identity comes from a verified bearer JWT only; admin routes need the admin role."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
from httpx import AsyncClient

from insights_backend import dev_token as token_command

Bearer = Callable[..., dict[str, str]]

TEST_JWT_SECRET = "insights-backend-test-secret-0123456789abcdef"
OTHER_SECRET = "somebody-elses-secret-0123456789abcdefghij"
PROTECTED = ["/v1/tenant/config", "/v1/users/me", "/v1/insights", "/v1/admin/tenants"]


def signed(claims: dict[str, object], secret: str = TEST_JWT_SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {jwt.encode(claims, secret, algorithm='HS256')}"}


def valid_claims(**overrides: object) -> dict[str, object]:
    return {"tenant_id": 1, "sub": "alice", "exp": int(time.time()) + 60, **overrides}


@pytest.mark.parametrize("path", PROTECTED)
async def test_a_request_without_a_token_is_unauthorized(client: AsyncClient, path: str) -> None:
    response = await client.get(path)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_a_tenant_header_is_no_substitute_for_a_token(memory_client: AsyncClient) -> None:
    response = await memory_client.get(
        "/v1/tenant/config", headers={"X-Tenant-ID": "1", "X-User-ID": "alice"}
    )

    assert response.status_code == 401


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Authorization": "Bearer not-a-jwt"}, id="garbage"),
        pytest.param(signed(valid_claims(), OTHER_SECRET), id="wrong-secret"),
        pytest.param(signed(valid_claims(exp=int(time.time()) - 60)), id="expired"),
        pytest.param(signed({"tenant_id": 1, "sub": "alice"}), id="no-expiry"),
        pytest.param(signed(valid_claims(tenant_id=None)), id="no-tenant"),
        pytest.param(signed(valid_claims(tenant_id="x")), id="tenant-not-a-number"),
        pytest.param(signed(valid_claims(sub="eve:tenant_2")), id="user-with-colon"),
        pytest.param(
            {"Authorization": "Bearer " + jwt.encode(valid_claims(), key=None, algorithm="none")},
            id="unsigned",
        ),
    ],
)
async def test_a_bad_token_is_unauthorized(
    memory_client: AsyncClient, headers: dict[str, str]
) -> None:
    response = await memory_client.get("/v1/tenant/config", headers=headers)

    assert response.status_code == 401


@pytest.mark.parametrize(
    "tenant_id",
    [
        pytest.param("²", id="superscript-two"),
        pytest.param("٣", id="arabic-indic-three"),
        pytest.param("１", id="fullwidth-one"),
        pytest.param(" 1", id="leading-space"),
        pytest.param("01", id="leading-zero"),
        pytest.param("+1", id="plus-sign"),
        pytest.param("1_000", id="underscore"),
        pytest.param(2**63, id="above-int64"),
        pytest.param(str(2**63), id="above-int64-as-text"),
        pytest.param(2**64 + 1, id="far-above-int64"),
        pytest.param(0, id="zero"),
        pytest.param(-1, id="negative"),
        pytest.param("-1", id="negative-as-text"),
        pytest.param(1.0, id="float"),
        pytest.param(True, id="boolean"),
    ],
)
@pytest.mark.parametrize("path", PROTECTED)
async def test_a_signed_token_whose_tenant_id_is_not_a_plain_int64_id_is_unauthorized(
    client: AsyncClient, tenant_id: object, path: str
) -> None:
    response = await client.get(
        path, headers=signed(valid_claims(tenant_id=tenant_id, role="admin"))
    )

    assert response.status_code == 401
    assert "tenant_id" in response.json()["detail"]


@pytest.mark.parametrize(
    "tenant_id",
    [
        pytest.param(9_223_372_036_854_775_807, id="number"),
        pytest.param("9223372036854775807", id="text"),
    ],
)
async def test_the_largest_int64_tenant_id_is_a_tenant_without_data(
    client: AsyncClient, tenant_id: object
) -> None:
    headers = signed(valid_claims(tenant_id=tenant_id))

    config = await client.get("/v1/tenant/config", headers=headers)
    me = await client.get("/v1/users/me", headers=headers)
    insights = await client.get("/v1/insights", headers=headers)

    assert (config.status_code, me.status_code, insights.status_code) == (404, 404, 200)
    assert insights.json()["total"] == 0


@pytest.mark.parametrize(
    "username",
    [
        pytest.param("ａlice", id="fullwidth-letter"),
        pytest.param("alicé", id="accented-letter"),
        pytest.param("alice\n", id="trailing-newline"),
        pytest.param("a" * 65, id="too-long"),
        pytest.param("", id="empty"),
        pytest.param(7, id="number"),
    ],
)
async def test_a_signed_token_whose_user_is_not_a_plain_ascii_name_is_unauthorized(
    client: AsyncClient, username: object
) -> None:
    response = await client.get("/v1/users/me", headers=signed(valid_claims(sub=username)))

    assert response.status_code == 401


async def test_the_tenant_list_is_forbidden_to_non_admins(
    client: AsyncClient, bearer: Bearer
) -> None:
    response = await client.get("/v1/admin/tenants", headers=bearer(1, "alice"))

    assert response.status_code == 403


async def test_an_admin_lists_every_tenant(client: AsyncClient, bearer: Bearer) -> None:
    response = await client.get("/v1/admin/tenants", headers=bearer(1, "alice", admin=True))

    assert response.status_code == 200
    assert [tenant["name"] for tenant in response.json()] == ["Acme Corp", "Globex", "Initech"]


async def test_the_token_command_mints_a_token_the_service_accepts(
    client: AsyncClient,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env of the developer's gets read
    token_command.main(["--tenant", "2", "--user", "carol", "--admin"])
    headers = {"Authorization": f"Bearer {capsys.readouterr().out.strip()}"}

    me = await client.get("/v1/users/me", headers=headers)
    tenants = await client.get("/v1/admin/tenants", headers=headers)

    assert me.status_code == 200
    assert me.json()["email"] == "carol@globex.example"
    assert tenants.status_code == 200


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param(["--tenant", str(2**63)], id="tenant-above-int64"),
        pytest.param(["--tenant", "0"], id="tenant-zero"),
        pytest.param(["--tenant", "1", "--user", "eve:tenant_2"], id="user-with-colon"),
    ],
)
def test_the_token_command_mints_no_token_the_service_would_refuse(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    arguments: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        token_command.main(["--user", "alice", *arguments])

    assert exited.value.code != 0
    assert capsys.readouterr().out == ""
