"""Engine, transactions and the one way service code touches the database.

Every unit of work is a function ``fn(session) -> T`` run by :meth:`Database.run`, which commits
before it returns: a reply is sent only for what is durable. On SQLite (one writer at a time,
answers in microseconds) the work runs inline on the event loop and write transactions start with
``BEGIN IMMEDIATE``, so writers queue on a lock instead of failing with "database is locked". On
PostgreSQL the work runs in a worker thread; concurrency between replicas is the database's job.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, TypeVar

import anyio.to_thread
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 30_000


def is_sqlite_url(url: str) -> bool:
    return url.startswith("sqlite")


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite so that BEGIN is ours (see _on_begin).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get("sqlite_write", True):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def make_engine(url: str, *, sqlite_synchronous: str = "FULL", pool_size: int = 20) -> Engine:
    if is_sqlite_url(url):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        )
        _configure_sqlite(engine, sqlite_synchronous)
        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


class Database:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._write_lock = threading.Lock()
        self.after_commit_hooks: list[Callable[[Session], None]] = []
        self.before_commit_hooks: list[Callable[[Session], None]] = []

    @contextmanager
    def session(self, *, write: bool = True) -> Iterator[Session]:
        """A transaction: committed when the block ends, rolled back on an exception."""
        # One SQLite writer per process at a time: threads wait on this lock instead of spinning
        # in SQLite's busy handler.
        lock: AbstractContextManager[Any] = self._write_lock if self.is_sqlite and write else nullcontext()
        with lock, self._transaction(write) as session:
            yield session

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Session]:
        session = self._sessions()
        if self.is_sqlite:
            session.connection(execution_options={"sqlite_write": write})
        try:
            yield session
            if write:
                for hook in self.before_commit_hooks:
                    hook(session)
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()
        if write:
            for hook in self.after_commit_hooks:
                hook(session)

    def run_sync(self, fn: Callable[[Session], T], *, write: bool = True) -> T:
        with self.session(write=write) as session:
            return fn(session)

    async def run(self, fn: Callable[[Session], T], *, write: bool = True) -> T:
        if self.is_sqlite:
            return self.run_sync(fn, write=write)
        return await anyio.to_thread.run_sync(lambda: self.run_sync(fn, write=write))

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
