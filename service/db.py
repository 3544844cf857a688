"""Engine, transactions and the one way service code touches the database.

Every unit of work is a function ``fn(session) -> T`` run by :meth:`Database.run`, which commits
before it returns: a reply is sent only for what is durable. On SQLite (one writer at a time,
answers in microseconds) the work runs inline on the event loop and write transactions start with
``BEGIN IMMEDIATE``, so writers queue on a lock instead of failing with "database is locked".
SQLite writes are group-committed: units of work that arrive together each run in a savepoint of
one transaction, whose single COMMIT (the fsync) precedes every one of their replies. On
PostgreSQL the work runs in a worker thread; concurrency between replicas is the database's job.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")
log = logging.getLogger("tdx.db")

SQLITE_BUSY_TIMEOUT_MS = 30_000
TRANSIENT_RETRIES = 5
TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock_detected, serialization_failure


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


def _plain_savepoints(engine: Engine) -> None:
    """Savepoint statements as text: SQLAlchemy compiles a new statement for every savepoint (its
    name is new each time, so its compiled form is never cached), which cost as much as the rest of
    a unit of work's SQL on SQLite, where every unit of work is a savepoint of a group commit."""
    dialect = engine.dialect
    quote = dialect.identifier_preparer.quote

    def do_savepoint(connection: Connection, name: str) -> None:
        connection.exec_driver_sql(f"SAVEPOINT {quote(name)}")

    def do_release_savepoint(connection: Connection, name: str) -> None:
        connection.exec_driver_sql(f"RELEASE SAVEPOINT {quote(name)}")

    def do_rollback_to_savepoint(connection: Connection, name: str) -> None:
        connection.exec_driver_sql(f"ROLLBACK TO SAVEPOINT {quote(name)}")

    dialect.do_savepoint = do_savepoint  # type: ignore[method-assign]
    dialect.do_release_savepoint = do_release_savepoint  # type: ignore[method-assign]
    dialect.do_rollback_to_savepoint = do_rollback_to_savepoint  # type: ignore[method-assign]


def make_engine(url: str, *, sqlite_synchronous: str = "FULL", pool_size: int = 10) -> Engine:
    if is_sqlite_url(url):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        )
        _configure_sqlite(engine, sqlite_synchronous)
        _plain_savepoints(engine)
        return engine
    # No overflow: a replica never holds more than pool_size connections (PostgreSQL's default
    # max_connections is 100, shared by every replica); further requests queue for a connection.
    engine = create_engine(url, pool_size=pool_size, max_overflow=0, pool_timeout=60, pool_pre_ping=True)
    _plain_savepoints(engine)
    return engine


@dataclass(eq=False)
class _Batch:
    """SQLite group commit: one write transaction that several units of work join, each in a
    savepoint of its own, committed (one fsync) before any of them is answered."""

    conn: Connection
    thread: int
    sessions: list[Session] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    closed: bool = False


class Database:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._write_lock = threading.Lock()
        self._batch: _Batch | None = None
        self.after_commit_hooks: list[Callable[[Session], None]] = []
        self.before_commit_hooks: list[Callable[[Session], None]] = []

    @contextmanager
    def session(self, *, write: bool = True) -> Iterator[Session]:
        """A transaction: committed when the block ends, rolled back on an exception."""
        if not (self.is_sqlite and write):
            with self._transaction(write) as session:
                yield session
            return
        # Joins the batch this thread has open (committing it early), else opens one of its own.
        batch = self._own_batch() or self._open_batch()
        try:
            with self._unit(batch) as session:
                yield session
        finally:
            self._commit_batch(batch)

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

    # ---- SQLite writes: one writer per process, group commit ----------------------------------

    def _own_batch(self) -> _Batch | None:
        batch = self._batch
        return batch if batch is not None and batch.thread == threading.get_ident() else None

    def _open_batch(self) -> _Batch:
        # One SQLite writer per process at a time: threads wait on this lock (held until the batch
        # commits) instead of spinning in SQLite's busy handler.
        self._write_lock.acquire()
        try:
            conn = self.engine.connect()
            conn.begin()  # BEGIN IMMEDIATE (see _on_begin)
        except BaseException:
            self._write_lock.release()
            raise
        batch = _Batch(conn, threading.get_ident())
        self._batch = batch
        return batch

    @contextmanager
    def _unit(self, batch: _Batch) -> Iterator[Session]:
        session = self._sessions(bind=batch.conn, join_transaction_mode="create_savepoint")
        try:
            yield session
            for hook in self.before_commit_hooks:
                hook(session)
            session.commit()  # releases the unit's savepoint
        except BaseException:
            session.rollback()  # to the unit's savepoint: the rest of the batch is untouched
            raise
        finally:
            session.close()
        batch.sessions.append(session)

    def _commit_batch(self, batch: _Batch) -> None:
        if batch.closed:
            return
        batch.closed = True
        self._batch = None
        error: BaseException | None = None
        try:
            batch.conn.commit()
        except BaseException as exc:
            error = exc
        finally:
            batch.conn.close()
            self._write_lock.release()
        for fut in batch.waiters:
            if fut.done():
                continue
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)
        if error is not None:
            raise error
        for session in batch.sessions:
            for hook in self.after_commit_hooks:
                hook(session)

    def _commit_soon(self, batch: _Batch) -> None:
        try:
            self._commit_batch(batch)
        except Exception:  # every waiter got the error through its future already
            log.exception("group commit of %d unit(s) failed", len(batch.sessions))

    async def _run_batched(self, fn: Callable[[Session], T]) -> T:
        batch = self._own_batch()
        if batch is None:
            batch = self._open_batch()
            # Committed once the event loop has run what is ready now: requests that arrived
            # together share one commit.
            asyncio.get_running_loop().call_soon(self._commit_soon, batch)
        with self._unit(batch) as session:
            result = fn(session)
        fut = asyncio.get_running_loop().create_future()
        batch.waiters.append(fut)
        await fut  # a reply is sent only for what is committed
        return result

    # ---- entry points -----------------------------------------------------------------------

    def run_sync(self, fn: Callable[[Session], T], *, write: bool = True) -> T:
        if self.is_sqlite:
            with self.session(write=write) as session:
                return fn(session)
        # PostgreSQL may abort a transaction to break a deadlock or a serialization conflict
        # (e.g. a reboot report locking a host then its VMs while a delete locks a VM then its
        # host). Nothing of it was committed, so the unit of work is run again from the start.
        for attempt in range(1, TRANSIENT_RETRIES + 1):
            try:
                with self.session(write=write) as session:
                    return fn(session)
            except DBAPIError as exc:
                if attempt == TRANSIENT_RETRIES or getattr(exc.orig, "sqlstate", None) not in TRANSIENT_SQLSTATES:
                    raise
                time.sleep(random.uniform(0, 0.005 * attempt))
        raise AssertionError("unreachable")

    async def run(self, fn: Callable[[Session], T], *, write: bool = True) -> T:
        if self.is_sqlite:
            if write:
                return await self._run_batched(fn)
            return self.run_sync(fn, write=False)
        return await anyio.to_thread.run_sync(lambda: self.run_sync(fn, write=write))

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
