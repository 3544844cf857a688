"""Real ``tdx-service serve`` processes sharing one PostgreSQL schema, for multi-replica tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
from sqlalchemy import create_engine, text

from tests.conftest import POSTGRES_URL, _with_search_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_replicas(token: str, count: int = 2, **settings: str) -> Iterator[list[str]]:
    """``count`` replicas on a fresh schema, started at once (migrations must be safe against each
    other); yields their base URLs. ``settings`` are extra TDX_* environment variables."""
    assert POSTGRES_URL
    schema = f"race_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    env = {
        **os.environ,
        "TDX_DATABASE_URL": _with_search_path(POSTGRES_URL, schema),
        "TDX_ADMIN_TOKEN": token,
        "TDX_HEARTBEAT_TIMEOUT_S": "3600",
        "TDX_LOG_REQUESTS": "false",
        # Storms on a shared, overloaded CI machine are not database outages.
        "TDX_DB_POOL_TIMEOUT_S": "60",
        "TDX_DB_STATEMENT_TIMEOUT_S": "60",
        **settings,
    }
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for _ in range(count):
            port = _free_port()
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "service.main", "serve", "--port", str(port)],
                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        for url, proc in zip(urls, procs, strict=True):
            while True:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "server exited"
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
