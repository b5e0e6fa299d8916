"""``python -m commons.cache``: the ``commons-cache`` CLI (see ``cli.py``)."""

from __future__ import annotations

import sys


def run() -> None:
    """The ``commons-cache`` console script: the CLI, or one line saying how to install it."""
    try:
        from commons.cache.cli import main
    except ModuleNotFoundError as exc:
        if exc.name not in {"typer", "click"}:
            raise
        print(
            "error: the commons-cache CLI needs typer: pip install 'commons[cli]'", file=sys.stderr
        )
        sys.exit(2)
    main()


if __name__ == "__main__":
    run()
