"""Migrations: they build exactly the models' schema, and concurrent `tdx-service migrate` runs are safe."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.orm import Session

from service.db import Database, make_engine
from service.migrate import migrate
from service.models import Base, Token
from service.tokens import ensure_bootstrap_admin

ROOT = Path(__file__).resolve().parent.parent
TDX_SERVICE = ROOT / ".venv" / "bin" / "tdx-service"


def _schema_diff(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()


def test_migrations_give_exactly_the_models_schema(database_url: str) -> None:
    # database_url is a database migrated by service.migrate (see conftest).
    assert _schema_diff(database_url) == []
    engine = create_engine(database_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert set(Base.metadata.tables) | {"alembic_version"} == tables


def test_migrate_twice_in_process_is_a_no_op(fresh_url: str) -> None:
    engine = make_engine(fresh_url)
    try:
        migrate(engine)
        migrate(engine)
    finally:
        engine.dispose()
    assert _schema_diff(fresh_url) == []


def _spawn_migrate(url: str, admin_token: str | None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TDX_")}
    env["TDX_DATABASE_URL"] = url
    if admin_token:
        env["TDX_ADMIN_TOKEN"] = admin_token
    return subprocess.Popen(
        [str(TDX_SERVICE), "migrate"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize("admin_token", [None, "tdx_from-the-environment-of-32-chars"], ids=["bootstrap", "env-token"])
def test_two_concurrent_migrate_commands_both_succeed(fresh_url: str, admin_token: str | None) -> None:
    assert TDX_SERVICE.exists(), f"{TDX_SERVICE} is missing: pip install -e . into .venv"
    procs = [_spawn_migrate(fresh_url, admin_token) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
        assert "latest schema" in out
    assert _schema_diff(fresh_url) == []

    engine = make_engine(fresh_url)
    try:
        with engine.connect() as conn:
            admins = conn.execute(select(Token.id).where(Token.role == "admin")).all()
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    finally:
        engine.dispose()
    assert len(version) == 1
    printed = [out for out, _err in outputs if "Admin token" in out]
    if admin_token is None:
        # Exactly one bootstrap admin token is minted and printed, however the two runs interleave.
        assert len(admins) == 1
        assert len(printed) == 1
    else:
        assert admins == [] and printed == []


def test_tdx_service_migrate_runs_as_a_module_too(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TDX_")}
    env["TDX_DATABASE_URL"] = f"sqlite:///{tmp_path / 'm.db'}"
    env["TDX_ADMIN_TOKEN"] = "tdx_" + "x" * 40
    r = subprocess.run([sys.executable, "-m", "service.main", "migrate"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_concurrent_first_starts_mint_one_admin_token(fresh_url: str) -> None:
    """Two replicas starting together on an empty database print one admin token, not two."""
    engine = make_engine(fresh_url)
    migrate(engine)
    databases = [Database(engine), Database(make_engine(fresh_url))]
    barrier = threading.Barrier(2)
    secrets: list[str | None] = []

    def start(db: Database) -> None:
        def mint(session: Session) -> str | None:
            # Both transactions meet here, unless the database serializes them (SQLite's
            # BEGIN IMMEDIATE): then the first gives up waiting and goes on alone.
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=2)
            return ensure_bootstrap_admin(session)

        secrets.append(db.run_sync(mint))

    threads = [threading.Thread(target=start, args=(db,)) for db in databases]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        with engine.connect() as conn:
            admins = conn.execute(select(Token.id).where(Token.role == "admin")).all()
    finally:
        for db in databases:
            db.dispose()
    assert len(secrets) == 2
    assert len([s for s in secrets if s]) == 1
    assert len(admins) == 1
