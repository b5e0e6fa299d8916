"""Turns benchmark results (``bench/results/<name>.json``) into PNG charts and Markdown tables.

The full tables go between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in
``docs/benchmarks.md`` when both markers are there, and always to ``bench/results/TABLE.md``; the
headline figures (a few cells of those tables, ``HEADLINES``) go between
``<!-- bench-headline:begin -->`` and ``<!-- bench-headline:end -->`` in the README. Nothing in
them is typed by hand: rebuild them from the JSON files with ``python -m bench --report-only``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench._common import REPO_ROOT

RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = REPO_ROOT / "README.md"
BENCHMARKS_DOC = REPO_ROOT / "docs" / "benchmarks.md"
BEGIN_MARKER = "<!-- bench:begin -->"
END_MARKER = "<!-- bench:end -->"
HEADLINE_BEGIN_MARKER = "<!-- bench-headline:begin -->"
HEADLINE_END_MARKER = "<!-- bench-headline:end -->"

#: The README's headline figures: (what, benchmark, the leading cells of its row as the table
#: writes them, the column of ours, the column of the reference and its name, or None). A figure
#: whose benchmark, row or column is missing is left out.
HEADLINES: tuple[tuple[str, str, tuple[str, ...], str, tuple[str, str] | None], ...] = (
    (
        "HIT req/s, uvicorn, Redis, small (vs the floor)",
        "hit_throughput",
        ("uvicorn", "redis", "small"),
        "ours",
        ("fastapi-cache2", "fastapi-cache2"),
    ),
    (
        "HIT req/s, uvicorn, Redis, large (vs the floor)",
        "hit_throughput",
        ("uvicorn", "redis", "large"),
        "ours",
        ("fastapi-cache2", "fastapi-cache2"),
    ),
    (
        "req/s, 98% hits and 2% fresh keys (vs the floor, lowest-highest round)",
        "mixed",
        ("98% hits, 2% fresh", "ours, near cache on"),
        "vs floor",
        None,
    ),
    (
        "HIT req/s over 100,000 warm keys read at random (vs the floor, lowest-highest round)",
        "working_set",
        ("100,000",),
        "ours vs floor",
        ("one GET vs floor", "the floor after one redis-py GET"),
    ),
    (
        "HIT req/s over 1,000,000 warm keys read at random (vs the floor, lowest-highest round)",
        "working_set",
        ("1,000,000",),
        "ours vs floor",
        ("one GET vs floor", "the floor after one redis-py GET"),
    ),
    (
        "handler runs, 100 concurrent GETs on a cold key, Redis",
        "stampede",
        ("1 process, Redis",),
        "ours handler calls",
        ("fastapi-cache2 handler calls", "fastapi-cache2"),
    ),
    (
        "longest PING stall, invalidating 10,000 of 1,000,000 keys (ms)",
        "invalidation",
        ("10,000 among 1,000,000",),
        "ours PING stall (ms)",
        ("fastapi-cache2 PING stall (ms)", "fastapi-cache2"),
    ),
    (
        "invalidation seen by another replica's near cache, p99 (ms after it returned)",
        "coherence",
        ("after A's invalidate() returned (0: before)",),
        "p99 ms",
        None,
    ),
    (
        "cached GET while Redis is black-holed, in a row: p99 (ms)",
        "outage",
        ("in a row: p99",),
        "ours (ms)",
        ("stock, redis-py defaults (ms)", "stock backend, redis-py defaults"),
    ),
    (
        "cached GET while Redis is black-holed, in a row: max (ms)",
        "outage",
        ("in a row: max",),
        "ours (ms)",
        ("stock, redis-py defaults (ms)", "stock backend, redis-py defaults"),
    ),
    (
        "RSS grown by 300,000 ~1 KB entries in memory (MiB)",
        "memory",
        ("RSS growth (MiB)",),
        "ours (MemoryStore)",
        ("fastapi-cache2 InMemoryBackend", "fastapi-cache2"),
    ),
)

REQUIRED_KEYS = ("name", "title", "columns", "rows", "notes")


def validate(result: Any) -> list[str]:
    """Problems with a benchmark's returned dict (empty when it follows the contract)."""
    if not isinstance(result, dict):
        return [f"run() returned {type(result).__name__}, not a dict"]
    problems = [f"missing key {key!r}" for key in REQUIRED_KEYS if key not in result]
    columns = result.get("columns", [])
    for index, row in enumerate(result.get("rows", [])):
        if not isinstance(row, list | tuple) or len(row) != len(columns):
            problems.append(f"row {index} has {len(row)} cells for {len(columns)} columns")
    chart = result.get("chart")
    if chart is not None:
        labels = chart.get("labels", [])
        for series, values in chart.get("series", {}).items():
            if len(values) != len(labels):
                problems.append(f"chart series {series!r} has {len(values)} values")
    return problems


