"""``palm-serve keys create|list|revoke``: API keys managed on the job database, no server needed."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.auth.keys import ApiKey, KeyStore
    from gateway.settings import Settings

DESCRIPTION = """\
Manage the API keys of PALM_AUTH__MODE=api-key, in the database PALM_DATABASE_URL names (default:
SQLite under PALM_DATA_DIR). A key is printed once, when it is created; only its sha256 is stored.
A revoked key is refused from the next request on.
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser(
        "keys",
        help="create, list or revoke API keys",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", help="create a key and print it (once)")
    create.add_argument("--tenant", required=True, help="the tenant whose jobs the key reaches")
    create.add_argument("--name", default="", help="a label, e.g. who holds the key")
    create.add_argument(
        "--scopes",
        default="predict,jobs",
        help="comma-separated: predict, jobs, admin (default: predict,jobs)",
    )
    listing = actions.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--active", action="store_true", help="leave revoked keys out")
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id", help="the id printed by create or list")


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Exit status 0 done, 2 a wrong argument or an unknown key."""
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)
    from gateway.auth.keys import KeyStore, parse_scopes
    from gateway.db.engine import create_engine, database_url
    from gateway.db.migrate import upgrade
    from gateway.errors import GatewayError

    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(database_url(settings.data_dir, settings.database_url))
    try:
        upgrade(engine)
        store = KeyStore(engine)
        if args.keys_command == "create":
            key, token = store.create(args.tenant, parse_scopes(args.scopes), args.name)
            print(token)
            print(
                f"key {key.id} for tenant {key.tenant!r}, scopes {_scopes(key)}: store it now, it is not "
                "shown again",
                file=sys.stderr,
            )
        elif args.keys_command == "list":
            _print_table(store, active_only=args.active)
        else:
            key = store.revoke(args.key_id)
            print(f"key {key.id} of tenant {key.tenant!r} revoked")
    except GatewayError as exc:
        print(f"palm-serve: {exc.detail}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    return 0


def _scopes(key: ApiKey) -> str:
    return ",".join(sorted(key.scopes))


def _print_table(store: KeyStore, *, active_only: bool) -> None:
    rows = [("ID", "TENANT", "NAME", "SCOPES", "CREATED", "LAST USED", "REVOKED")]
    for key in store.list(include_revoked=not active_only):
        rows.append(
            (
                key.id,
                key.tenant,
                key.name or "-",
                _scopes(key),
                f"{key.created_at:%Y-%m-%d %H:%M}",
                f"{key.last_used_at:%Y-%m-%d %H:%M}" if key.last_used_at else "-",
                f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
