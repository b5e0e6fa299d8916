"""The README and the docs stay true to the code and to the benchmark results."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_readme_env_table_lists_every_setting_with_its_default() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "readme_tables.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_benchmark_figures_in_the_readme_and_docs_are_those_of_the_results() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--check"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
