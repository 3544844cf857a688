"""``tdx-service``: ``serve`` (migrate, then serve with uvicorn) and ``migrate``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.config import Settings

SERVER_EXTRA_HINT = "pip install 'tdx-control-plane[server]'"


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def _prepare(settings: Settings) -> None:
    """Migrate the database and, on first start without TDX_ADMIN_TOKEN, mint the admin token."""
    from service.db import Database, make_engine
    from service.migrate import migrate
    from service.tokens import ensure_bootstrap_admin

    engine = make_engine(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
    try:
        migrate(engine)
        if settings.admin_token:
            return
        db = Database(engine)
        secret = db.run_sync(ensure_bootstrap_admin)
        if secret is not None:
            bar = "=" * 72
            print(
                f"{bar}\nAdmin token (shown once; store it now, e.g. export TDX_TOKEN=...):\n\n"
                f"    {secret}\n\n{bar}",
                flush=True,
            )
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tdx-service", description="TDX control plane service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="apply pending migrations, then serve the API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (PostgreSQL only)")
    sub.add_parser("migrate", help="apply pending migrations and exit")
    args = parser.parse_args(argv)

    try:  # the light install (agent, tdxctl, client) has none of the service's packages
        from service.config import get_settings
    except ImportError as exc:
        sys.exit(f"tdx-service: the service's packages are not installed ({exc.name}); {SERVER_EXTRA_HINT}")
    from pydantic import ValidationError

    _configure_logging()
    try:
        settings = get_settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"TDX_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        sys.exit(f"tdx-service: refusing to start: {problems}")
    _prepare(settings)
    if args.command == "migrate":
        print("database is at the latest schema")
        return

    import uvicorn

    if args.workers > 1 and settings.database_url.startswith("sqlite"):
        parser.error("--workers > 1 needs PostgreSQL (SQLite has a single writer)")
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=False,
        log_level="info",
        proxy_headers=False,
        # Event streams stay open for as long as their clients like; don't let them hold a
        # shutdown hostage.
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
