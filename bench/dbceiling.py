"""The database ceiling: a raw loop that inserts one row and commits, on one connection, with the
service's durability settings (SQLite: WAL, synchronous=FULL; PostgreSQL: the server's defaults).
No placement can commit faster than this without sharing commits."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path


def sqlite_commits_per_s(directory: Path, seconds: float, synchronous: str = "FULL") -> float:
    path = directory / "ceiling.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")
        n = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (v) VALUES (?)", ("x" * 64,))
            conn.execute("COMMIT")
            n += 1
        return n / (time.perf_counter() - started)
    finally:
        conn.close()


def postgres_commits_per_s(sqlalchemy_url: str, seconds: float) -> float:
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False)) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_ceiling (id BIGSERIAL PRIMARY KEY, v TEXT)")
        conn.commit()
        n = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            conn.execute("INSERT INTO bench_ceiling (v) VALUES (%s)", ("x" * 64,))
            conn.commit()
            n += 1
        rate = n / (time.perf_counter() - started)
        conn.execute("DROP TABLE bench_ceiling")
        conn.commit()
        return rate
