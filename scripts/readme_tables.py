"""Regenerates the README's env-variable table from ``CacheSettings``.

Usage: ``python scripts/readme_tables.py`` rewrites the section between ``<!-- env:begin -->`` and
``<!-- env:end -->``; ``--check`` exits non-zero when the README is out of date (the test suite runs
it, so the table cannot drift from the code).
"""

from __future__ import annotations

import sys
from pathlib import Path

from commons.cache.settings import CacheSettings

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- env:begin -->", "<!-- env:end -->"


def _default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def env_table() -> str:
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, field in CacheSettings.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{name}` | `{_default(field.default)}` | {description} |")
    return "\n".join(lines)


def rewritten(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{env_table()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    text = README.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        print(f"README.md lacks the {BEGIN} / {END} markers", file=sys.stderr)
        return 1
    new = rewritten(text)
    if "--check" in argv:
        if new != text:
            print("README.md env table is out of date: run python scripts/readme_tables.py")
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
