"""``python -m bench [name ...] [--quick] [--report-only] [--check]``: runs benchmarks.

Each module runs in its own subprocess (a crash, a leaked server or a global left initialised
cannot disturb the next one). Full runs write ``bench/results/<name>.json`` and ``<name>.png`` and
regenerate the tables of ``docs/benchmarks.md`` and the README's headline figures; ``--quick``
runs (smoke tests, seconds each) write to ``bench/results/quick/`` instead and never touch either.
A module that fails is reported, the others still run, and the exit status is non-zero at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench._common import REPO_ROOT, child_env, machine_info
from bench.report import RESULTS_DIR, out_of_date, render_chart, validate, write_report

BENCH_DIR = Path(__file__).resolve().parent
#: The order of the table; modules found beside these follow in name order.
ORDER = (
    "hit_throughput",
    "mixed",
    "working_set",
    "stampede",
    "invalidation",
    "coherence",
    "memory",
)
NOT_BENCHMARKS = frozenset({"report"})
#: A module still running after this long is stopped and reported as failed.
MODULE_TIMEOUT_SECONDS = 900


def discover() -> list[str]:
    """Names of the benchmark modules present: ``bench/<name>.py`` that define ``run``."""
    names = []
    for path in BENCH_DIR.glob("*.py"):
        name = path.stem
        if name.startswith("_") or name in NOT_BENCHMARKS:
            continue
        try:
            if "def run(" not in path.read_text():
                continue
        except OSError:
            continue
        names.append(name)
    return [n for n in ORDER if n in names] + sorted(n for n in names if n not in ORDER)


def _child(name: str, quick: bool, out: str) -> int:
    """Runs one module in this process and writes its result to ``out``."""
    import importlib

    started = time.perf_counter()
    module = importlib.import_module(f"bench.{name}")
    result = module.run(quick=quick)
    problems = validate(result)
    if problems:
        print(f"{name}: result does not follow the contract: {'; '.join(problems)}")
        return 2
    result["seconds"] = round(time.perf_counter() - started, 1)
    Path(out).write_text(json.dumps(result, indent=2, default=str))
    return 0


def run_module(name: str, quick: bool, directory: Path) -> bool:
    print(f"== {name}{' (quick)' if quick else ''}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        out = Path(tmp) / f"{name}.json"
        command = [sys.executable, "-m", "bench", "--_child", name, "--_out", str(out)]
        if quick:
            command.append("--quick")
        try:
            proc = subprocess.run(
                command, cwd=REPO_ROOT, env=child_env(), timeout=MODULE_TIMEOUT_SECONDS
            )
        except subprocess.TimeoutExpired:
            print(f"!! {name}: still running after {MODULE_TIMEOUT_SECONDS} s, stopped")
            return False
        if proc.returncode != 0 or not out.exists():
            print(f"!! {name}: failed (exit {proc.returncode})")
            return False
        result = json.loads(out.read_text())
    result["quick"] = quick
    result["machine"] = machine_info()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    try:
        render_chart(result, directory / f"{name}.png")
    except Exception:  # a chart that cannot be drawn does not lose the numbers
        traceback.print_exc()
        print(f"!! {name}: chart not drawn")
    print(f"   {name}: done in {time.perf_counter() - started:.0f} s", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all found)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the table and charts from the JSON"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if docs/benchmarks.md or the README's figures differ from the JSON",
    )
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._child:
        return _child(args._child, args.quick, args._out)

    directory = RESULTS_DIR / "quick" if args.quick else RESULTS_DIR
    available = discover()
    if args.check:
        stale = out_of_date(RESULTS_DIR, available or ORDER)
        for name in stale:
            print(f"{name} is out of date: run python -m bench --report-only")
        return 1 if stale else 0
    if args.report_only:
        for path in sorted(directory.glob("*.json")):
            render_chart(json.loads(path.read_text()), path.with_suffix(".png"))
        write_report(directory, available or ORDER, readme=not args.quick)
        return 0

    unknown = [n for n in args.names if n not in available]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; found: {', '.join(available)}")
        return 2
    names = args.names or available
    started = time.perf_counter()
    failed = [name for name in names if not run_module(name, args.quick, directory)]
    write_report(directory, available, readme=not args.quick)
    elapsed = time.perf_counter() - started
    print(f"== {len(names) - len(failed)}/{len(names)} passed in {elapsed:.0f} s")
    if failed:
        print(f"!! failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
