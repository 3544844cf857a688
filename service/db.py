"""Engine, transactions and the one way service code touches the database.

Every unit of work is a function ``fn(session) -> T`` run by :meth:`Database.run`, which commits
before it returns: a reply is sent only for what is durable. On SQLite (one writer at a time,
answers in microseconds) the work runs inline on the event loop and write transactions start with
``BEGIN IMMEDIATE``, so writers queue on a lock instead of failing with "database is locked".
SQLite writes are group-committed: units of work that arrive together each run in a savepoint of
one transaction, whose single COMMIT (the fsync) precedes every one of their replies. On
PostgreSQL the work runs in a worker thread; concurrency between replicas is the database's job.

Outages are bounded (README "Limits"): the event loop never waits for a SQLite lock (it tries
without waiting; a busy database is waited for in a worker thread, up to the busy timeout), and a
PostgreSQL unit of work that outlives its deadline has its socket cut by :class:`StallGuard`, so a
database that stops answering costs a request seconds, not forever. :func:`is_unavailable` tells
these failures (and a database that is down) from bugs: they are answered 503.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, InvalidatePoolError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

T = TypeVar("T")
log = logging.getLogger("tdx.db")

SQLITE_BUSY_TIMEOUT_MS = 30_000
TRANSIENT_RETRIES = 5
TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock_detected, serialization_failure
# PostgreSQL errors that say "not now" rather than "wrong": connection exceptions (08), too many
# connections / out of resources (53), canceled or shut down (57: statement_timeout, admin
# shutdown, starting up), lock_timeout (55P03), and a deadlock or serialization failure that
# outlived its retries.
_UNAVAILABLE_SQLSTATE_CLASSES = frozenset({"08", "53", "57"})
_UNAVAILABLE_SQLSTATES = frozenset({"55P03", *TRANSIENT_SQLSTATES})
# SQLite primary result codes of the same kind: BUSY, LOCKED, PERM, READONLY, IOERR, FULL,
# CANTOPEN, PROTOCOL, NOLFS.
_SQLITE_BUSY = frozenset({5, 6})
_SQLITE_UNAVAILABLE = frozenset({3, 5, 6, 8, 10, 13, 14, 15, 22})


@dataclass(frozen=True)
class DbTimeouts:
    """How long a request may wait for the database (README "Limits"; TDX_DB_* settings)."""

    connect_s: float = 3.0  # a new connection (connect_timeout; at least 2 s), a pooled one's ping
    pool_s: float = 5.0  # a free pooled connection (PostgreSQL)
    statement_s: float = 10.0  # a statement or lock wait (PostgreSQL, server side); +1 s: socket cut
    sqlite_busy_s: float = 5.0  # SQLite's write lock held by another process


def is_sqlite_url(url: str) -> bool:
    return url.startswith("sqlite")


def _sqlite_code(exc: BaseException) -> int | None:
    code = getattr(getattr(exc, "orig", exc), "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def is_sqlite_busy(exc: BaseException) -> bool:
    return _sqlite_code(exc) in _SQLITE_BUSY


def is_unavailable(exc: BaseException) -> bool:
    """The database is down, unreachable, stalled, locked or out of resources (not a bug)."""
    if isinstance(exc, (PoolTimeoutError, DisconnectionError)):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return False
    code = _sqlite_code(exc)
    if code is not None:
        return code in _SQLITE_UNAVAILABLE
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate is None:  # psycopg: no answer from the server at all (refused, timed out, cut)
        return True
    return sqlstate[:2] in _UNAVAILABLE_SQLSTATE_CLASSES or sqlstate in _UNAVAILABLE_SQLSTATES


def _set_busy_timeout(conn: Connection, *, wait: bool) -> None:
    """SQLite's busy timeout for this pooled connection: 0 on the event loop (never wait there)."""
    ms = int(conn.info["busy_timeout_ms"]) if wait else 0
    if conn.info.get("busy_ms") != ms:
        conn.connection.dbapi_connection.execute(f"PRAGMA busy_timeout={ms}")  # type: ignore[union-attr]
        conn.info["busy_ms"] = ms


