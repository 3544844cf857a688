"""Statements compiled once per dialect and run on the driver's path: the hot path's SQL.

SQLAlchemy executes a Core statement by computing its cache key (a walk of the whole expression
tree), looking its compiled form up, then binding every parameter through its type: for the
placement's statements that costs more than SQLite running them. A :class:`Prepared` statement is
compiled once per dialect into its SQL text, its parameter order and the type processors of its
parameters and columns; each call only orders and converts the values and runs the text with
``Connection.exec_driver_sql``, so the connection's events, its transaction and SQLAlchemy's
exception wrapping (``DBAPIError``, ``OperationalError``: what the central outage handling catches)
stay as they are. What it returns is the DBAPI's rows, converted column by column only where
the dialect needs it (a UUID or a timestamp stored as text on SQLite).

Statements whose compiled form depends on the values (``IN`` lists expanded at execution) are not
prepared: :meth:`Prepared.run` runs them the ordinary way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection
from sqlalchemy.engine import CursorResult, Dialect
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, Executable

Processor = Callable[[Any], Any] | None


@dataclass(frozen=True, slots=True)
class _Compiled:
    sql: str
    positional: bool
    names: tuple[str, ...]  # the order of the values (positional paramstyles) or their names
    fixed: Mapping[str, Any]  # values the statement itself carries (literals bound as parameters)
    bind: Mapping[str, Callable[[Any], Any]]
    result: tuple[Processor, ...]  # per selected or returned column


_CONNECTION = "tdx_connection"


def connection(session: Session) -> Connection:
    """``session.connection()``, looked up once per transaction (the ORM's lookup costs about as
    much as running one of the hot path's statements)."""
    tx = session.get_transaction()
    cached = session.info.get(_CONNECTION)
    if tx is not None and cached is not None and cached[0] is tx:
        conn: Connection = cached[1]
        return conn
    conn = session.connection()
    session.info[_CONNECTION] = (session.get_transaction(), conn)
    return conn


def _result_processor(type_: Any, dialect: Dialect) -> Processor:
    try:
        proc: Processor = type_._cached_result_processor(dialect, None)
    except TypeError:
        # Numeric types on psycopg choose by the column's type code, known only from a cursor:
        # psycopg returns them as Python numbers already (float8 as float).
        return None
    return proc


class Prepared:
    def __init__(self, stmt: Executable) -> None:
        self.stmt = stmt
        self._compiled: dict[str, _Compiled | None] = {}

    def _compile(self, dialect: Dialect) -> _Compiled | None:
        compiled = cast(SQLCompiler, cast(ClauseElement, self.stmt).compile(dialect=dialect))
        sql = compiled.string
        if "POSTCOMPILE" in sql:
            return None
        names = tuple(compiled.positiontup or ()) if compiled.positional else tuple(compiled.binds)
        fixed = {
            name: bp.effective_value
            for name, bp in compiled.binds.items()
            if not bp.required and bp.callable is None
        }
        bind = {name: proc for name, proc in compiled._bind_processors.items() if callable(proc)}
        if len(bind) != len(compiled._bind_processors) or compiled.escaped_bind_names:
            return None  # tuple-typed or renamed parameters: not worth preparing
        result = [_result_processor(col[3], dialect) for col in compiled._result_columns or ()]
        return _Compiled(sql, compiled.positional, names, fixed, bind, tuple(result))

    def compiled(self, dialect: Dialect) -> _Compiled | None:
        key = dialect.name
        if key not in self._compiled:
            self._compiled[key] = self._compile(dialect)
        return self._compiled[key]

    def run(self, conn: Connection, params: Mapping[str, Any]) -> CursorResult[Any]:
        """Execute with ``params`` (by bind parameter name); the result's rows are the driver's."""
        c = self.compiled(conn.dialect)
        if c is None:
            return conn.execute(self.stmt, dict(params))
        values = {**c.fixed, **params}
        for name, proc in c.bind.items():
            if name in values:
                values[name] = proc(values[name])
        if c.positional:
            return conn.exec_driver_sql(c.sql, tuple(values[n] for n in c.names))
        return conn.exec_driver_sql(c.sql, {n: values[n] for n in c.names})

    def run_many(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Execute once per parameter set, as one ``executemany``."""
        c = self.compiled(conn.dialect)
        if c is None:
            conn.execute(self.stmt, [dict(r) for r in rows])
            return
        sets = []
        for params in rows:
            values = {**c.fixed, **params}
            for name, proc in c.bind.items():
                if name in values:
                    values[name] = proc(values[name])
            sets.append(tuple(values[n] for n in c.names) if c.positional else {n: values[n] for n in c.names})
        conn.exec_driver_sql(c.sql, sets)

    def raw_rows(self, conn: Connection, params: Mapping[str, Any]) -> list[Any]:
        """The driver's rows, no column converted (see :meth:`converter`)."""
        if self.compiled(conn.dialect) is None:
            return [tuple(r) for r in conn.execute(self.stmt, dict(params)).all()]
        return list(self.run(conn, params).fetchall())

    def converter(self, dialect: Dialect) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
        """Converts one of :meth:`raw_rows` as the ordinary path would have (a UUID from its text
        on SQLite, a timestamp from its string)."""
        c = self.compiled(dialect)
        procs = [] if c is None else [(i, p) for i, p in enumerate(c.result) if p is not None]
        if not procs:
            return tuple

        def convert(raw: Sequence[Any]) -> tuple[Any, ...]:
            row = list(raw)
            for i, p in procs:
                row[i] = p(row[i])
            return tuple(row)

        return convert

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """The rows as tuples, each column converted as the ordinary path would."""
        convert = self.converter(conn.dialect)
        return [convert(r) for r in self.raw_rows(conn, params)]
