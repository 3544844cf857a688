"""Apply pending Alembic migrations, safely when several replicas start at once.

PostgreSQL: a session-level advisory lock around the upgrade; the second replica waits, then finds
nothing to do. SQLite: an exclusive file lock beside the database file.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url

MIGRATION_LOCK = 0x7464_786D_6967  # "tdxmig"


def scripts_dir() -> Path:
    """Where the migration scripts are: ``migrations/`` in a checkout, ``service/migrations/`` in an
    installed wheel (pyproject.toml maps the one onto the other as the package ``service.migrations``)."""
    spec = importlib.util.find_spec("service.migrations")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the package service.migrations is missing: reinstall tdx-control-plane")
    return Path(next(iter(spec.submodule_search_locations)))


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(scripts_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@contextlib.contextmanager
def _sqlite_lock(url: str) -> Iterator[None]:
    database = make_url(url).database
    if not database or database == ":memory:":
        yield
        return
    lock_path = Path(database).with_suffix(Path(database).suffix + ".migrate.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _upgrade(connection: Connection, url: str) -> None:
    cfg = alembic_config(url)
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


def migrate(engine: Engine) -> None:
    url = engine.url.render_as_string(hide_password=False)
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
            conn.commit()
            try:
                _upgrade(conn, url)
                conn.commit()
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
                conn.commit()
        return
    with _sqlite_lock(url), engine.connect() as conn:
        _upgrade(conn, url)
        conn.commit()
