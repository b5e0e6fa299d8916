"""``python -m insights_backend.dev_token --tenant 1 --user alice [--admin]``: prints a dev token.

The token is signed with ``JWT_SECRET`` (from the environment or ``.env``, else the development
secret the service also falls back to), so the running service accepts it::

    TOKEN=$(python -m insights_backend.dev_token --tenant 1 --user alice)
    curl -H "Authorization: Bearer $TOKEN" localhost:8000/v1/tenant/config
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from insights_backend.config import ServiceSettings, apply_service_environment
from insights_backend.tokens import Identity, mint_token


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m insights_backend.dev_token", description="Mint a development bearer token."
    )
    parser.add_argument("--tenant", type=int, required=True, help="tenant id (e.g. 1)")
    parser.add_argument("--user", required=True, help="username within the tenant (e.g. alice)")
    parser.add_argument("--admin", action="store_true", help='add role "admin"')
    parser.add_argument(
        "--expires-in", type=int, default=86_400, metavar="SECONDS", help="lifetime (default 1 day)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parses the arguments and prints the token on stdout."""
    args = _parser().parse_args(argv)
    if args.expires_in < 1:
        sys.exit("--expires-in must be positive")
    apply_service_environment()
    identity = Identity(args.tenant, args.user, is_admin=args.admin)
    try:
        token = mint_token(
            identity, ServiceSettings().JWT_SECRET, expires_in_seconds=args.expires_in
        )
    except ValueError as exc:  # an identity the service would refuse: no token for it
        sys.exit(str(exc))
    print(token)


if __name__ == "__main__":
    main()