def _configure_sqlite(engine: Engine, synchronous: str, busy_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        # Take transaction control away from pysqlite so that BEGIN is ours (see _on_begin).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={busy_ms}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()
        record.info["busy_ms"] = record.info["busy_timeout_ms"] = busy_ms

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


class StallGuard:
    """Cuts the socket of a PostgreSQL connection checked out for longer than ``limit_s``.

    statement_timeout only helps while the server answers; when the network (or the server)
    stalls, libpq waits for ever and so would the request, its thread and its pooled connection.
    Shutting the socket down makes the blocked call fail at once (a disconnect: SQLAlchemy
    invalidates the connection and the request is answered 503); the pool reconnects later.
    """

    def __init__(self, limit_s: float, ping_limit_s: float) -> None:
        self.limit_s = limit_s
        self.ping_limit_s = ping_limit_s  # SELECT 1 on checkout: no answer this long, the link is dead
        self._armed: dict[int, tuple[float, Any]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def arm(self, record: ConnectionPoolEntry, dbapi_conn: Any, limit_s: float | None = None) -> None:
        with self._lock:
            self._armed[id(record)] = (time.monotonic() + (limit_s or self.limit_s), dbapi_conn)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="tdx-db-stall-guard", daemon=True)
                self._thread.start()

    def disarm(self, record: ConnectionPoolEntry) -> None:
        with self._lock:
            self._armed.pop(id(record), None)

    def _watch(self) -> None:
        tick = min(0.25, self.limit_s / 4, self.ping_limit_s / 4)
        while not self._wake.wait(tick):
            now = time.monotonic()
            with self._lock:  # held while cutting: the connection cannot be checked in meanwhile
                for key, (deadline, dbapi_conn) in list(self._armed.items()):
                    if now >= deadline:
                        del self._armed[key]
                        self._cut(dbapi_conn)

    def _cut(self, dbapi_conn: Any) -> None:
        try:
            fd = dbapi_conn.pgconn.socket
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except Exception as exc:  # already closed or broken: nothing left to unblock
            log.debug("could not cut a stalled connection: %s", exc)
            return
        log.warning("a database connection stopped answering (past its deadline): cut")


def _postgres_connect_args(url: str, t: DbTimeouts) -> dict[str, Any]:
    statement_ms = max(1, round(t.statement_s * 1000))
    options = url_options = make_url(url).query.get("options", "")
    if not isinstance(url_options, str):  # given more than once
        options = " ".join(url_options)
    options = f"{options} -c statement_timeout={statement_ms} -c lock_timeout={statement_ms}".strip()
    return {
        "connect_timeout": max(2, math.ceil(t.connect_s)),  # libpq counts whole seconds, at least 2
        "options": options,
        # A peer that vanished (no RST) is noticed by TCP itself, idle or not.
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": statement_ms + 1000,
    }


def _guard_postgres(engine: Engine, guard: StallGuard) -> None:
    """Pre-ping (as pool_pre_ping, which runs before any pool event could arm the guard) and the
    stall guard around every checkout."""

    @event.listens_for(engine, "connect")
    def _on_connect(_dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        record.info["fresh"] = True

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        if record.info.pop("fresh", False):
            guard.arm(record, dbapi_conn)
            return
        guard.arm(record, dbapi_conn, guard.ping_limit_s)
        try:
            engine.dialect.do_ping(dbapi_conn)
            guard.arm(record, dbapi_conn)  # the unit of work's own deadline
        except Exception as exc:
            guard.disarm(record)
            # The pool replaces this connection (and every older one: the server may have
            # restarted) with a new one, within connect_timeout.
            raise InvalidatePoolError(f"pre-ping failed: {exc}") from exc

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        guard.disarm(record)

    @event.listens_for(engine, "invalidate")
    def _on_invalidate(_dbapi_conn: Any, record: ConnectionPoolEntry, _exc: BaseException | None) -> None:
        guard.disarm(record)


def make_engine(
    url: str, *, sqlite_synchronous: str = "FULL", pool_size: int = 10, timeouts: DbTimeouts | None = None
) -> Engine:
    """``timeouts``: bounds for a serving process; None (migrations, tools) waits as long as it takes."""
    if is_sqlite_url(url):
        busy_ms = round(timeouts.sqlite_busy_s * 1000) if timeouts else SQLITE_BUSY_TIMEOUT_MS
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": busy_ms / 1000})
        _configure_sqlite(engine, sqlite_synchronous, busy_ms)
        _plain_savepoints(engine)
        return engine
    # No overflow: a replica never holds more than pool_size connections (PostgreSQL's default
    # max_connections is 100, shared by every replica); further requests queue for a connection.
    if timeouts is None:
        engine = create_engine(url, pool_size=pool_size, max_overflow=0, pool_timeout=60, pool_pre_ping=True)
        _plain_savepoints(engine)
        return engine
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=timeouts.pool_s,
        connect_args=_postgres_connect_args(url, timeouts),
    )
    _guard_postgres(engine, StallGuard(timeouts.statement_s + 1.0, ping_limit_s=max(2.0, timeouts.connect_s)))
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
        # SQLite: the batch being opened in a worker thread (the database was busy), which every
        # writer arriving meanwhile waits for instead of blocking the event loop on the lock.
        self._opening: asyncio.Task[None] | None = None
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
    def _transaction(self, write: bool, *, wait: bool = True) -> Iterator[Session]:
        session = self._sessions()
        if self.is_sqlite:
            conn = session.connection(execution_options={"sqlite_write": write})
            _set_busy_timeout(conn, wait=wait)
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
        batch = self._begin_write(wait=True)
        assert batch is not None
        self._batch = batch
        return batch

    def _begin_write(self, *, wait: bool) -> _Batch | None:
        """The process's SQLite write transaction (BEGIN IMMEDIATE), or None if ``wait`` is False
        and the database is busy (another process writes; this one is opening a batch)."""
        # One SQLite writer per process at a time: threads wait on this lock (held until the batch
        # commits) instead of spinning in SQLite's busy handler.
        if not self._write_lock.acquire(blocking=wait):
            return None
        conn: Connection | None = None
        try:
            conn = self.engine.connect()
            _set_busy_timeout(conn, wait=wait)
            conn.begin()  # BEGIN IMMEDIATE (see _on_begin)
        except BaseException as exc:
            if conn is not None:
                conn.close()
            self._write_lock.release()
            if not wait and isinstance(exc, OperationalError) and is_sqlite_busy(exc):
                return None
            raise
        return _Batch(conn, threading.get_ident())

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

    def _start_batch(self, batch: _Batch) -> None:
        """Make ``batch`` the event loop's: committed once the loop has run what is ready now, so
        requests that arrived together share one commit."""
        batch.thread = threading.get_ident()
        self._batch = batch
        asyncio.get_running_loop().call_soon(self._commit_soon, batch)

    async def _open_batch_off_loop(self) -> None:
        batch = await anyio.to_thread.run_sync(lambda: self._begin_write(wait=True))
        assert batch is not None
        self._start_batch(batch)

    async def _run_batched(self, fn: Callable[[Session], T]) -> T:
        while (batch := self._own_batch()) is None:
            if self._opening is None:
                batch = self._begin_write(wait=False)
                if batch is not None:
                    self._start_batch(batch)
                    break
                # Busy: wait for the lock in a worker thread (up to the busy timeout), never on the
                # event loop; writers arriving meanwhile wait for the same batch. A task of its
                # own, so that a request that gives up cannot leave the lock taken.
                self._opening = asyncio.create_task(self._open_batch_off_loop())
                self._opening.add_done_callback(self._opened)
            await asyncio.shield(self._opening)
        with self._unit(batch) as session:
            result = fn(session)
        fut = asyncio.get_running_loop().create_future()
        batch.waiters.append(fut)
        await fut  # a reply is sent only for what is committed
        return result

    def _opened(self, task: asyncio.Task[None]) -> None:
        self._opening = None
        if not task.cancelled():
            task.exception()  # retrieved: every waiter got it already

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

    def _read_now(self, fn: Callable[[Session], T]) -> T:
        with self._transaction(False, wait=False) as session:
            return fn(session)

    async def run(self, fn: Callable[[Session], T], *, write: bool = True) -> T:
        if self.is_sqlite:
            if write:
                return await self._run_batched(fn)
            try:
                return self._read_now(fn)  # WAL: readers are not blocked by writers (almost ever)
            except OperationalError as exc:
                if not is_sqlite_busy(exc):
                    raise
            return await anyio.to_thread.run_sync(lambda: self.run_sync(fn, write=False))
        return await anyio.to_thread.run_sync(lambda: self.run_sync(fn, write=write))

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    async def ready(self, timeout_s: float) -> None:
        """Raises unless the database answers ``SELECT 1`` within ``timeout_s``."""

        def check(session: Session) -> None:
            session.connection().exec_driver_sql("SELECT 1")

        if self.is_sqlite:
            await self.run(check, write=False)
            return
        # The worker thread is abandoned at the deadline: the stall guard and the pool timeout
        # end it soon after.
        thread = anyio.to_thread.run_sync(lambda: self.run_sync(check, write=False), abandon_on_cancel=True)
        await asyncio.wait_for(thread, timeout_s)

    def dispose(self) -> None:
        self.engine.dispose()
