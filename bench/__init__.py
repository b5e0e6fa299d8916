"""The benchmark suite: ``python -m bench [name ...] [--quick] [--report-only]``.

Each benchmark is a module ``bench/<name>.py`` exposing ``run(quick: bool = False) -> dict`` that
measures ours and the reference(s) side by side in one run and returns::

    {"name": str, "title": str, "columns": [str, ...], "rows": [[cell, ...], ...], "notes": str,
     "chart": {"type": "bar", "labels": [...], "series": {"ours": [...], "<ref>": [...]},
               "unit": "ms"}}

(``chart`` optional; cells are numbers or short strings). The runner (``__main__.py``) runs each
module in its own subprocess, writes ``bench/results/<name>.json`` and ``<name>.png``, and
regenerates the tables of ``docs/benchmarks.md`` and the README's headline figures from the JSON
files (``report.py``).
"""
