"""``tdx-service``: ``serve`` (migrate, then serve with uvicorn) and ``migrate``."""

from __future__ import annotations

import argparse
import fcntl
import logging
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from service.config import Settings

SERVER_EXTRA_HINT = "pip install 'tdx-control-plane[server]'"


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def _claim_sqlite(url: str) -> IO[str] | None:
    """One ``serve`` per SQLite file: an exclusive flock on ``<file>.serve.lock``, held (with the
    returned handle) for the life of the process and released by the kernel however it ends.
    Two processes would each group-commit as the only writer and make the other wait for its lock."""
    from sqlalchemy.engine import make_url

    database = make_url(url).database if url.startswith("sqlite") else None
    if not database or database == ":memory:":
        return None
    path = Path(database).resolve()
    lock_path = path.with_name(path.name + ".serve.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path, "a")  # noqa: SIM115 (held until the process exits)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        sys.exit(
            f"tdx-service: another tdx-service already serves {path} (it holds {lock_path}). SQLite has a "
            "single writer: stop that one first, or use PostgreSQL to run several replicas."
        )
    return handle


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
    serve_lock = _claim_sqlite(settings.database_url) if args.command == "serve" else None
    _prepare(settings)
    if args.command == "migrate":
        print("database is at the latest schema")
        return

    import uvicorn

    from service.server import HTTP_PROTOCOL, max_connections, raise_fd_limit

    if args.workers > 1 and settings.database_url.startswith("sqlite"):
        parser.error("--workers > 1 needs PostgreSQL (SQLite has a single writer)")
    fd_limit = raise_fd_limit()
    logging.getLogger("tdx.server").info(
        "limits: request head %.0f s, body %.0f s, %d connections", settings.http_header_timeout_s,
        settings.http_body_timeout_s, max_connections(settings, fd_limit),
    )
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=False,
        log_level="info",
        proxy_headers=False,
        http=HTTP_PROTOCOL,  # header and body deadlines, a connection cap (service/server.py)
        # Event streams stay open for as long as their clients like; don't let them hold a
        # shutdown hostage.
        timeout_graceful_shutdown=5,
    )
    del serve_lock  # held until here


if __name__ == "__main__":
    main()
