"""``docs/service-guide.md`` runs as written: its ``service.py`` blocks, in order, make a service
that ``mypy --strict`` accepts, and its ``test_service.py`` block, with its ``pyproject.toml``
block, is a green test run: the first HIT, a correct invalidation, tenants kept apart."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "service-guide.md"
BLOCK = re.compile(r"^```(\w+) ([\w.]+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def guide_files() -> dict[str, str]:
    """The files the guide's named blocks make: each name's blocks joined in order."""
    files: dict[str, list[str]] = {}
    for _, name, body in BLOCK.findall(GUIDE.read_text()):
        files.setdefault(name, []).append(body)
    return {name: "\n\n".join(bodies) for name, bodies in files.items()}


@pytest.fixture
def service_dir(tmp_path: Path) -> Path:
    for name, text in guide_files().items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_guide_makes_a_service_a_test_file_and_its_pytest_settings() -> None:
    assert set(guide_files()) == {"service.py", "test_service.py", "pyproject.toml"}


def run_in(service_dir: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """``python -m ARGUMENTS`` in ``service_dir``, without the cache's variables."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("CACHE_", "REDIS_"))}
    return subprocess.run(
        [sys.executable, "-m", *arguments],
        cwd=service_dir,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_guides_tests_pass_as_written(service_dir: Path) -> None:
    run = run_in(service_dir, "pytest", "-q", "-p", "no:cacheprovider", "test_service.py")

    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 passed" in run.stdout


def test_the_guides_service_passes_mypy_strict(service_dir: Path) -> None:
    run = run_in(service_dir, "mypy", "--strict", "--cache-dir", ".mypy_cache", "service.py")

    assert run.returncode == 0, run.stdout + run.stderr