def format_cell(cell: Any) -> str:
    if cell is None:
        return ""
    if isinstance(cell, bool):
        return "yes" if cell else "no"
    if isinstance(cell, int):
        return f"{cell:,}"
    if isinstance(cell, float):
        if math.isnan(cell):
            return "n/a"
        if abs(cell) >= 100:
            return f"{cell:,.0f}"
        if abs(cell) >= 10:
            return f"{cell:.1f}"
        return f"{cell:.2f}"
    return str(cell).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = [
        "| " + " | ".join(format_cell(c) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(format_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_chart(result: dict[str, Any], path: Path) -> bool:
    """Draws the result's bar chart (grouped bars, one colour per series); False without one."""
    chart = result.get("chart")
    if not chart or chart.get("type", "bar") != "bar":
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(chart["labels"])
    series = dict(chart["series"])
    count = max(1, len(series))
    width = 0.8 / count
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.2))
    for index, (name, values) in enumerate(series.items()):
        xs = [i - 0.4 + width * (index + 0.5) for i in range(len(labels))]
        heights = [v if isinstance(v, int | float) and not math.isnan(v) else 0 for v in values]
        bars = ax.bar(xs, heights, width, label=name)
        ax.bar_label(bars, labels=[format_cell(v) for v in values], fontsize=6, rotation=90)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(chart.get("unit", ""))
    if chart.get("log"):
        ax.set_yscale("log")
    ax.set_title(result.get("title", result.get("name", "")), fontsize=10)
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def load_results(directory: Path, order: Sequence[str]) -> list[dict[str, Any]]:
    """Every ``<name>.json`` in ``directory``, the names in ``order`` first."""
    found = {p.stem: p for p in directory.glob("*.json")}
    names = [n for n in order if n in found] + sorted(n for n in found if n not in order)
    results = []
    for name in names:
        try:
            results.append(json.loads(found[name].read_text()))
        except (OSError, ValueError) as exc:
            print(f"skipping {found[name]}: {exc}")
    return results


def build_markdown(
    results: Sequence[dict[str, Any]], directory: Path, *, document_dir: Path | None = None
) -> str:
    """The full tables; charts are linked relative to ``document_dir`` (default ``directory``)."""
    parts = [
        "Generated by `python -m bench` from `bench/results/*.json`; do not edit by hand. "
        "Every row measures ours and the reference(s) side by side in the same run."
    ]
    for result in results:
        machine = result.get("machine", {})
        parts.append(f"#### {result['title']}")
        parts.append(markdown_table(result["columns"], result["rows"]))
        if result.get("notes"):
            parts.append(str(result["notes"]))
        if machine:
            parts.append(
                f"<sub>{result['name']}: {machine.get('date', '?')}, "
                f"{machine.get('cpu_count', '?')} CPUs, Python {machine.get('python', '?')}, "
                f"redis-server {machine.get('redis_server', '?')}, "
                f"{result.get('seconds', 0):.0f} s"
                f"{', QUICK run' if result.get('quick') else ''}.</sub>"
            )
        png = directory / f"{result['name']}.png"
        if png.exists():
            rel = Path(os.path.relpath(png, document_dir or directory)).as_posix()
            parts.append(f"![{result['name']}]({rel})")
    return "\n\n".join(parts) + "\n"


def headline_cell(result: dict[str, Any], leading: Sequence[str], column: str) -> str | None:
    """The formatted cell of ``column`` in the row whose first cells are ``leading``."""
    columns = list(result.get("columns", []))
    if column not in columns:
        return None
    for row in result.get("rows", []):
        if [format_cell(cell) for cell in row[: len(leading)]] == list(leading):
            return format_cell(row[columns.index(column)])
    return None


def heading_anchor(title: str) -> str:
    """The anchor a Markdown heading gets on GitHub: lower case, punctuation dropped, dashes."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def build_headline(results: Sequence[dict[str, Any]]) -> str:
    """The README's headline table: the cells ``HEADLINES`` names, ours beside the reference."""
    by_name = {result["name"]: result for result in results}
    rows = []
    for what, name, leading, ours_column, reference in HEADLINES:
        result = by_name.get(name)
        ours = headline_cell(result, leading, ours_column) if result else None
        if result is None or ours is None:
            continue
        reference_text = ""
        if reference is not None:
            cell = headline_cell(result, leading, reference[0])
            reference_text = f"{cell} ({reference[1]})" if cell else ""
        link = f"[{name}](docs/benchmarks.md#{heading_anchor(result['title'])})"
        rows.append((what, ours, reference_text, link))
    return markdown_table(("measure", "ours", "reference", "full table"), rows)


def generated_sections(directory: Path, order: Sequence[str]) -> list[tuple[Path, str, str, str]]:
    """What ``write_report`` puts between which markers of which document: the full tables in
    docs/benchmarks.md, the headline figures in the README."""
    results = load_results(directory, order)
    full = build_markdown(results, directory, document_dir=BENCHMARKS_DOC.parent)
    return [
        (BENCHMARKS_DOC, BEGIN_MARKER, END_MARKER, full),
        (README, HEADLINE_BEGIN_MARKER, HEADLINE_END_MARKER, build_headline(results)),
    ]


def between(text: str, begin_marker: str, end_marker: str, section: str) -> str | None:
    """``text`` with ``section`` between the two markers; None when the markers are not there."""
    begin, end = text.find(begin_marker), text.find(end_marker)
    if not 0 <= begin < end:
        return None
    return text[: begin + len(begin_marker)] + "\n" + section + "\n" + text[end:]


def out_of_date(directory: Path, order: Sequence[str]) -> list[str]:
    """The documents whose generated sections differ from what the JSON files give (or that lack
    their markers), by path from the repository's root."""
    stale = []
    for path, begin, end, section in generated_sections(directory, order):
        current = path.read_text() if path.exists() else ""
        if between(current, begin, end, section) != current:
            stale.append(path.relative_to(REPO_ROOT).as_posix())
    return stale


def write_report(directory: Path, order: Sequence[str], *, readme: bool = True) -> Path:
    """Writes ``TABLE.md`` in ``directory`` and, if asked, docs/benchmarks.md and the README."""
    table_path = directory / "TABLE.md"
    table_path.write_text(build_markdown(load_results(directory, order), directory))
    print(f"wrote {table_path.relative_to(REPO_ROOT)}")
    if not readme:
        return table_path
    for path, begin, end, section in generated_sections(directory, order):
        name = path.relative_to(REPO_ROOT)
        current = path.read_text() if path.exists() else ""
        updated = between(current, begin, end, section)
        if updated is None:
            print(f"{name} has no {begin} / {end} markers: left as it is")
            continue
        if updated != current:
            path.write_text(updated)
        print(f"updated the benchmark section of {name}")
    return table_path
